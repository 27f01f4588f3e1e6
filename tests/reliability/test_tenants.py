"""Many tenants, one scorer: nothing one job sends can corrupt, stall or flood another.

One black-box test per class found from outside, each against a real scorer process on
loopback: keys of two datasets kept apart, a model that breaks its contract refused at
load, an overflowing example never selected, requests bounded before work, heavy jobs
beside a light one, unauthenticated bodies never read, the cache budget in real bytes,
job ids that cannot flood metrics or logs, and long keys that still get resent.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import numpy as np
import psutil
import pytest
from support import OrtReference, aio_stub, expect_code, inputs_for, learner_for, select_request

from jest_stream import codec
from jest_stream.v1 import scorer_pb2 as pb


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


class PeakRss:
    """The peak RSS of a process, sampled every 20 ms in a thread while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss(pid), threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self.base = rss(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def exits(server, timeout: float = 90) -> int | None:
    try:
        return server.proc.wait(timeout)
    except Exception:
        return None


# -- 1. keys of two datasets never collide -----------------------------------------------

async def test_same_keys_of_two_datasets_get_their_own_outputs(start_server, per_example_model, digits):
    server = start_server({"digits": per_example_model})
    ref = OrtReference(per_example_model)
    keys = [f"{i:06d}" for i in range(128)]  # WebDataset-style keys, the same in both datasets
    a, b = inputs_for("per_example", digits, np.arange(128)), inputs_for("per_example", digits, np.arange(600, 728))
    learner = learner_for("per_example", 128, seed=1)
    channel, stub = aio_stub(server.target)
    async with channel:
        await stub.Select(select_request("digits", learner, 32, keys=keys, inputs=a, dataset="a", job_id="ja"),
                          timeout=30)
        got = await stub.Select(select_request("digits", learner, 32, keys=keys, inputs=b, dataset="b",
                                               job_id="jb", seed=3), timeout=30)
        private = await stub.Select(select_request("digits", learner, 32, keys=keys, inputs=b, job_id="jc"),
                                    timeout=30)
        shared = await stub.Select(select_request("digits", learner, 32, keys=keys, dataset="a", job_id="jd"),
                                   timeout=30)
        assert (got.cache_hits, got.cache_misses) == (0, 128)  # not job A's outputs
        forged = await expect_code(stub.Select(select_request(
            "digits", learner, 32, keys=keys, dataset="\0job:jc", job_id="je"), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT)
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert (got.cache_hits, got.cache_misses) == (0, 128)
    assert list(got.indices) == ref.select(b, learner, 32, seed=3).indices.tolist()
    assert (private.cache_hits, shared.cache_hits) == (0, 128)  # no dataset: private; same dataset: shared
    assert "dataset" in forged.details()
    assert dict(listed.models[0].cached_entries) == {"a": 128, "b": 128, "_private": 128}
    assert server.metric("jest_cache_dataset_entries", model="digits", dataset="b") == 128


# -- 2. a model that breaks its contract never serves ------------------------------------

def _broken_model(path: str, how: str) -> str:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["B"])
    ints = {"axes": [1], "one": [1], "zero": [0], "two": [2], "end": [2**62]}
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], v) for n, v in ints.items()]
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0)]
    if how == "drops_first_row":  # loss[1:]: B - 1 rows
        nodes.append(helper.make_node("Slice", ["sum", "one", "end", "zero"], ["loss"]))
    elif how == "wrong_width":    # x[:, :2]: (B, 2)
        nodes = [helper.make_node("Slice", ["x", "zero", "two", "one"], ["loss"])]
    else:                         # sum + inf
        inits.append(helper.make_tensor("inf", TensorProto.FLOAT, [], [float("inf")]))
        nodes.append(helper.make_node("Add", ["sum", "inf"], ["loss"]))
    out = helper.make_tensor_value_info("loss", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, how, [x, y], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (("jest.kind", "per_example"), ("jest.inputs", '{"x": "features", "y": "labels"}'),
                       ("jest.outputs", '["loss"]')):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("how,says", [("drops_first_row", "2 rows for 3"), ("wrong_width", "shape [3, 2]"),
                                      ("infinite", "not finite")])
def test_model_breaking_its_contract_is_refused_at_load(start_server, tmp_path, how, says):
    path = _broken_model(str(tmp_path / f"{how}.onnx"), how)
    server = start_server({"broken": path}, wait=False)
    assert exits(server) == 1, f"the scorer served a model that {how.replace('_', ' ')}"
    assert "output 'loss'" in server.log() and says in server.log()
    assert "Traceback" not in server.log()


# -- 3. an overflowing example is never selected, and training goes on ------------------

def test_overflowing_examples_are_masked_and_training_goes_on(start_server, per_example_model, digits):
    import torch
    from torch.utils.data import DataLoader, Dataset

    from jest_stream import JESTLoader, RemoteScorer, per_example_cross_entropy

    class Poisoned(Dataset):
        def __init__(self):
            self.x = torch.from_numpy(digits["x"][:256].copy())
            self.x[[5, 70, 200]] = 3e38  # finite inputs whose reference loss is not
            self.y = torch.from_numpy(digits["y"][:256])

        def __len__(self):
            return 256

        def __getitem__(self, i):
            return {"x": self.x[i], "y": self.y[i], "row": i, "__key__": f"d{i:05d}"}

    server = start_server({"digits": per_example_model})
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 10)
    with RemoteScorer(server.target, timeout=20) as scorer:
        loader = JESTLoader(DataLoader(Poisoned(), batch_size=64), lambda b: per_example_cross_entropy(
            net(b["x"].clamp(0, 1)), b["y"]), scorer, n_select=16, seed=1, fallback="uniform")
        rows = [int(r) for _ in range(3) for sub in loader for r in sub["row"]]  # 3 epochs: cache hits
    assert loader.stats.fallbacks == 0, loader.stats.fallback_reasons
    assert len(rows) == 3 * 4 * 16 and not {5, 70, 200} & set(rows)
    assert server.metric("jest_nonfinite_reference_total", model="digits") >= 3 * 3  # every epoch: never cached


# -- 4. every request is bounded before work starts --------------------------------------

async def test_requests_past_a_limit_are_refused_naming_the_flag(start_server, sigmoid_model, per_example_model):
    server = start_server({"pairs": sigmoid_model, "digits": per_example_model}, "--max-examples", "2048",
                          "--max-embed-dim", "64", "--max-chunks", "32", "--max-select-work", "200000000")
    rng = np.random.default_rng(0)

    def pairs(batch: int, width: int, n_select: int, **kw) -> pb.SelectRequest:
        from jest_stream.outputs import Embeddings
        z = rng.standard_normal((2, batch, width)).astype(np.float32)
        return select_request("pairs", Embeddings(z[0], z[1], 8.0, -4.0), n_select, score="hard_learner", **kw)

    cases = [(pairs(4096, 1, 8), "--max-examples", "4096"), (pairs(64, 128, 8), "--max-embed-dim", "128"),
             (pairs(256, 1, 64, n_chunks=64), "--max-chunks", "64"),
             (pairs(2048, 1, 2048), "--max-select-work", "B=2048")]
    channel, stub = aio_stub(server.target)
    async with channel:
        for request, flag, value in cases:
            err = await expect_code(stub.Select(request, timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert flag in err.details() and value in err.details(), err.details()
        ok = await stub.Select(pairs(512, 16, 64), timeout=30)
    assert len(ok.indices) == 64


# -- 5. heavy jobs cannot starve a light one ------------------------------------------

async def test_light_job_keeps_answering_beside_four_heavy_jobs(start_server, sigmoid_model, per_example_model,
                                                               digits):
    """Four jobs send the heaviest selections the default limits allow (B = b = 8192, d = 1,
    1024 chunks: ~4e9 work units each), two in flight each; a light job's calls must all
    answer within its 5 s deadline."""
    from jest_stream.outputs import Embeddings

    server = start_server({"pairs": sigmoid_model, "digits": per_example_model}, "--workers", "4")
    z = np.random.default_rng(0).standard_normal((2, 8192, 1)).astype(np.float32)
    heavy = select_request("pairs", Embeddings(z[0], z[1], 8.0, -4.0), 8192, score="hard_learner", n_chunks=1024)
    idx = np.arange(256)
    light_inputs = inputs_for("per_example", digits, idx)
    stop = asyncio.Event()
    channel, stub = aio_stub(server.target)

    async def heavy_job(j: int) -> None:
        request = pb.SelectRequest()
        request.CopyFrom(heavy)
        request.job_id = f"heavy-{j}"
        while not stop.is_set():
            try:
                await stub.Select(request, timeout=120)
            except grpc.aio.AioRpcError:
                pass

    async def light_job() -> list[str]:
        codes = []
        await asyncio.sleep(1.0)  # the heavy jobs have filled their lanes
        for step in range(8):
            learner = learner_for("per_example", 256, seed=step)
            try:
                await stub.Select(select_request("digits", learner, 64, keys=[f"l{i}" for i in idx],
                                                 inputs=light_inputs, job_id="light"), timeout=5)
                codes.append("OK")
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code().name)
        stop.set()
        return codes

    async with channel:
        heavies = [asyncio.create_task(heavy_job(j)) for j in range(4) for _ in range(2)]
        codes = await light_job()
        await channel.close(grace=0)
        await asyncio.gather(*heavies, return_exceptions=True)
    assert codes == ["OK"] * 8, codes


# -- 6. unauthenticated bodies are never read ------------------------------------------

def test_unauthenticated_huge_requests_do_not_grow_memory(start_server, per_example_model, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    server = start_server({"digits": per_example_model}, "--token-file", str(token))
    body = pb.SelectRequest(model="digits", job_id="intruder", inputs={"x": pb.Tensor(
        dtype=pb.DT_FLOAT32, shape=[200 << 18], data=b"\x01" * (200 << 20))}).SerializeToString()

    def send(metadata=(), target: str = server.target) -> list[str]:
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 512 << 20)])
        call = channel.unary_unary("/jest_stream.v1.Scorer/Select", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        futures = [call.future(body, timeout=60, metadata=metadata) for _ in range(8)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(f"{exc.code().name}: {exc.details()}")
        channel.close()
        return codes

    with PeakRss(server.proc.pid) as peak:
        codes = send()
    assert [c.split(":")[0] for c in codes] == ["UNAUTHENTICATED"] * 8
    assert peak.growth_mb < 400, f"server RSS grew {peak.growth_mb:.0f} MiB for 8 x 200 MiB refused requests"
    assert server.metric("jest_calls_total", job="intruder") == 0  # refused: never under its job id
    budgeted = start_server({"digits": per_example_model}, "--token-file", str(token),
                            "--max-inflight-bytes", str(150 << 20))
    authed = send((("authorization", "Bearer s3cret-token"),), budgeted.target)
    assert any("--max-inflight-bytes" in c for c in authed), authed  # past the in-flight bytes budget


# -- 7. the cache budget counts real bytes --------------------------------------------

async def test_cache_budget_holds_for_emoji_keys(start_server, per_example_model, digits):
    budget = 64 << 20
    server = start_server({"digits": per_example_model}, "--cache-bytes", str(budget))
    idx = np.arange(1000) % 1797
    inputs = {k: codec.encode(v) for k, v in inputs_for("per_example", digits, idx).items()}
    channel, stub = aio_stub(server.target)
    async with channel:
        async def fill(lo: int, hi: int) -> None:
            for r in range(lo, hi):
                keys = [f"{r}-{i}-" + "\U0001F600" * 500 for i in range(1000)]  # 2 KB of str per key
                await stub.Reference(pb.ReferenceRequest(model="digits", job_id="emoji", dataset="emoji",
                                                         keys=keys, inputs=inputs), timeout=60)
        await fill(0, 2)
        base = rss(server.proc.pid)
        await fill(2, 150)
    growth = (rss(server.proc.pid) - base) / 2**20
    assert server.metric("jest_cache_bytes") <= budget
    assert growth < 1.5 * budget / 2**20 + 48, f"RSS grew {growth:.0f} MiB under a {budget >> 20} MiB budget"


# -- 8. job ids cannot flood metrics or logs ------------------------------------------

async def test_job_ids_are_validated_and_refused_ids_take_no_labels(start_server, per_example_model, digits,
                                                                   tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token")
    server = start_server({"digits": per_example_model}, "--token-file", str(token))
    auth = (("authorization", "Bearer s3cret-token"),)
    learner = learner_for("per_example", 8, seed=0)
    inputs = inputs_for("per_example", digits, np.arange(8))
    channel, stub = aio_stub(server.target)
    async with channel:
        for i in range(1005):  # refused calls, each claiming another job id
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Select(pb.SelectRequest(model="digits", job_id=f"flood-{i}"), timeout=10)
        for bad in ("x" * 129, "run\nFAKE LOG LINE job=admin", "caf\u00e9"):
            err = await expect_code(stub.Select(select_request("digits", learner, 4, inputs=inputs, job_id=bad),
                                                metadata=auth, timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
            assert "job_id" in err.details() and len(err.details()) < 400
        await stub.Select(select_request("digits", learner, 4, inputs=inputs, job_id="real-job"), metadata=auth,
                          timeout=10)
    assert server.metric("jest_calls_total", method="Select", job="real-job", code="OK") == 1
    assert server.metric("jest_calls_total", job="flood-3") == 0
    assert not [line for line in server.log().splitlines() if line.startswith("FAKE LOG LINE")]
    assert len(server.metrics()) < 200_000


# -- 9. long keys: "not cached" is a signal the client acts on --------------------------

def test_long_keys_not_cached_signal_resends_inputs(start_server, per_example_model, digits):
    from jest_stream import RemoteScorer
    from jest_stream.client.scorer import SelectCall

    server = start_server({"digits": per_example_model}, "--cache-bytes", "100000")
    keys = [f"{i:04d}" + "k" * 2000 for i in range(64)]  # ~2 KB keys; the cache holds ~40 of them
    inputs = inputs_for("per_example", digits, np.arange(64))
    learner = learner_for("per_example", 64, seed=2)
    with RemoteScorer(server.target, timeout=20) as scorer:
        call = SelectCall(model="digits", job_id="long-keys", learner=learner, n_select=16, keys=keys,
                          inputs=lambda: inputs, seed=1)
        first = scorer.select(call)
        again = scorer.select(call)  # sent without inputs, refused as not cached, resent with them
    assert again.indices.tolist() == first.indices.tolist()
    channel = grpc.insecure_channel(server.target)
    from jest_stream.v1 import scorer_pb2_grpc as pb_grpc
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.ScorerStub(channel).Select(select_request("digits", learner, 16, keys=[k + "x" for k in keys]),
                                           timeout=10)
    channel.close()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(refused.value.details()) <= 1024 and "and 61 more" in refused.value.details()
    assert dict(refused.value.trailing_metadata())["jest-not-cached"] == "64"


# -- also: cache files, TLS, token files, metrics host, labels, SIGTERM -----------------

def _cache_files(tmp_path, version: str) -> dict[str, bytes]:
    import msgpack

    header = msgpack.packb({"format": "jest-stream-cache", "format_version": 2, "model_version": version,
                            "dataset": "d"})
    record = msgpack.packb({"k": "a", "o": {"loss": ["<f4", [], b"\0\0\0\0"]}})
    return {
        "garbage": b"\xc1" * 64,
        "old-format": msgpack.packb({"format": "jest-stream-cache", "format_version": 1, "model_version": version}),
        "bogus-3GB-length": header + record.replace(b"\xc4\x04", b"\xc6" + (3 << 30).to_bytes(4, "big")) + record,
        "object-dtype": header + msgpack.packb({"k": "a", "o": {"loss": ["|O", [], b"\0" * 8]}}),
        "key-not-a-string": header + msgpack.packb({"k": 7, "o": {"loss": ["<f4", [], b"\0\0\0\0"]}}),
        "garbage-after-header": header + b"\xc1\xc1\xc1",
    }


def test_malformed_cache_files_fail_with_one_clear_line(start_server, per_example_model, tmp_path):
    from jest_stream.contract import model_version

    for name, body in _cache_files(tmp_path, model_version(per_example_model)).items():
        path = tmp_path / f"{name}.cache"
        path.write_bytes(body)
        server = start_server({"digits": per_example_model}, "--cache-file", str(path), wait=False)
        assert exits(server) == 1, f"{name}: the scorer served a malformed cache file"
        errors = [line for line in server.log().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and str(path) in errors[0], (name, server.log())
        assert "Traceback" not in server.log(), name


def _self_signed(tmp_path, name: str) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("case", ["tls-mismatch", "token-not-utf8", "token-not-ascii"])
def test_bad_credentials_files_are_refused_clearly(start_server, per_example_model, tmp_path, case):
    if case == "tls-mismatch":
        cert, _ = _self_signed(tmp_path, "one")
        _, other_key = _self_signed(tmp_path, "two")
        flags, says = ("--tls-cert", cert, "--tls-key", other_key), "does not match the certificate"
    else:
        token = tmp_path / "token"
        token.write_bytes(b"\xff\xfe secret" if case == "token-not-utf8" else "s\u00e9cret".encode())
        flags, says = ("--token-file", str(token)), "not ASCII"
    with pytest.raises(RuntimeError) as refused:  # the harness: it exited before binding its ports
        start_server({"digits": per_example_model}, *flags, wait=False)
    assert says in str(refused.value) and "Traceback" not in str(refused.value), str(refused.value)


def test_metrics_bind_loopback_unless_the_image_says_otherwise():
    from pathlib import Path

    from jest_stream.server.cli import config_from_args, parse_args

    assert config_from_args(parse_args(["--model", "m=x.onnx"])).metrics_host == "127.0.0.1"
    root = Path(__file__).resolve().parents[2] / "docker"
    for name in ("Dockerfile", "Dockerfile.gpu", "k8s/deployment.yaml"):
        assert "JEST_METRICS_HOST" in (root / name).read_text(), name


async def test_labels_outside_the_class_range_are_refused(start_server, per_example_model, digits):
    server = start_server({"digits": per_example_model})
    inputs = inputs_for("per_example", digits, np.arange(16))
    inputs["y"] = inputs["y"].copy()
    inputs["y"][3] = 10
    channel, stub = aio_stub(server.target)
    async with channel:
        err = await expect_code(stub.Select(select_request("digits", learner_for("per_example", 16, 0), 4,
                                                           inputs=inputs), timeout=10),
                                grpc.StatusCode.INVALID_ARGUMENT)
    assert "inputs['y']" in err.details() and "[0, 10)" in err.details()


async def test_calls_cut_by_sigterm_get_a_retryable_status(start_server, sigmoid_model):
    """16 jobs keep selections of seconds each in flight; SIGTERM with a 2 s grace: calls that arrive
    while draining, and calls the grace cuts short, must come back UNAVAILABLE (which
    gRPC's retry policy sends to another replica), never CANCELLED."""
    from jest_stream.outputs import Embeddings

    server = start_server({"pairs": sigmoid_model}, "--grace", "2")
    z = np.random.default_rng(0).standard_normal((2, 8192, 1)).astype(np.float32)
    request = select_request("pairs", Embeddings(z[0], z[1], 8.0, -4.0), 8192, score="hard_learner",
                             n_chunks=1024)
    channel, stub = aio_stub(server.target)
    codes: list[str] = []

    async def caller(j: int) -> None:
        mine = pb.SelectRequest()
        mine.CopyFrom(request)
        mine.job_id = f"j{j}"
        while True:
            try:
                await stub.Select(mine, timeout=30)
                codes.append("OK")
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code().name)
                return

    async with channel:
        callers = [asyncio.create_task(caller(j)) for j in range(16)]
        while "OK" not in codes:
            await asyncio.sleep(0.1)
        os.kill(server.proc.pid, signal.SIGTERM)
        await asyncio.gather(*callers)
    assert "CANCELLED" not in codes and "UNAVAILABLE" in codes, sorted(set(codes))


def test_isolation_bench_runs_at_tiny_sizes(capsys):
    """``jest-stream bench isolation`` end to end at tiny sizes (so that it cannot rot)."""
    import json

    from jest_stream.cli import main

    main(["bench", "isolation", "--json", "--calls", "4", "--flood-tasks", "1", "--heavy-batch", "128",
          "--unauth-mb", "2"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"p99_alone_ms", "p99_flood_ms", "p99_heavy_ms", "p99_unauth_ms", "rss_growth_mb",
                           "wrong_answers"}
    assert result["wrong_answers"] == 0
