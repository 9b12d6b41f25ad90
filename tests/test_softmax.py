"""Every algorithm x {Softmax, LogSoftmax} x {float32, float16} x axis (first, middle, last),
through the whole compile path, on many shapes (one compile with symbolic dims serves them all),
against a float64 reference and onnxruntime; plus the edge-value battery with onnxruntime's
semantics and the long-row accuracy bound."""

import zlib

import numpy as np
import pytest

import tvmsoftmax
from conftest import TOLERANCES, assert_close, compiled_for, reference64, run_ort, softmax_model, workspace_calls

ALGORITHMS = ["three-pass", "three-pass-recompute", "two-pass", "online"]
OPS = ["Softmax", "LogSoftmax"]
# (axis, shapes): rank-3 inputs; shapes cover 1 element, odd lengths, 1 row and many rows.
AXES = {
    "first": (0, [(1, 1, 1), (37, 3, 5), (1001, 1, 1), (5, 64, 2)]),
    "middle": (1, [(1, 1, 1), (3, 37, 5), (1, 129, 1), (64, 17, 3)]),
    "last": (-1, [(1, 1, 1), (3, 5, 37), (1, 1, 4099), (64, 3, 257)]),
}

@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("axis_case", list(AXES))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matrix(algorithm, op, axis_case, dtype):
    axis, shapes = AXES[axis_case]
    model, compiled = compiled_for(algorithm, op, dtype, axis)
    (site,) = compiled.sites
    assert site["rewritten"] and site["lowered"]["algorithm"] == algorithm
    # crc32, not hash(): str hashes change per process, which made the data (and the test) vary.
    rng = np.random.default_rng(zlib.crc32(f"{algorithm}/{op}/{axis_case}/{dtype}".encode()))
    for shape in shapes:
        x = (rng.standard_normal(shape) * 4).astype(dtype)
        got = compiled.run({"x": x})["y"]
        assert got.dtype == np.dtype(dtype) and got.shape == x.shape
        want = reference64(x, axis, op == "LogSoftmax")
        tol = dict(TOLERANCES[dtype])
        if op == "LogSoftmax":
            # y = (x - max) - log(sum): log turns the sum's relative rounding error into an
            # absolute one. A row of L exps summed by at least 8 partial states carries up to
            # L/8 roundings of eps/2 each, so atol = eps * L / 16 (onnxruntime's own error is
            # 1.5e-6 on a 1001-element row, over the flat 1e-6 this replaces there).
            length = x.shape[axis]
            tol["atol"] = max(tol["atol"], float(np.finfo(dtype).eps) * length / 16)
        assert_close(got, want, what=f"{shape} vs float64", **tol)
        (ort,) = run_ort(model, {"x": x})
        assert_close(got, ort, what=f"{shape} vs onnxruntime", **tol)


FLT_MAX = float(np.finfo(np.float32).max)
EDGE_ROWS = {
    "all -inf": [-np.inf] * 8,
    "one finite + -inf": [0.5] + [-np.inf] * 7,
    "-FLT_MAX mask": [1.0, 2.0] + [-FLT_MAX] * 6,
    "all -FLT_MAX": [-FLT_MAX] * 8,
    "-1e4 mask": [3.0, -1e4, -1e4, 0.0, -1e4, -1e4, -1e4, 1.0],
    "-1e9 mask": [3.0, -1e9, -1e9, 0.0, -1e9, -1e9, -1e9, 1.0],
    "all -1e9": [-1e9] * 8,
    "-FLT_MAX and -inf": [-FLT_MAX, -np.inf] * 4,
    "+inf": [1.0, np.inf, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0],
    "NaN": [1.0, np.nan, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0],
    "range 100": [100.0, -100.0, 0.0, 50.0, -50.0, 99.0, 1.0, -1.0],
    "range 1000": [1000.0, -1000.0, 0.0, 500.0, 999.0, -999.0, 998.5, 10.0],
    "large equal": [88.0] * 8,
}
# Two-pass never computes the row max. For LogSoftmax that leaves rows whose max is below
# -SPLIT_LIMIT (-90000) without a finite shift, so it cannot reproduce onnxruntime's
# x - max - log(sum) there (documented in the README's limits). Softmax is unaffected.
TWO_PASS_LOG_LIMIT = {"all -FLT_MAX", "all -1e9", "-FLT_MAX and -inf"}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_edge_values_match_onnxruntime(algorithm, op):
    model, compiled = compiled_for(algorithm, op, "float32", -1, rank=2)
    names = [n for n in EDGE_ROWS if not (algorithm == "two-pass" and op == "LogSoftmax" and n in TWO_PASS_LOG_LIMIT)]
    x = np.array([EDGE_ROWS[n] for n in names], dtype=np.float32)
    got = compiled.run({"x": x})["y"]
    (ort,) = run_ort(model, {"x": x})
    for row, name in enumerate(names):
        assert_close(got[row], ort[row], rtol=1e-5, atol=1e-6, what=f"{algorithm} {op} row '{name}'")
    # The semantics spelled out (onnxruntime's): NaN rows, masked zeros, uniform masked rows.
    out = dict(zip(names, got))
    assert np.all(np.isnan(out["all -inf"])) and np.all(np.isnan(out["+inf"])) and np.all(np.isnan(out["NaN"]))
    if op == "Softmax":
        assert out["one finite + -inf"][0] == 1.0 and np.all(out["one finite + -inf"][1:] == 0.0)
        np.testing.assert_allclose(out["all -1e9"], 1 / 8, rtol=1e-6)
        np.testing.assert_allclose(out["all -FLT_MAX"], 1 / 8, rtol=1e-6)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_float16_overflow_and_masks(algorithm, op):
    """float16 I/O accumulates in float32: exp(11) overflows float16 but the result is right."""
    model, compiled = compiled_for(algorithm, op, "float16", -1, rank=2)
    x = np.array(
        [[11.0, 10.0, 9.0, -5.0], [60000.0, 60000.0, 0.0, -60000.0], [0.0, -np.inf, -np.inf, -np.inf], [-65504.0] * 4],
        dtype=np.float16,
    )
    got = compiled.run({"x": x})["y"]
    (ort,) = run_ort(model, {"x": x})
    assert_close(got, ort, rtol=2e-3, atol=1e-3, what=f"{algorithm} {op} float16")
    assert np.all(np.isfinite(got[0]))


@pytest.mark.parametrize("length", [1 << 17, (1 << 17) + 37], ids=["whole-steps", "with-tail"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_long_row_split_across_cores(algorithm, op, length):
    """A single static row of 2^17 elements is split across the cores (each reduces a chunk, the
    chunk states are merged): against float64 and onnxruntime, with a masked first half (its
    chunk states are all -inf) and a NaN-free huge range in the second."""
    from tvmsoftmax.schedules import x86
    from tvmsoftmax.lowering.targets import resolve

    spec = resolve("x86")
    _, knobs = x86.choose(algorithm, op == "LogSoftmax", [1, length, 1], spec.vector_lanes, spec.num_cores)
    if knobs.splits == 1:
        pytest.skip("one core: rows are not split")
    model = softmax_model(op, (1, length))
    compiled = tvmsoftmax.compile(model, algorithm=algorithm)
    assert compiled.sites[0]["lowered"]["knobs"]["splits"] == spec.num_cores
    x = (np.random.default_rng(length).standard_normal((1, length)) * 30).astype(np.float32)
    x[0, : length // 2] = -np.inf
    got = compiled.run({"x": x})["y"]
    (ort,) = run_ort(model, {"x": x})
    tol = dict(rtol=1e-5, atol=max(1e-6, np.finfo(np.float32).eps * length / 16))
    assert_close(got, reference64(x, -1, op == "LogSoftmax"), what="vs float64", **tol)
    assert_close(got, ort, what="vs onnxruntime", **tol)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_long_row_accuracy(algorithm):
    """One row of 1<<24 elements: relative error at most 1e-5 against float64."""
    model, compiled = compiled_for(algorithm, "Softmax", "float32", -1, rank=2)
    x = np.random.default_rng(1).standard_normal((1, 1 << 24)).astype(np.float32)
    got = compiled.run({"x": x})["y"].astype(np.float64)
    want = reference64(x, -1, False)
    rel = np.abs(got - want) / want
    assert rel.max() <= 1e-5, f"max relative error {rel.max():.3g}"


def test_three_pass_row_buffer_on_the_stack():
    """A row's stored exponentials (three-pass, 1024 floats) are a stack array of the parallel
    task under the models' TIR pipeline, not a TVMBackendAllocWorkspace/FreeWorkspace pair per row
    (what TVM's default pipeline does with a 4 KiB buffer); the kernel stays right."""
    from tvmsoftmax.lowering.kernels import SoftmaxKernel
    from tvmsoftmax.lowering.pipeline import TIR_PIPELINE
    from tvmsoftmax.lowering.targets import resolve

    spec, view = resolve("x86"), (64, 1024, 1)
    kernel = SoftmaxKernel(view, algorithm="three-pass", spec=spec)
    x = (np.random.default_rng(3).standard_normal(view) * 3).astype(np.float32)
    assert_close(kernel(x)[..., 0], reference64(x[..., 0], axis=-1, log=False), **TOLERANCES["float32"], what="three-pass")
    assert workspace_calls(kernel.func, spec.tvm_target(), "default") >= 1
    assert workspace_calls(kernel.func, spec.tvm_target(), TIR_PIPELINE) == 0


def _prefetched_block(func, rows: int) -> str | None:
    """Name of the block whose loop carries the kernel's prefetch (the first block after the
    llvm.prefetch call in the TIR), None if the kernel has none; asserts there is at most one and
    that it reads the next of `rows` rows, clamped to the last."""
    lines = func.script().splitlines()
    at = [n for n, line in enumerate(lines) if "llvm.prefetch" in line]
    assert len(at) <= 1, f"{len(at)} prefetches"
    if not at:
        return None
    assert f"+ 1, {rows - 1})" in lines[at[0]], lines[at[0]]
    return next(line.split('"')[1] for line in lines[at[0]:] if "T.sblock(" in line)


@pytest.mark.parametrize("algorithm, op, block", [
    ("three-pass", "Softmax", "softmax_exp"),  # its last pass over x stores the exponentials
    ("three-pass-recompute", "LogSoftmax", "softmax"),  # the output pass (block "softmax") reads x
    ("online", "Softmax", None),  # first passes compute exponentials: no gain measured
    ("two-pass", "Softmax", None),
])
def test_next_row_prefetch(algorithm, op, block):
    """Contiguous rows shorter than LONG_ROW: the three-pass algorithms prefetch the next row in
    their last pass over the input (one llvm.prefetch per vector, row clamped to the last);
    outputs are bitwise those of the kernel without it, on whole vectors, odd rows (a scalar tail,
    the prefetching loop in the copy of the block over the whole vectors) and one row (nothing to
    prefetch)."""
    import dataclasses

    from tvmsoftmax.lowering.kernels import SoftmaxKernel
    from tvmsoftmax.lowering.targets import resolve
    from tvmsoftmax.schedules import x86

    spec = resolve("x86")
    log = op == "LogSoftmax"
    for view in [(37, 1024, 1), (37, 1000, 1), (1, 1000, 1)]:
        kernel = SoftmaxKernel(view, algorithm=algorithm, log=log, spec=spec)
        got = _prefetched_block(kernel.func, view[0])
        if block is None or view[0] == 1:
            assert got is None, view
        else:
            assert got == block or (view[1] % 16 and got is not None), (view, got)
        assert (kernel.knobs.prefetch == "l1") == (block is not None)
        plain = SoftmaxKernel(view, algorithm=algorithm, log=log, spec=spec,
                              knobs=dataclasses.replace(kernel.knobs, prefetch="off"))
        assert _prefetched_block(plain.func, view[0]) is None
        x = (np.random.default_rng(view[0]).standard_normal(view) * 5).astype(np.float32)
        x[1 % view[0], :7] = -np.inf
        got = kernel(x)
        np.testing.assert_array_equal(got, plain(x))
        assert_close(got[..., 0], reference64(x[..., 0], axis=-1, log=log), **TOLERANCES["float32"], what=algorithm)
    _, long_rows = x86.choose(algorithm, log, [8, x86.LONG_ROW, 1], spec.vector_lanes, spec.num_cores)
    assert long_rows.prefetch == "off"  # rows of 32 KiB and more: no gain, losses with online
