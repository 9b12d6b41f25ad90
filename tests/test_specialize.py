"""Graph inputs TVM needs as constants (reduction axes, TopK's k, Pad's pads): bound with
`constants=` / `--constant`, or, left as inputs, compiled per value at run time like
onnxruntime runs them."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import tvmsoftmax
from tvmsoftmax.lowering.compiler import SpecializingModel


def _reduce_model():
    """Softmax over the last axis, then ReduceSum over axes given as an input."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["s"], axis=-1),
         helper.make_node("ReduceSum", ["s", "axes"], ["y"], keepdims=1)],
        "reduce",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4, 5]),
         helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _topk_model():
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)],
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 9]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, [2, "k"]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, [2, "k"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _onnxruntime(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


X = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)


def test_runtime_axes_compile_per_value_and_match_onnxruntime():
    model = _reduce_model()
    compiled = tvmsoftmax.compile(model)
    assert isinstance(compiled, SpecializingModel)
    assert compiled.deferred == ["axes"] and "axes" in compiled.manifest["compile_error"]
    for axes in ([1], [0], [-1], [1]):
        feeds = {"x": X, "axes": np.array(axes, np.int64)}
        got, want = compiled.run(feeds)["y"], _onnxruntime(model, feeds)["y"]
        assert got.shape == want.shape, axes
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert len(compiled._compiled) == 3  # [1] came back from the cache


def test_specializations_are_bounded():
    compiled = tvmsoftmax.compile(_topk_model())
    x = np.random.default_rng(1).standard_normal((2, 9)).astype(np.float32)
    compiled.CACHE = 2
    for k in (1, 2, 3):
        got = compiled.run({"x": x, "k": np.array([k], np.int64)})
        want = _onnxruntime(_topk_model(), {"x": x, "k": np.array([k], np.int64)})
        np.testing.assert_array_equal(got["values"], want["values"])
        np.testing.assert_array_equal(got["indices"], want["indices"])
    assert len(compiled._compiled) == 2


def test_specializing_model_is_not_an_artifact(tmp_path):
    compiled = tvmsoftmax.compile(_reduce_model())
    with pytest.raises(tvmsoftmax.ArtifactError, match=r"values of input\(s\) 'axes'.*constants="):
        compiled.save(tmp_path / "m.tvmsm")
    assert not list(tmp_path.iterdir())
    with pytest.raises(tvmsoftmax.InputError, match="missing input.*'axes'"):
        compiled.run({"x": X})


def test_constants_bind_inputs_into_a_saveable_artifact(tmp_path):
    model = _reduce_model()
    compiled = tvmsoftmax.compile(model, constants={"axes": [2]})  # a list of Python ints is converted
    assert not isinstance(compiled, SpecializingModel)
    assert [i["name"] for i in compiled.inputs] == ["x"] and compiled.manifest["constants"] == ["axes"]
    loaded = tvmsoftmax.load(compiled.save(tmp_path / "m.tvmsm"))
    want = _onnxruntime(model, {"x": X, "axes": np.array([2], np.int64)})["y"]
    np.testing.assert_allclose(loaded.run({"x": X})["y"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("constants, message", [
    ({"nope": [1]}, r"constant is given for 'nope'.*inputs are: x, axes"),
    ({"axes": [1.5]}, r"'axes': expected dtype int64, got float64"),
    ({"axes": [1, 2]}, r"'axes': expected shape \[1\], got \[2\]"),
    ({"axes": np.array([2**40], np.int64).astype(np.float32)}, r"expected dtype int64"),
])
def test_bad_constants_name_the_input(constants, message):
    with pytest.raises(tvmsoftmax.InputError, match=message):
        tvmsoftmax.compile(_reduce_model(), constants=constants)


def test_cli_constant(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_reduce_model(), path)
    artifact = tmp_path / "m.tvmsm"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tvmsoftmax.cli", *args], capture_output=True, text=True,
                              timeout=600)

    refused = cli("compile", str(path), "-o", str(artifact))
    assert refused.returncode == 2 and "--constant" in refused.stderr and not artifact.exists(), refused.stderr
    done = cli("compile", str(path), "-o", str(artifact), "--constant", "axes=0")
    assert done.returncode == 0 and artifact.is_file(), done.stderr
    np.save(tmp_path / "x.npy", X)
    ran = cli("run", str(artifact), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path / "y.npz"))
    assert ran.returncode == 0, ran.stderr
    want = _onnxruntime(_reduce_model(), {"x": X, "axes": np.array([0], np.int64)})["y"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], want, rtol=1e-6, atol=1e-6)
    checked = cli("check", str(path), "--constant", "axes=-1")
    assert checked.returncode == 0 and "pass" in checked.stdout, checked.stdout + checked.stderr
    bad = cli("compile", str(path), "-o", str(artifact), "--constant", "axes=x")
    assert bad.returncode == 2 and "values must be numbers" in bad.stderr


def test_symbolic_transformer_compiles_per_shape(tmp_path):
    """TVM 0.27 cannot import a whole exported transformer with symbolic dims; run compiles it for the
    shapes it is given, every attention site still fused."""
    from tvmsoftmax.lowering.check import make_inputs
    from tvmsoftmax.models.transformers import build

    model = build("gpt2")
    compiled = tvmsoftmax.compile(model)
    assert isinstance(compiled, SpecializingModel)
    assert compiled.shaped == ["input_ids", "attention_mask"] and compiled.deferred == []
    assert compiled.sites == []  # nothing compiled yet
    for batch, sequence in ((1, 7), (2, 16)):
        feeds = make_inputs(model, seed=batch, dims={"batch": batch, "sequence": sequence})
        got, want = compiled.run(feeds), _onnxruntime(model, feeds)
        for name, value in want.items():
            assert got[name].shape == value.shape == (batch, sequence, 100)
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)
        fused = [s for s in compiled.sites if s.get("kind") == "attention" and s.get("rewritten")]
        assert len(fused) == 2, compiled.sites
    assert len(compiled._compiled) == 2
    with pytest.raises(tvmsoftmax.InputError, match=r"'input_ids': expected rank 2"):
        compiled.run({"input_ids": np.zeros((4,), np.int64), "attention_mask": np.ones((1, 4), np.int64)})
    with pytest.raises(tvmsoftmax.ArtifactError, match=r"shapes of input\(s\) 'input_ids', 'attention_mask'.*--shape"):
        compiled.save(tmp_path / "m.tvmsm")
