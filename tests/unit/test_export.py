"""The export helper: contract metadata, a dynamic batch axis, ONNX Runtime agreeing with
torch, clear errors; and models that break the contract refused at load."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import TwoTower, mlp

from jest_stream.client.export import export_reference
from jest_stream.contract import ContractError, ModelContract, TensorSpec
from jest_stream.server.engine import ScoringEngine
from jest_stream.server.models import ReferenceModel


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tensors(digits):
    return torch.from_numpy(digits["x"]), torch.from_numpy(digits["y"])


@pytest.fixture(scope="module")
def per_example(tmp_path_factory, tensors):
    x, y = tensors
    model = mlp(64, 10, seed=0)
    path = tmp_path_factory.mktemp("export") / "per_example.onnx"
    contract = export_reference(model, torch.nn.CrossEntropyLoss(reduction="none"), path,
                                example_inputs=(x[:4], y[:4]), input_names=("x", "y"), kind="per_example",
                                input_meanings={"x": "pixels / 16"})
    return model, path, contract


@pytest.fixture(scope="module")
def contrastive(tmp_path_factory, tensors):
    x, _ = tensors
    model = TwoTower.build(seed=1)
    path = tmp_path_factory.mktemp("export") / "siglip.onnx"
    contract = export_reference(model, None, path, example_inputs={"image": x[:4], "text": x[4:8]},
                                kind="sigmoid_contrastive", logit_scale=torch.tensor(10.0), logit_bias=-5.0)
    return model, path, contract


def test_per_example_metadata_follows_the_contract(per_example):
    _, path, contract = per_example
    meta = metadata(path)
    assert meta["jest.kind"] == "per_example"
    assert json.loads(meta["jest.inputs"]) == {"x": "pixels / 16", "y": "labels"}
    assert json.loads(meta["jest.outputs"]) == ["loss"]
    assert "jest.logit_scale" not in meta
    s = session(path)
    assert [i.name for i in s.get_inputs()] == ["x", "y"]
    assert [o.name for o in s.get_outputs()] == ["loss"]
    read = ModelContract.from_metadata(meta, ["x", "y"], ["loss"])
    assert read == contract


def test_contrastive_metadata_follows_the_contract(contrastive):
    _, path, contract = contrastive
    meta = metadata(path)
    assert meta["jest.kind"] == "sigmoid_contrastive"
    assert json.loads(meta["jest.outputs"]) == ["image_embeds", "text_embeds"]
    assert set(json.loads(meta["jest.inputs"])) == {"image", "text"}
    assert float(meta["jest.logit_scale"]) == 10.0 and float(meta["jest.logit_bias"]) == -5.0
    assert (contract.logit_scale, contract.logit_bias) == (10.0, -5.0)


def test_batch_axis_is_dynamic_and_ort_agrees_with_torch(per_example, contrastive, tensors):
    x, y = tensors
    model, path, _ = per_example
    s = session(path)
    assert s.get_inputs()[0].shape[0] == s.get_outputs()[0].shape[0] == "batch"
    for rows in (slice(0, 1), slice(100, 137), slice(0, 1000)):  # none of them the example batch of 4
        (loss,) = s.run(["loss"], {"x": x[rows].numpy(), "y": y[rows].numpy()})
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="none").numpy()
        assert loss.shape == want.shape
        np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-5)
    towers, path, _ = contrastive
    zi, zt = session(path).run(["image_embeds", "text_embeds"], {"image": x[:33].numpy(), "text": x[33:66].numpy()})
    with torch.no_grad():
        wi, wt = towers(x[:33], x[33:66])
    assert zi.shape == zt.shape == (33, 16)
    np.testing.assert_allclose(zi, wi.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(zt, wt.numpy(), rtol=1e-4, atol=1e-5)


def test_exported_models_load_in_the_engine(per_example, contrastive, tensors):
    x, y = tensors
    engine = ScoringEngine({"a": per_example[1], "b": contrastive[1]}, intra_op_threads=1)
    info = {m.name: m for m in engine.list_models()}
    assert info["a"].kind == "per_example" and info["a"].input("x") == TensorSpec("x", np.dtype("float32"), (-1, 64))
    assert info["b"].logit_scale == 10.0
    out = engine.reference("a", None, {"x": x[:5].numpy(), "y": y[:5].numpy()}).outputs
    assert out["loss"].shape == (5,)


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(kind="sigmoid_contrastive", loss_fn=None, logit_scale=None), "logit_scale",
                 id="contrastive-without-logit_scale"),
    pytest.param(dict(kind="softmax_contrastive", loss_fn=None, logit_scale=float("inf")), "logit_scale",
                 id="infinite-logit_scale"),
    pytest.param(dict(kind="sigmoid_contrastive", loss_fn=torch.nn.MSELoss(), logit_scale=1.0), "loss_fn",
                 id="contrastive-with-loss_fn"),
    pytest.param(dict(kind="per_example", loss_fn=None), "loss_fn", id="per_example-without-loss_fn"),
    pytest.param(dict(kind="per_example", loss_fn=torch.nn.CrossEntropyLoss()), "reduction='none'",
                 id="per_example-mean-loss"),
    pytest.param(dict(kind="clip", loss_fn=None), "kind", id="unknown-kind"),
    pytest.param(dict(kind="per_example", loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
                      input_names=("x",)), "input_names", id="names-vs-inputs"),
])
def test_clear_errors(tmp_path, tensors, kwargs, match):
    x, y = tensors
    kw = dict(example_inputs=(x[:4], y[:4]), input_names=("x", "y"))
    if kwargs["kind"] != "per_example":
        kw = dict(example_inputs=(x[:4], x[4:8]), input_names=("image", "text"))
    kw.update(kwargs)
    model = TwoTower.build(seed=1) if "contrastive" in kw["kind"] else mlp(64, 10, seed=0)
    with pytest.raises(ValueError, match=match):
        export_reference(model, kw.pop("loss_fn"), tmp_path / "m.onnx", **kw)
    assert not (tmp_path / "m.onnx").exists() or kwargs["kind"] == "per_example"


def _plain_export(path, x, dynamic: bool = True) -> None:
    """A plain torch.onnx.export (no jest metadata) of a classifier."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(mlp(64, 10, seed=0), (x[:2],), str(path), input_names=["x"], output_names=["loss"],
                          dynamic_axes={"x": {0: "batch"}, "loss": {0: "batch"}} if dynamic else None,
                          dynamo=False)


def _with_metadata(path, **meta) -> None:
    proto = onnx.load(str(path))
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def test_model_without_metadata_is_refused_at_load(tmp_path, tensors):
    path = tmp_path / "plain.onnx"
    _plain_export(path, tensors[0])
    with pytest.raises(ContractError, match="jest.kind.*missing.*export_reference"):
        ReferenceModel("plain", path)
    with pytest.raises(ContractError, match="'plain'"):
        ScoringEngine({"plain": path})


def test_fixed_batch_axis_is_refused_at_load(tmp_path, tensors):
    path = tmp_path / "fixed.onnx"
    _plain_export(path, tensors[0], dynamic=False)
    _with_metadata(path, **{"jest.kind": "per_example", "jest.inputs": '{"x": "features"}',
                            "jest.outputs": '["loss"]'})
    with pytest.raises(ContractError, match="dynamic batch axis"):
        ReferenceModel("fixed", path)


@pytest.mark.parametrize("meta,match", [
    ({"jest.kind": "triplet"}, "jest.kind"),
    ({"jest.kind": "per_example", "jest.inputs": '{"x": "features"}', "jest.outputs": '["logits"]'}, "outputs"),
    ({"jest.kind": "per_example", "jest.inputs": '{"pixels": "features"}', "jest.outputs": '["loss"]'},
     "jest.inputs"),
    ({"jest.kind": "per_example", "jest.inputs": "{not json", "jest.outputs": '["loss"]'}, "JSON"),
])
def test_broken_metadata_is_refused_at_load(tmp_path, tensors, meta, match):
    path = tmp_path / "broken.onnx"
    _plain_export(path, tensors[0])
    _with_metadata(path, **meta)
    with pytest.raises(ContractError, match=match):
        ReferenceModel("broken", path)


def test_contrastive_without_scale_metadata_is_refused(tmp_path, contrastive):
    path = tmp_path / "noscale.onnx"
    proto = onnx.load(str(contrastive[1]))
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != "jest.logit_scale"]
    del proto.metadata_props[:]
    for key, value in keep:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    with pytest.raises(ContractError, match="jest.logit_scale"):
        ReferenceModel("noscale", path)


def test_not_onnx_and_missing_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ContractError, match="cannot load"):
        ReferenceModel("junk", junk)
    with pytest.raises(FileNotFoundError, match="--model gone="):
        ReferenceModel("gone", tmp_path / "gone.onnx")


def test_example_inputs_may_be_a_dict_and_logit_scale_a_tensor(tmp_path, tensors):
    """``example_inputs={"image": ..., "text": ...}`` names the inputs; a tensor logit scale
    (e.g. ``model.log_scale.exp()``) is written as its value."""
    x, _ = tensors
    scale = torch.tensor(7.0, requires_grad=True)
    contract = export_reference(TwoTower.build(seed=1), None, tmp_path / "d.onnx",
                                example_inputs={"image": x[:3], "text": x[3:6]}, kind="softmax_contrastive",
                                logit_scale=scale * 1.0)
    assert list(contract.inputs) == ["image", "text"] and contract.logit_scale == pytest.approx(7.0)
