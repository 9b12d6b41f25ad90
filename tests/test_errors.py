"""Bad input gets one clear error naming the file, node or input, never a traceback."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tvmsoftmax
from conftest import softmax_model


@pytest.fixture(scope="module")
def compiled():
    return tvmsoftmax.compile(softmax_model("Softmax", (2, 8)))


def test_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"definitely not protobuf \x00\xff" * 10)
    with pytest.raises(tvmsoftmax.ModelError, match="not an ONNX model"):
        tvmsoftmax.compile(path)


def test_truncated(tmp_path):
    path = tmp_path / "t.onnx"
    path.write_bytes(softmax_model("Softmax", (2, 8)).SerializeToString()[:-7])
    with pytest.raises(tvmsoftmax.ModelError, match="t.onnx"):
        tvmsoftmax.compile(path)


def test_missing_file():
    with pytest.raises(tvmsoftmax.ModelError, match="no such model file"):
        tvmsoftmax.compile("/nonexistent/model.onnx")


def test_invalid_model():
    model = softmax_model("Softmax", (2, 8))
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(tvmsoftmax.ModelError, match="not a valid ONNX model"):
        tvmsoftmax.compile(model)


def test_unsupported_operator_names_the_node():
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["s"]),
         helper.make_node("MyCustomOp", ["s"], ["y"], name="the_custom_node", domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    with pytest.raises(tvmsoftmax.UnsupportedOperatorError, match="'the_custom_node'.*com.example.MyCustomOp"):
        tvmsoftmax.compile(model)


def test_bad_shapes_argument():
    with pytest.raises(tvmsoftmax.InputError, match="inputs are: x"):
        tvmsoftmax.compile(softmax_model("Softmax", (2, 8), symbolic=True), shapes={"nope": [1, 2]})
    with pytest.raises(tvmsoftmax.InputError, match="rank 2"):
        tvmsoftmax.compile(softmax_model("Softmax", (2, 8), symbolic=True), shapes={"x": [1, 2, 3]})
    with pytest.raises(tvmsoftmax.InputError, match="fixed to 8"):
        tvmsoftmax.compile(softmax_model("Softmax", (2, 8)), shapes={"x": [2, 9]})


def test_unknown_algorithm_and_target():
    with pytest.raises(tvmsoftmax.TvmSoftmaxError, match="unknown algorithm"):
        tvmsoftmax.compile(softmax_model("Softmax", (2, 8)), algorithm="four-pass")
    with pytest.raises(tvmsoftmax.TvmSoftmaxError, match="unknown target"):
        tvmsoftmax.compile(softmax_model("Softmax", (2, 8)), target="tpu")


def test_feeds(compiled):
    x = np.zeros((2, 8), np.float32)
    compiled.run({"x": x})  # an accepted call first: its checks are remembered, not skipped for others
    with pytest.raises(tvmsoftmax.InputError, match="missing input.*'x'"):
        compiled.run({})
    with pytest.raises(tvmsoftmax.InputError, match="unknown input.*'X'.*inputs are: x"):
        compiled.run({"X": x})
    with pytest.raises(tvmsoftmax.InputError, match="unknown input.*'extra'"):
        compiled.run({"x": x, "extra": x})
    with pytest.raises(tvmsoftmax.InputError, match="expected dtype float32, got float64"):
        compiled.run({"x": x.astype(np.float64)})
    with pytest.raises(tvmsoftmax.InputError, match="expected rank 2"):
        compiled.run({"x": x[None]})
    with pytest.raises(tvmsoftmax.InputError, match="dim 1 must be 8"):
        compiled.run({"x": np.zeros((2, 9), np.float32)})


def test_symbolic_dims_must_agree():
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Softmax", ["s"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    compiled = tvmsoftmax.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    compiled.run({"a": np.zeros((2, 4), np.float32), "b": np.zeros((2, 4), np.float32)})
    with pytest.raises(tvmsoftmax.InputError, match=r"dim 0 \(n\) is 3 here but 2"):
        compiled.run({"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 4), np.float32)})


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tvmsoftmax.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_errors_are_one_line(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello")
    for args in (["check", str(junk)], ["compile", str(junk), "-o", str(tmp_path / "o.tvmsm")],
                 ["run", str(junk)], ["inspect", str(tmp_path / "missing.onnx")]):
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert "Traceback" not in result.stderr


def test_cli_compile_run_check_inspect(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(softmax_model("LogSoftmax", (3, 50), symbolic=True), model_path)
    artifact = tmp_path / "m.tvmsm"
    result = _cli("compile", str(model_path), "-o", str(artifact), "--algorithm", "online", "--shape", "x=3,50")
    assert result.returncode == 0, result.stderr
    assert artifact.is_file() and "online" in result.stdout
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # run works on a runtime-only host
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    result = _cli("run", str(artifact), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path / "y.npz"), env=env)
    assert result.returncode == 0, result.stderr
    y = np.load(tmp_path / "y.npz")["y"]
    shifted = x.astype(np.float64) - x.max(1, keepdims=True)
    np.testing.assert_allclose(y, shifted - np.log(np.exp(shifted).sum(1, keepdims=True)), rtol=1e-5, atol=1e-6)
    result = _cli("check", str(model_path), "--shape", "x=3,50", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0 and "pass" in result.stdout, result.stdout + result.stderr
    result = _cli("check", str(model_path), "--shape", "x=3,50", "--atol", "0", "--rtol", "0")
    assert result.returncode in (0, 1)  # exit 1 is the failure status, never a crash
    result = _cli("inspect", str(model_path))
    assert result.returncode == 0 and "LogSoftmax" in result.stdout and "three-pass-recompute" in result.stdout


def test_sequence_input_refused_by_name():
    """Compiled models take and return tensors: a sequence-typed input is named, not a KeyError."""
    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node("SequenceAt", ["xs", "i"], ["y"])
    graph = helper.make_graph([node], "g", [seq], [y], initializer=[helper.make_tensor("i", TensorProto.INT64, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(tvmsoftmax.ModelError, match="graph input 'xs' has sequence_type, not a typed tensor"):
        tvmsoftmax.compile(model)


def test_float8_fnuz_types_refused_by_name():
    """TVM 0.27 has no float8 FNUZ types and read them as its own float8 (wrong values, silently)."""
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FNUZ)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FNUZ, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    with pytest.raises(tvmsoftmax.ModelError, match="'y' is float8e4m3fnuz, a type TVM does not have"):
        tvmsoftmax.compile(model)


def test_check_names_onnxruntime_when_it_cannot_run_the_model():
    """A valid model onnxruntime refuses (here: RotaryEmbedding-23 with a cos/sin cache for one
    batch broadcast over two, as torch's dynamo exporter writes it; the spec's shapes are
    numpy-broadcastable, onnxruntime 1.32 wants them equal): `check` says the reference could not
    run, instead of onnxruntime's traceback; the compiled model runs and matches the rotation."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 8])
    cos = helper.make_tensor_value_info("cos", TensorProto.FLOAT, [1, 3, 4])
    sin = helper.make_tensor_value_info("sin", TensorProto.FLOAT, [1, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 8])
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"])
    graph = helper.make_graph([node], "rotary", [x, cos, sin], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 4, 3, 8)).astype(np.float32)}
    angle = rng.uniform(0, 3, (1, 3, 4)).astype(np.float32)
    feeds.update(cos=np.cos(angle), sin=np.sin(angle))
    with pytest.raises(tvmsoftmax.ReferenceRunError, match=r"onnxruntime .*cannot run this model.*RotaryEmbedding"):
        tvmsoftmax.check(model, inputs=feeds)
    (got,) = tvmsoftmax.compile(model).run(feeds).values()
    half, c, s = feeds["x"][..., :4], feeds["cos"][:, None], feeds["sin"][:, None]  # [1, 1, 3, 4]
    other = feeds["x"][..., 4:]
    want = np.concatenate([half * c - other * s, other * c + half * s], axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
