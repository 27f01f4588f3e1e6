"""JESTLoader end to end: a real scorer process on loopback and the embedded LocalScorer
select the same sub-batches; sub-batches keep the structure of tensor, dict, tuple and
WebDataset batches; num_workers=2 with a remote scorer runs without hangs; a forked
child can use a RemoteScorer its parent has used."""
from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch
import webdataset as wds
from support import KeyedDigits, digit_key
from torch.utils.data import DataLoader

from jest_stream import JESTLoader, LocalScorer, RemoteScorer, per_example_cross_entropy

B, F = 128, 0.75  # b = 32


def learner(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def dict_score(model):
    return lambda batch: per_example_cross_entropy(model(batch["x"]), batch["y"])


def row_of(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def run(loader, epochs: int = 1) -> list:
    return [sub for _ in range(epochs) for sub in loader]


def test_remote_and_local_select_the_same_sub_batches(start_server, per_example_model, digits):
    server = start_server({"digits": per_example_model})
    model = learner()
    data = KeyedDigits(digits)
    common = dict(filter_ratio=F, sampler="joint", seed=3)
    with LocalScorer(per_example_model, name="digits", intra_op_threads=1) as local, \
            RemoteScorer(server.target) as remote:
        by_local = JESTLoader(DataLoader(data, batch_size=B), dict_score(model), local, **common)
        by_remote = JESTLoader(DataLoader(data, batch_size=B), dict_score(model), remote, **common)
        no_keys = JESTLoader(DataLoader(data, batch_size=B), dict_score(model), remote, key=None, **common)
        local_keys = [sub["__key__"] for sub in run(by_local, epochs=2)]
        remote_keys = [sub["__key__"] for sub in run(by_remote, epochs=2)]
        no_keys_keys = [sub["__key__"] for sub in run(no_keys)]
    assert local_keys == remote_keys
    assert no_keys_keys == remote_keys[:len(no_keys_keys)]  # inputs sent every step: same result
    assert len(local_keys) == 2 * len(by_local)  # 15 super-batches per epoch, the last of 5
    assert [len(k) for k in local_keys[:15]] == [32] * 14 + [1]
    for loader in (by_local, by_remote):
        s = loader.stats
        assert s.fallbacks == 0 and s.sub_batches == len(local_keys)
        assert s.cache_hits >= len(data)  # the second epoch is served from the reference cache
        assert s.mean_score > s.mean_score_all  # learnability selection raises learnability
    assert by_remote.stats.scorer_seconds > 0 and no_keys.stats.cache_hits == 0


def structured_batches(digits, tmp_path):
    """The same super-batches as a tensor, a dict, a tuple and a WebDataset dict, each
    with its own key and reference_inputs settings."""
    x, y = torch.from_numpy(digits["x"][:512]), torch.from_numpy(digits["y"][:512])
    keys = [digit_key(i) for i in range(512)]
    rows = torch.arange(512, dtype=torch.float32)[:, None]
    packed = torch.cat([x, y[:, None].float(), rows], dim=1)  # (N, 66): features, label, row id
    tensor_batches = [packed[i:i + B] for i in range(0, 512, B)]
    tuple_batches = [(x[i:i + B], y[i:i + B], keys[i:i + B]) for i in range(0, 512, B)]
    dict_batches = [{"x": x[i:i + B], "y": y[i:i + B], "__key__": keys[i:i + B], "split": "train"}
                    for i in range(0, 512, B)]
    shard = str(tmp_path / "digits-000000.tar")
    with wds.TarWriter(shard) as sink:
        for i in range(512):
            sink.write({"__key__": keys[i], "x.npy": digits["x"][i], "y.cls": int(digits["y"][i])})
    webdataset = wds.WebDataset(shard, shardshuffle=False).decode().batched(B)
    return {
        "tensor": (tensor_batches, dict(key=lambda b: [digit_key(r) for r in b[:, 65]],
                                        reference_inputs=lambda b: {"x": b[:, :64], "y": b[:, 64].long()}),
                   lambda b: (b[:, :64], b[:, 64].long())),
        "tuple": (tuple_batches, dict(key=lambda b: b[2], reference_inputs=lambda b: {"x": b[0], "y": b[1]}),
                  lambda b: (b[0], b[1])),
        "dict": (dict_batches, {}, lambda b: (b["x"], b["y"])),
        "webdataset": (webdataset, dict(reference_inputs=lambda b: {"x": b["x.npy"], "y": b["y.cls"]}),
                       lambda b: (torch.as_tensor(b["x.npy"]), torch.as_tensor(b["y.cls"]))),
    }


def check_structure(name: str, sub, digits) -> None:
    if name == "tensor":
        assert isinstance(sub, torch.Tensor) and sub.shape == (32, 66)
        rows = sub[:, 65].long().tolist()
        assert np.array_equal(sub[:, :64].numpy(), digits["x"][rows])
        assert np.array_equal(sub[:, 64].numpy(), digits["y"][rows])
    elif name == "tuple":
        assert isinstance(sub, tuple) and len(sub) == 3 and isinstance(sub[2], list)
        rows = [row_of(k) for k in sub[2]]
        assert np.array_equal(sub[0].numpy(), digits["x"][rows]) and np.array_equal(sub[1].numpy(), digits["y"][rows])
    elif name == "dict":
        assert set(sub) == {"x", "y", "__key__", "split"} and sub["split"] == "train"
        rows = [row_of(k) for k in sub["__key__"]]
        assert np.array_equal(sub["x"].numpy(), digits["x"][rows]) and np.array_equal(sub["y"].numpy(), digits["y"][rows])
    else:
        assert {"__key__", "x.npy", "y.cls", "__url__"} <= set(sub)
        rows = [row_of(k) for k in sub["__key__"]]
        assert isinstance(sub["x.npy"], np.ndarray) and sub["x.npy"].shape == (32, 64)
        assert np.array_equal(sub["x.npy"], digits["x"][rows]) and np.array_equal(sub["y.cls"], digits["y"][rows])
        assert len(sub["__url__"]) == 32
    assert len(set(map(tuple, np.asarray(rows)[:, None]))) == 32  # no example twice


@pytest.mark.parametrize("where", ["local", "remote"])
def test_sub_batches_keep_the_batch_structure(where, start_server, per_example_model, digits, tmp_path):
    if where == "remote":
        scorer = RemoteScorer(start_server({"digits": per_example_model}).target)
    else:
        scorer = LocalScorer(per_example_model, intra_op_threads=1)
    model = learner()
    with scorer:
        for name, (batches, options, xy) in structured_batches(digits, tmp_path).items():
            loader = JESTLoader(batches, lambda b, xy=xy: per_example_cross_entropy(model(xy(b)[0]), xy(b)[1]),
                                scorer, filter_ratio=F, seed=0, **options)
            subs = run(loader)
            assert len(subs) == 4, name
            for sub in subs:
                check_structure(name, sub, digits)
            assert loader.stats.fallbacks == 0 and loader.stats.examples_selected == 4 * 32
            assert loader.stats.cache_misses + loader.stats.cache_hits == 512, name


@pytest.mark.timeout(180)
def test_num_workers_2_with_a_remote_scorer(start_server, per_example_model, digits):
    server = start_server({"digits": per_example_model})
    model = learner()
    data = KeyedDigits(digits, n=1024)
    with RemoteScorer(server.target) as scorer:
        scorer.models()  # the channel exists before the workers fork, and again at epoch 2
        results = {}
        for workers in (0, 2):
            loader = JESTLoader(DataLoader(data, batch_size=B, num_workers=workers), dict_score(model),
                                scorer, filter_ratio=F, seed=11)
            results[workers] = [sub["__key__"] for sub in run(loader, epochs=2)]
            assert loader.stats.fallbacks == 0
    assert results[2] == results[0] and len(results[2]) == 16


def _select_keys(scorer: RemoteScorer, digits: dict, seed: int) -> list[int]:
    """One prefetch + Select of 64 digits by key, as the loader makes them."""
    from jest_stream.client.scorer import SelectCall
    from jest_stream.outputs import Losses

    keys = [f"fork-{i:03d}" for i in range(64)]
    inputs = lambda: {"x": digits["x"][:64], "y": digits["y"][:64]}  # noqa: E731
    handle = scorer.prefetch("digits", "fork-test", keys, inputs)
    call = SelectCall(model="digits", job_id="fork-test", n_select=16, keys=keys, inputs=inputs, seed=seed,
                      learner=Losses(np.linspace(0.0, 1.0, 64, dtype=np.float32)))
    return scorer.select(call, handle).indices.tolist()


def _in_child(scorer: RemoteScorer, digits: dict, answers) -> None:
    answers.put(_select_keys(scorer, digits, seed=5))


@pytest.mark.timeout(120)
def test_a_forked_child_uses_a_scorer_its_parent_used(start_server, per_example_model, digits):
    """Fork safety: the child opens its own channel (the parent's is never touched there),
    and the parent's keeps working afterwards."""
    server = start_server({"digits": per_example_model})
    fork = multiprocessing.get_context("fork")
    with RemoteScorer(server.target, timeout=5.0) as scorer:
        expected = _select_keys(scorer, digits, seed=5)
        for _ in range(2):
            answers = fork.Queue()
            child = fork.Process(target=_in_child, args=(scorer, digits, answers))
            child.start()
            got = answers.get(timeout=30)
            child.join(30)
            assert child.exitcode == 0 and got == expected
        assert _select_keys(scorer, digits, seed=5) == expected


def test_tls_and_bearer_token(start_server, per_example_model, digits, tmp_path):
    import subprocess

    cert, key, token = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "token"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token.write_text("s3cret")
    server = start_server({"digits": per_example_model}, "--tls-cert", str(cert), "--tls-key", str(key),
                          "--token-file", str(token), tls_ca=cert.read_bytes())
    model = learner()
    with RemoteScorer(server.target, token="s3cret", tls=str(cert)) as scorer:
        loader = JESTLoader(DataLoader(KeyedDigits(digits, n=256), batch_size=B), dict_score(model), scorer,
                            filter_ratio=F, seed=0)
        assert [len(sub["__key__"]) for sub in loader] == [32, 32]
        assert loader.stats.fallbacks == 0 and loader.stats.scored == 2
