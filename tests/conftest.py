"""Shared helpers: one-node ONNX models, onnxruntime (optimisations off) and float64 references."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

warnings.filterwarnings("ignore")

# Tolerances per dtype against the float64 reference and onnxruntime (stated in the README).
TOLERANCES = {"float32": dict(rtol=1e-5, atol=1e-6), "float16": dict(rtol=2e-3, atol=1e-3)}
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def softmax_model(op: str, shape, axis=None, opset: int = 13, dtype: str = "float32", symbolic=False):
    """A one-node Softmax/LogSoftmax model; `symbolic` makes every dim a named dynamic dim."""
    attrs = {} if axis is None else {"axis": axis}
    dims = [f"d{i}" for i in range(len(shape))] if symbolic else list(shape)
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], name=f"{op.lower()}_node", **attrs)],
        "g",
        [helper.make_tensor_value_info("x", ONNX_DTYPES[dtype], dims)],
        [helper.make_tensor_value_info("y", ONNX_DTYPES[dtype], dims)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def reference64(x: np.ndarray, axis: int, log: bool, coerce_2d: bool = False) -> np.ndarray:
    """float64 softmax/log-softmax (max-subtracted, log-sum-exp) in the ONNX opset's semantics."""
    a = x.astype(np.float64)
    shape = a.shape
    if coerce_2d:
        axis = axis % a.ndim
        a = a.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1)
        axis = 1
    m = np.max(a, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = a - m
        s = np.sum(np.exp(shifted), axis=axis, keepdims=True)
        out = shifted - np.log(s) if log else np.exp(shifted) / s
    return out.reshape(shape)


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float, atol: float, what: str = ""):
    """Elementwise |got - want| <= atol + rtol |want|; NaN/inf must match exactly. Reports errors."""
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    np.seterr(invalid="ignore")
    finite = np.isfinite(got64) & np.isfinite(want64)
    same = (np.isnan(got64) & np.isnan(want64)) | (got64 == want64)
    assert np.all(finite | same), f"{what}: NaN/inf mismatch at {np.argwhere(~(finite | same))[:5].tolist()}"
    diff = np.abs(got64 - want64)[finite]
    bound = atol + rtol * np.abs(want64[finite])
    worst = float(diff.max()) if diff.size else 0.0
    rel = float((diff / np.maximum(np.abs(want64[finite]), 1e-300)).max()) if diff.size else 0.0
    assert np.all(diff <= bound), f"{what}: max abs err {worst:.3g}, max rel err {rel:.3g} (rtol {rtol}, atol {atol})"


_COMPILED: dict = {}


def compiled_for(algorithm: str, op: str, dtype: str, axis: int, rank: int = 3, opset: int = 13):
    """(model, CompiledModel) of a one-node model with symbolic dims, compiled once per session."""
    import tvmsoftmax

    key = (algorithm, op, dtype, axis, rank, opset)
    if key not in _COMPILED:
        model = softmax_model(op, (1,) * rank, axis=axis, dtype=dtype, symbolic=True, opset=opset)
        _COMPILED[key] = (model, tvmsoftmax.compile(model, algorithm=algorithm))
    return _COMPILED[key]


@pytest.fixture(scope="session")
def x86_spec():
    from tvmsoftmax.lowering.targets import resolve

    return resolve("x86")


def assert_case_outputs(compiled, case) -> None:
    """Every data set of an onnx conformance `case` run through `compiled`: each output's shape,
    and its values within the case's own tolerance."""
    names = [i.name for i in case.model.graph.input]
    for inputs, outputs in case.data_sets:
        got = compiled.run(dict(zip(names, inputs)))
        assert len(got) == len(outputs)
        for (name, value), want in zip(got.items(), outputs):
            assert value.shape == want.shape, name
            np.testing.assert_allclose(value, want, rtol=case.rtol, atol=case.atol, err_msg=f"{case.name} {name}")


def workspace_calls(func, target, pipeline) -> int:
    """TVMBackendAllocWorkspace calls in the LLVM IR of `func` built by `pipeline` ("default" or
    the models' TIR pipeline): the buffers that are not stack arrays."""
    import tvm

    ir = tvm.compile(func, target=target, tir_pipeline=pipeline).mod.inspect_source("ll")
    return ir.count("load ptr, ptr @__TVMBackendAllocWorkspace")
