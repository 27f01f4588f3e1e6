"""Select over gRPC against the core: same indices, the reference cache (live and from a
cache file), concurrent jobs, and the queue bound. One real scorer process serves the
module; the references are the exported digits models run by onnxruntime directly."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from jest_stream import codec
from jest_stream.cachefile import CacheFileWriter
from jest_stream.contract import model_version
from jest_stream.diagnostics import loss_summary
from jest_stream.v1 import scorer_pb2 as pb
from support import (KINDS, SAMPLERS, OrtReference, aio_stub, expect_code, inputs_for, learner_for,
                         select_request)

MODEL_OF = {"per_example": "digits", "sigmoid_contrastive": "sigmoid", "softmax_contrastive": "softmax"}
CACHE_FILE_ROWS = np.arange(1000, 1300)  # digits whose reference outputs the cache file holds


def cache_key(i: int) -> str:
    return f"file/{i}"


@pytest.fixture(scope="module")
def model_paths(per_example_model, sigmoid_model, softmax_model):
    return {"digits": per_example_model, "sigmoid": sigmoid_model, "softmax": softmax_model}


@pytest.fixture(scope="module")
def refs(model_paths):
    return {name: OrtReference(path) for name, path in model_paths.items()}


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory, model_paths, refs, digits):
    """A cache file for the digits model, written as the precompute command would."""
    path = tmp_path_factory.mktemp("cache") / "digits.jcache"
    out = refs["digits"].outputs(inputs_for("per_example", digits, CACHE_FILE_ROWS))
    with CacheFileWriter(path, model_version(model_paths["digits"]), dataset="digits") as writer:
        for row, i in enumerate(CACHE_FILE_ROWS):
            assert writer.add(cache_key(int(i)), {"loss": out["loss"][row]})
    return str(path)


@pytest.fixture(scope="module")
def server(start_module_server, model_paths, cache_file):
    return start_module_server(model_paths, "--cache-file", cache_file)


def rows(start: int, batch: int) -> np.ndarray:
    return np.arange(start, start + batch) % 1797


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", KINDS)
async def test_select_matches_core(server, refs, model_paths, digits, kind, sampler):
    name = MODEL_OF[kind]
    idx = rows(17 * KINDS.index(kind) + 101 * SAMPLERS.index(sampler), 256)
    inputs = inputs_for(kind, digits, idx)
    learner = learner_for(kind, 256, seed=7)
    keys = [f"parity/{kind}/{sampler}/{i}" for i in idx]
    want = refs[name].select(inputs, learner, 64, sampler=sampler, seed=11)
    channel, stub = aio_stub(server.target)
    async with channel:
        reply = await stub.Select(select_request(name, learner, 64, keys=keys, inputs=inputs,
                                                 sampler=sampler, seed=11), timeout=30)
    assert list(reply.indices) == want.indices.tolist()
    assert reply.mean_score == pytest.approx(want.mean_score, rel=1e-6, abs=1e-9)
    assert reply.mean_score_all == pytest.approx(want.mean_score_all, rel=1e-6, abs=1e-9)
    assert (reply.cache_hits, reply.cache_misses) == (0, 256)
    assert reply.model_version == model_version(model_paths[name])
    losses = loss_summary(kind, learner, refs[name].scores(inputs))  # a weak reference is reported
    for field, value in losses.as_fields().items():
        assert reply.HasField(field) and getattr(reply, field) == pytest.approx(value, rel=1e-5), field


@pytest.mark.parametrize("score", ["learnability", "hard_learner", "easy_reference"])
async def test_score_rules_match_core(server, refs, digits, score):
    idx = rows(1500, 200)
    inputs = inputs_for("per_example", digits, idx)
    learner = learner_for("per_example", 200, seed=3)
    want = refs["digits"].select(inputs, learner, 50, score=score, seed=5)
    channel, stub = aio_stub(server.target)
    async with channel:
        reply = await stub.Select(select_request("digits", learner, 50, inputs=inputs, score=score, seed=5),
                                  timeout=30)
    assert list(reply.indices) == want.indices.tolist()


async def test_second_select_is_served_from_the_cache(server, refs, digits):
    idx = rows(300, 512)
    inputs = inputs_for("per_example", digits, idx)
    learner = learner_for("per_example", 512, seed=1)
    keys = [f"again/{i}" for i in idx]
    want = refs["digits"].select(inputs, learner, 128, seed=2)
    channel, stub = aio_stub(server.target)
    async with channel:
        first = await stub.Select(select_request("digits", learner, 128, keys=keys, inputs=inputs, seed=2),
                                  timeout=30)
        assert (first.cache_hits, first.cache_misses) == (0, 512)
        runs = server.metric("jest_inference_seconds_count", model="digits")
        batches = server.metric("jest_batch_rows_count", model="digits")
        hits = server.metric("jest_cache_hits_total", model="digits")
        # the same keys again, inputs and all: no inference
        again = await stub.Select(select_request("digits", learner, 128, keys=keys, inputs=inputs, seed=2),
                                  timeout=30)
        # and with keys only: the server has everything it needs
        keys_only = await stub.Select(select_request("digits", learner, 128, keys=keys, seed=2), timeout=30)
    for reply in (first, again, keys_only):
        assert list(reply.indices) == want.indices.tolist()
    assert (again.cache_hits, again.cache_misses) == (512, 0)
    assert (keys_only.cache_hits, keys_only.cache_misses) == (512, 0)
    assert server.metric("jest_inference_seconds_count", model="digits") == runs
    assert server.metric("jest_batch_rows_count", model="digits") == batches
    assert server.metric("jest_cache_hits_total", model="digits") == hits + 2 * 512


async def test_partly_cached_batch_runs_only_the_new_rows(server, refs, digits):
    idx = rows(900, 100)
    inputs = inputs_for("per_example", digits, idx)
    learner = learner_for("per_example", 100, seed=4)
    keys = [f"partial/{i}" for i in idx]
    channel, stub = aio_stub(server.target)
    async with channel:
        half = {k: v[:60] for k, v in inputs.items()}
        await stub.Reference(pb.ReferenceRequest(model="digits", job_id="test", keys=keys[:60],
                                                 inputs={k: codec.encode(v) for k, v in half.items()}),
                             timeout=30)
        rows_before = server.metric("jest_batch_rows_sum", model="digits")
        reply = await stub.Select(select_request("digits", learner, 30, keys=keys, inputs=inputs, seed=9),
                                  timeout=30)
    assert (reply.cache_hits, reply.cache_misses) == (60, 40)
    assert server.metric("jest_batch_rows_sum", model="digits") == rows_before + 40
    assert list(reply.indices) == refs["digits"].select(inputs, learner, 30, seed=9).indices.tolist()


async def test_cache_file_gives_live_outputs(server, refs, digits, model_paths):
    idx = CACHE_FILE_ROWS[:200]
    inputs = inputs_for("per_example", digits, idx)
    keys = [cache_key(int(i)) for i in idx]
    channel, stub = aio_stub(server.target)
    async with channel:
        runs = server.metric("jest_inference_seconds_count", model="digits")
        from_file = await stub.Reference(pb.ReferenceRequest(model="digits", job_id="file", keys=keys,
                                                             return_outputs=True, dataset="digits"), timeout=30)
        assert server.metric("jest_inference_seconds_count", model="digits") == runs
        live = await stub.Reference(pb.ReferenceRequest(
            model="digits", job_id="live", return_outputs=True,
            inputs={k: codec.encode(v) for k, v in inputs.items()}), timeout=30)
        learner = learner_for("per_example", 200, seed=8)
        selected = await stub.Select(select_request("digits", learner, 40, keys=keys, seed=4, dataset="digits"),
                                     timeout=30)
    assert (from_file.cache_hits, from_file.cache_misses) == (200, 0)
    assert (live.cache_hits, live.cache_misses) == (0, 200)
    assert from_file.model_version == live.model_version == model_version(model_paths["digits"])
    got = codec.decode(from_file.outputs["loss"])
    np.testing.assert_array_equal(got, codec.decode(live.outputs["loss"]))
    np.testing.assert_array_equal(got, refs["digits"].outputs(inputs)["loss"])
    assert (selected.cache_hits, selected.cache_misses) == (200, 0)
    assert list(selected.indices) == refs["digits"].select(inputs, learner, 40, seed=4).indices.tolist()


async def test_missing_keys_without_inputs_are_named(server):
    keys = [cache_key(1000), "never/seen/1", cache_key(1001), "never/seen/2"]
    learner = learner_for("per_example", 4, seed=0)
    channel, stub = aio_stub(server.target)
    async with channel:
        err = await expect_code(stub.Select(select_request("digits", learner, 2, keys=keys, dataset="digits"),
                                            timeout=30), grpc.StatusCode.FAILED_PRECONDITION)
        assert "inputs" in err.details()
        assert "never/seen/1" in err.details() and "never/seen/2" in err.details()
        assert cache_key(1000) not in err.details()
        err = await expect_code(stub.Reference(pb.ReferenceRequest(model="digits", keys=keys, dataset="digits"),
                                               timeout=30), grpc.StatusCode.FAILED_PRECONDITION)
        assert "never/seen/1" in err.details()


async def test_eight_concurrent_jobs_get_the_core_answer(server, refs, digits):
    """8 jobs (grpc.aio, asyncio.gather), 3 super-batches each, over all three models."""
    jobs, steps, batch = 8, 3, 128
    channel, stub = aio_stub(server.target)

    async def job(j: int):
        kind = KINDS[j % 3]
        out = []
        for step in range(steps):
            idx = rows(40 * j + 400 * step, batch)
            inputs = inputs_for(kind, digits, idx)
            learner = learner_for(kind, batch, seed=100 * j + step)
            reply = await stub.Select(select_request(
                MODEL_OF[kind], learner, 32, keys=[f"conc/{j}/{step}/{i}" for i in idx], inputs=inputs,
                seed=j * 10 + step, job_id=f"conc-job{j}"), timeout=60)
            out.append((kind, inputs, learner, j * 10 + step, list(reply.indices)))
        return out

    async with channel:
        results = await asyncio.gather(*(job(j) for j in range(jobs)))
    for j, answers in enumerate(results):
        for kind, inputs, learner, seed, got in answers:
            want = refs[MODEL_OF[kind]].select(inputs, learner, 32, seed=seed)
            assert got == want.indices.tolist(), f"job {j}"
        assert server.metric("jest_examples_total", job=f"conc-job{j}") == steps * batch
        assert server.metric("jest_calls_total", method="Select", job=f"conc-job{j}", code="OK") == steps


async def test_list_models_reports_the_contracts(server, model_paths):
    channel, stub = aio_stub(server.target)
    async with channel:
        reply = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    got = {m.name: m for m in reply.models}
    assert set(got) == set(model_paths)
    assert got["digits"].kind == "per_example"
    assert [i.name for i in got["digits"].inputs] == ["x", "y"]
    assert list(got["digits"].inputs[0].shape) == [-1, 64]
    assert got["sigmoid"].kind == "sigmoid_contrastive"
    assert (got["sigmoid"].logit_scale, got["sigmoid"].logit_bias) == (10.0, -5.0)
    assert [o.name for o in got["softmax"].outputs] == ["image_embeds", "text_embeds"]
    for name, path in model_paths.items():
        assert got[name].version == model_version(path)


async def test_queue_bound_refuses_with_resource_exhausted(start_server, per_example_model, refs, digits):
    """A tiny queue and a long batching delay: a burst is partly refused with
    RESOURCE_EXHAUSTED (and a retry hint), nothing hangs, and the server answers afterwards."""
    server = start_server({"digits": per_example_model}, "--max-queue-rows", "64", "--max-delay-ms", "1500")
    batch = 64
    channel, stub = aio_stub(server.target)

    async def call(j: int):
        idx = rows(64 * j, batch)
        learner = learner_for("per_example", batch, seed=j)
        request = select_request("digits", learner, 16, inputs=inputs_for("per_example", digits, idx),
                                 seed=j, job_id=f"burst{j}")
        try:
            reply = await stub.Select(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc
        return reply

    async with channel:
        answers = await asyncio.gather(*(call(j) for j in range(12)))
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert refused, "no call was refused although the queue bound is 64 rows"
        for exc in refused:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "--max-queue-rows" in exc.details()
            trailing = dict(exc.trailing_metadata() or ())
            assert int(trailing["retry-after-ms"]) > 0
        for j, a in enumerate(answers):
            if not isinstance(a, grpc.aio.AioRpcError):
                idx = rows(64 * j, batch)
                want = refs["digits"].select(inputs_for("per_example", digits, idx),
                                             learner_for("per_example", batch, seed=j), 16, seed=j)
                assert list(a.indices) == want.indices.tolist()
        assert server.metric("jest_queue_rejected_total", model="digits") == len(refused)
        # still serving
        idx = rows(7, batch)
        learner = learner_for("per_example", batch, seed=99)
        inputs = inputs_for("per_example", digits, idx)
        reply = await stub.Select(select_request("digits", learner, 16, inputs=inputs, seed=1), timeout=30)
        assert list(reply.indices) == refs["digits"].select(inputs, learner, 16, seed=1).indices.tolist()
    assert server.proc.poll() is None


@pytest.mark.parametrize("kind,rule", [("softmax_contrastive", {"softmax_score": "own"}),
                                       ("sigmoid_contrastive", {"lookahead": "none"})])
def test_every_selection_option_reaches_the_scorer(server, refs, digits, kind, rule):
    """The options past score/sampler/chunks/gain travel too: a RemoteScorer's Select with them
    is the core's answer under that rule, not under the default one."""
    from jest_stream.client import RemoteScorer
    from jest_stream.client.scorer import SelectCall
    from jest_stream.options import SelectOptions
    from jest_stream.selection import select

    name = MODEL_OF[kind]
    idx = rows(300, 256)
    inputs = inputs_for(kind, digits, idx)
    learner = learner_for(kind, 256, seed=4)
    reference = refs[name].scores(inputs)
    want = select(32, kind=kind, learner=learner, reference=reference, options=SelectOptions(**rule), seed=9)
    default = select(32, kind=kind, learner=learner, reference=reference, options=SelectOptions(), seed=9)
    assert want.indices.tolist() != default.indices.tolist()  # the option matters here, so this can fail
    with RemoteScorer(server.target, embeddings_dtype="float32") as scorer:
        got = scorer.select(SelectCall(model=name, job_id="options", learner=learner, n_select=32,
                                       inputs=lambda: inputs, options=SelectOptions(**rule), seed=9))
    assert got.indices.tolist() == want.indices.tolist()


@pytest.mark.parametrize("field", ["softmax_score", "lookahead"])
async def test_unknown_option_values_are_refused_naming_the_field(server, digits, field):
    """A client sending a rule the scorer does not know gets INVALID_ARGUMENT naming the field
    (never the default rule silently); the same value is refused in-process too."""
    from jest_stream.options import SelectOptions

    learner = learner_for("softmax_contrastive", 16, seed=1)
    request = select_request("softmax", learner, 4, inputs=inputs_for("softmax_contrastive", digits, rows(0, 16)))
    setattr(request, field, "greedy\nfake log line")
    channel, stub = aio_stub(server.target)
    async with channel:
        err = await expect_code(stub.Select(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert err.details().startswith(f"{field}: unknown value")
    with pytest.raises(ValueError, match=f"{field}: unknown value"):
        SelectOptions(**{field: "greedy"})
