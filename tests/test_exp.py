"""The vectorisable exp (tvmsoftmax.ops.exp) against float64 over the whole float32 range."""

import numpy as np
import pytest
import tvm
from tvm import te

from tvmsoftmax.ops.exp import FLUSH_BELOW, exp_nonpositive, fast_exp

ULP_BOUND_NORMAL = 2  # stated in tvmsoftmax/ops/exp.py and the README


def _build(spec, fn):
    n = tvm.tirx.Var("n", "int64")
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: fn(x[i]), name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    _, lanes = sch.split(loop, [None, spec.vector_lanes])
    sch.vectorize(lanes)  # the vectorised code is what the schedules use
    executable = tvm.compile(sch.mod, spec.tvm_target())

    def run(values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=np.float32)
        out = tvm.runtime.empty(values.shape, "float32", tvm.cpu())
        executable["main"](tvm.runtime.tensor(values), out)
        return out.numpy()

    return run


@pytest.fixture(scope="module")
def exp_kernel(x86_spec):
    return _build(x86_spec, fast_exp)


@pytest.fixture(scope="module")
def exp_nonpositive_kernel(x86_spec):
    return _build(x86_spec, exp_nonpositive)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 units in the last place (monotone integer mapping of the bits)."""
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, np.int64(-(2**31)) - ia, ia)
    ib = np.where(ib < 0, np.int64(-(2**31)) - ib, ib)
    return np.abs(ia - ib)


def test_exp_whole_range_ulp(exp_kernel):
    rng = np.random.default_rng(0)
    grid = np.linspace(-110.0, 90.0, 2_000_001, dtype=np.float64).astype(np.float32)
    random = rng.uniform(-104, 89, 1_000_000).astype(np.float32)
    x = np.concatenate([grid, random, np.float32([88.72283, 88.7228, -87.33654, -103.9720])])
    got = exp_kernel(x)
    want = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        want32 = want.astype(np.float32)  # correctly rounded float32 result (inf past FLT_MAX)
    normal = (want >= np.finfo(np.float32).tiny) & (want <= np.finfo(np.float32).max)
    ulps = ulp_distance(got[normal], want32[normal])
    assert ulps.max() <= ULP_BOUND_NORMAL, f"max {ulps.max()} ulp at x={x[normal][ulps.argmax()]}"
    # Subnormal results: within two subnormal steps of the true value (the 2-ulp bound on the
    # subnormal grid: near FLT_MIN the polynomial's relative error alone is 1.4 steps).
    sub = (want < np.finfo(np.float32).tiny) & (want > 0)
    step = np.float64(2.0**-149)
    worst = np.abs(got[sub].astype(np.float64) - want[sub]).max() / step
    assert worst <= 2.0, f"subnormal range: {worst:.2f} steps"
    # Overflow to +inf and underflow to exactly 0.
    assert np.all(np.isinf(got[want > np.finfo(np.float32).max]))
    assert np.all(got[x < -103.98] == 0.0)


def test_exp_special_values(exp_kernel):
    x = np.float32([-np.inf, np.inf, np.nan, 0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 3.4028235e38, -3.4028235e38])
    got = exp_kernel(x)
    assert got[0] == 0.0 and np.isposinf(got[1]) and np.isnan(got[2])
    assert got[3] == 1.0 and got[4] == 1.0
    assert abs(got[5] - np.float32(np.e)) <= np.spacing(np.float32(np.e))
    assert np.isposinf(got[7]) and got[8] == 0.0 and np.isposinf(got[9]) and got[10] == 0.0


def test_exp_nonpositive_ulp_and_flush(exp_nonpositive_kernel):
    x = np.concatenate([np.linspace(-90.0, 0.0, 2_000_001, dtype=np.float64).astype(np.float32),
                        -np.random.default_rng(1).exponential(10.0, 1_000_000).astype(np.float32)])
    got = exp_nonpositive_kernel(x)
    want = np.exp(x.astype(np.float64))
    normal = want >= np.finfo(np.float32).tiny
    ulps = ulp_distance(got[normal], want.astype(np.float32)[normal])
    assert ulps.max() <= ULP_BOUND_NORMAL, f"max {ulps.max()} ulp at x={x[normal][ulps.argmax()]}"
    assert np.all(got[x < np.float32(FLUSH_BELOW)] == 0.0)  # flushed like onnxruntime
    special = exp_nonpositive_kernel(np.float32([-np.inf, np.nan, 0.0, -0.0, -3.4028235e38]))
    assert special[0] == 0.0 and np.isnan(special[1]) and special[2] == 1.0 and special[3] == 1.0
    assert special[4] == 0.0


def test_model_exp_sigmoid_tanh_lowered_to_vector_exp():
    """Exp, Sigmoid and Tanh of a model (TVM lowers Sigmoid to exp) use `fast_exp` / `fast_tanh` on
    x86, not one glibc call per lane; results match onnxruntime and float64 over the whole
    float32 range, NaN and infinities included."""
    import onnx  # noqa: F401
    from conftest import run_ort
    from onnx import TensorProto, helper

    import tvmsoftmax

    f32 = TensorProto.FLOAT
    nodes = [helper.make_node(op, ["x"], [out]) for op, out in (("Exp", "e"), ("Sigmoid", "s"), ("Tanh", "t"))]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f32, [4096])],
                          [helper.make_tensor_value_info(n, f32, [4096]) for n in "est"]),
        opset_imports=[helper.make_opsetid("", 17)])
    compiled = tvmsoftmax.compile(model)
    modules = compiled._executable.mod._collect_from_import_tree(lambda module: module.kind == "llvm")
    code = "".join(module.inspect_source("asm") for module in modules)
    assert "vfmadd" in code and "expf" not in code
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-110, 95, 4000), [np.inf, -np.inf, np.nan, 0.0, -0.0, 88.7, -103.9, 1e-6],
                        rng.uniform(-1e-3, 1e-3, 88)]).astype(np.float32)
    got = compiled.run({"x": x})
    want = dict(zip("est", run_ort(model, {"x": x})))
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = {"e": np.exp(x64), "s": 1 / (1 + np.exp(-x64)), "t": np.tanh(x64)}
    for name in "est":
        g = got[name].astype(np.float64)
        rounded = ref[name].astype(np.float32).astype(np.float64)  # inf where float32 overflows
        np.testing.assert_array_equal(np.isnan(g), np.isnan(rounded), err_msg=name)
        finite = np.isfinite(rounded) & (np.abs(rounded) >= 1.2e-38)  # normal results
        infinite = np.isinf(rounded)
        np.testing.assert_array_equal(g[infinite], rounded[infinite], err_msg=name)
        # exp within 2 ulp of float64, Sigmoid (TVM's 1 / (1 + exp(-x))) and Tanh (onnxruntime's
        # rational approximation, `fast_tanh`) within 3 ulp, near 0 too.
        rtol = {"e": 2.5e-7, "s": 3e-7, "t": 3e-7}[name]
        np.testing.assert_allclose(g[finite], ref[name][finite], rtol=rtol, err_msg=name)
        np.testing.assert_allclose(g[finite], want[name].astype(np.float64)[finite], rtol=2 * rtol, atol=1e-7,
                                   err_msg=name)


def test_erf_within_three_ulp_and_exact_at_special_values(x86_spec):
    """`fast_erf` (what Erf and GELU's erf lower to on x86; TVM's was one glibc call per lane)
    against float64 over its whole range, both fitted pieces and the split between them, and a
    model's Erf against onnxruntime: within 3 ulp; NaN, +-inf, +-0 and subnormals exact."""
    import math

    from onnx import TensorProto, helper

    import tvmsoftmax
    from conftest import run_ort
    from tvmsoftmax.ops.exp import ERF_ONE, ERF_SPLIT, fast_erf

    run = _build(x86_spec, fast_erf)
    rng = np.random.default_rng(7)
    edges = [ERF_SPLIT, ERF_ONE, 3.9, 0.5, 1e-30, 1.5e-39]
    x = np.concatenate([np.linspace(-6, 6, 400_001), rng.uniform(-10, 10, 10_000), edges, np.negative(edges)])
    x = x.astype(np.float32)
    got = run(x)
    want = np.array([math.erf(v) for v in x.astype(np.float64)]).astype(np.float32)
    assert ulp_distance(got, want).max() <= 3
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40], np.float32)
    out = run(special)
    assert np.isnan(out[0]) and out[1] == 1.0 and out[2] == -1.0
    assert (np.signbit(out[3:]) == np.signbit(special[3:])).all() and (np.abs(out[3:5]) == 0).all()
    # a model: no erff call left in the code, onnxruntime's results within 3 ulp
    f32 = TensorProto.FLOAT
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Erf", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", f32, [x.size])],
        [helper.make_tensor_value_info("y", f32, [x.size])]), opset_imports=[helper.make_opsetid("", 17)])
    compiled = tvmsoftmax.compile(model)
    modules = compiled._executable.mod._collect_from_import_tree(lambda module: module.kind == "llvm")
    assert "erff" not in "".join(module.inspect_source("asm") for module in modules)
    y = compiled.run({"x": x})["y"]
    assert ulp_distance(y, run_ort(model, {"x": x})[0]).max() <= 3
