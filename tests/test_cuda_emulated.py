"""The CUDA kernels we generate, *run* on this CPU (no GPU here): `cuda_emulator` builds the exact
CUDA source TVM emits as host code and runs each thread block as concurrent threads with real
barriers and warp shuffles. Checked against the float64 references, with the tolerances of the
x86 tests (float32 1e-5; float16/bfloat16 I/O 2e-3 for attention, TOLERANCES for softmax) and
NaN/inf positions exactly (onnxruntime's semantics).

What this proves: the schedules' indexing, thread mapping, register/shared scopes, barriers and
cross-thread reductions compute the right thing. What it cannot: speed, or anything about a real
GPU's memory model beyond barriers (see benchmarks/gpu_check.py for the GPU host).
"""

import numpy as np
import pytest
from attention_reference import reference
from conftest import TOLERANCES, assert_close, reference64
from cuda_emulator import run_cuda_on_cpu
from test_attention import CASES, _close, _problem
from tvm import te
from tvm.script import tirx as T

from tvmsoftmax.lowering import device_code
from tvmsoftmax.lowering.targets import resolve
from tvmsoftmax.ops.attention import AttentionSpec, flash_attention
from tvmsoftmax.ops.softmax import softmax
from tvmsoftmax.schedules import cuda, cuda_attention

pytestmark = pytest.mark.skipif(device_code.nvcc_path() is None, reason="the emulator builds the CUDA source with nvcc")

ALGORITHMS = ["three-pass", "three-pass-recompute", "two-pass", "online"]


def _target():
    return resolve("cuda", arch="sm_90").tvm_target()


def _run_flash(spec, arrays, dims=None):
    q, k = arrays[0], arrays[1]
    dims = dims or {"batch": q.shape[0], "q_len": q.shape[2], "kv_len": k.shape[2]}
    _, knobs = cuda_attention.choose("auto", dims, spec)
    func = cuda_attention.schedule_flash(flash_attention(spec, knobs.tiling(), dims), knobs)
    names = [str(p.name) for p in func.params]
    feeds = dict(zip(names[:-1], arrays))
    return run_cuda_on_cpu(func, _target(), feeds, ["y"])["y"], knobs


@pytest.mark.parametrize("name", list(CASES))
def test_flash_cuda_matches_reference(name):
    """Every mask form and edge case of the x86 flash tests (GQA, causal both alignments, softcap,
    -inf/-FLT_MAX/-1e9 masks with fully masked rows and tiles, bool masks, kv lengths, inf/NaN
    inputs), 37 queries x 45 keys: partial query blocks and key tiles."""
    spec, arrays, kwargs = _problem(name)
    got, _ = _run_flash(spec, arrays)
    _close(got, reference(*arrays[:3], spec, **kwargs), spec.dtype, name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flash_cuda_half_inputs_float32_accumulation(dtype):
    import ml_dtypes

    spec, arrays, kwargs = _problem("causal-bottom-right", dtype="float32", sq=70, skv=90)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    arrays = [a.astype(np_dtype) for a in arrays]
    spec = AttentionSpec(**{**spec.to_json(), "dtype": dtype})
    got, _ = _run_flash(spec, arrays)
    want = reference(*[a.astype(np.float32) for a in arrays[:3]], spec, **kwargs)
    tol = 2e-3 if dtype == "float16" else 1.6e-2  # bfloat16 output: 8 mantissa bits (3.9e-3 ulp at 0.5)
    err = np.nanmax(np.abs(got.astype(np.float64) - want))
    assert np.allclose(got.astype(np.float64), want, rtol=tol, atol=tol), f"max abs err {err:.3g}"


TENSOR_CORE_CASES = ["causal-bottom-right", "gqa-causal-softcap", "neg-inf-mask-attention23", "kv-lengths-causal",
                     "select-mask", "poison-inf-nan"]


# bfloat16 runs the same tensor-core code as float16 with other WMMA intrinsics: one case in the
# default suite, the rest with the slow ones (CI time)
TENSOR_CORE_PARAMS = [
    pytest.param(name, dtype, id=f"{name}-{dtype}",
                 marks=pytest.mark.slow if dtype == "bfloat16" and name != "causal-bottom-right" else ())
    for name in TENSOR_CORE_CASES for dtype in ("float16", "bfloat16")
]


@pytest.mark.parametrize("name,dtype", TENSOR_CORE_PARAMS)
def test_flash_cuda_tensor_cores(name, dtype):
    """16-bit inputs with head sizes that are multiples of 16 run both inner products on tensor
    cores (WMMA fragments, float32 sums; P rounded to the input dtype as FlashAttention does):
    mask forms, fully masked rows, GQA, softcap, kv lengths, inf/NaN inputs; 70 queries x 90 keys
    (partial query blocks and key tiles), head sizes 32 and 48."""
    import ml_dtypes

    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    spec, arrays, kwargs = _problem(name, sq=70, skv=90, d=32, dv=48)
    arrays = [a.astype(np_dtype) if a.dtype == np.float32 else a for a in arrays]
    kwargs = {key: (value.astype(np_dtype) if value.dtype == np.float32 else value) for key, value in kwargs.items()}
    overrides = {"dtype": dtype, **({"bias_dtype": dtype} if spec.bias_dtype else {})}
    spec = AttentionSpec(**{**spec.to_json(), **overrides})
    got, knobs = _run_flash(spec, arrays)
    assert knobs.tensor_cores and knobs.operand_dtype == dtype
    wide = lambda a: a.astype(np.float32) if a.dtype == np_dtype else a  # noqa: E731
    want = reference(*[wide(a) for a in arrays[:3]], spec, **{key: wide(value) for key, value in kwargs.items()})
    tol = 2e-3 if dtype == "float16" else 1.6e-2  # bfloat16: 8 mantissa bits in P and in the output
    got = got.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name} {dtype}: NaN positions differ"
    err = np.nanmax(np.abs(got - want))
    assert (np.isclose(got, want, rtol=tol, atol=tol) | np.isnan(want)).all(), f"{name} {dtype}: max abs err {err:.3g}"


def test_flash_cuda_wide_heads_smaller_tiles():
    """Head size 128, MQA (8 query heads on one key/value head), float32: the 48 KiB shared-memory
    budget gives 16-row query blocks and 32-key tiles."""
    rng = np.random.default_rng(1)
    spec = AttentionSpec(q_heads=8, kv_heads=1, head_size=128, v_head_size=128, scale=128 ** -0.5, causal=1)
    q = rng.standard_normal((1, 8, 40, 128)).astype(np.float32)
    k = rng.standard_normal((1, 1, 40, 128)).astype(np.float32)
    v = rng.standard_normal((1, 1, 40, 128)).astype(np.float32)
    got, knobs = _run_flash(spec, [q, k, v])
    assert (knobs.query_block, knobs.key_block) == (16, 32)
    _close(got, reference(q, k, v, spec), "float32", "d128 mqa")


def _edge_rows(rows: int, length: int, rng) -> np.ndarray:
    x = (rng.standard_normal((rows, length)) * 4).astype(np.float32)
    x[0] = -np.inf  # NaN row
    x[1, ::2] = -1e9
    x[2] = -np.finfo(np.float32).max
    x[3, 5] = np.inf  # NaN row
    x[4, 7] = np.nan  # NaN row
    x[5] *= 1e4  # huge range
    x[6, : length // 2] = -np.inf
    return x


@pytest.mark.parametrize("log", [False, True], ids=["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("view,dtype", [((8, 300, 1), "float32"), ((8, 4096, 1), "float16"), ((4, 200, 3), "float32"),
                                        ((8, 1 << 17, 1), "float32"), ((8, 6 << 14, 1), "float16"),
                                        ((8, 32000, 1), "float32"), ((8, 100004, 1), "float16"),
                                        ((8, 70001, 1), "float32")],
                         ids=["warp-per-row", "vector4-fp16", "strided-axis", "split-rows", "split-rows-6-fp16",
                              "vector4-64-threads", "ragged-split-rows-fp16", "ragged-split-rows-odd"])
def test_softmax_cuda_matches_reference(algorithm, log, view, dtype):
    """Each algorithm's CUDA schedule: a warp per row (4 rows per block), a 256-thread block with
    4-wide vector loads in float16, a strided axis, rows split across 8 blocks (a tree across the
    chunk states) and across 6 (a tree level, then a merge of 3), 64 threads of 4-wide loads for
    a 32000 row, ragged splits (no whole chunks: the row's tail folded into the chunk states;
    4-wide float16 loads, and 1-wide for an odd length); edge rows (-inf, -1e9, -FLT_MAX,
    +inf, NaN, huge range, half -inf)."""
    if algorithm == "three-pass" and view[1] > cuda.SHARED_ROW_LIMIT:
        pytest.skip("three-pass keeps a row in shared memory")
    chosen, knobs = cuda.choose(algorithm, log, list(view))
    assert knobs.splits == {1 << 17: 8, 6 << 14: 6, 100004: 6, 70001: 4}.get(view[1], 1)
    assert knobs.ragged == (view[1] in (100004, 70001))  # no whole chunks: the tail folded into the states
    assert (knobs.threads, knobs.vector) == {32000: (64, 4)}.get(view[1], (knobs.threads, knobs.vector))
    x = te.placeholder(view, dtype, name="x")
    y = softmax(x, algorithm=chosen, log=log, partitioning=knobs.partitioning(view[2] == 1))
    func = cuda.schedule_softmax(te.create_prim_func([x, y]), knobs)
    rng = np.random.default_rng(view[1])
    rows = _edge_rows(view[0] * view[2], view[1], rng)  # [rows, length] -> the [outer, length, inner] view
    data = rows.reshape(view[0], view[2], view[1]).transpose(0, 2, 1).astype(dtype)
    out_name = str(func.params[-1].name)
    got = run_cuda_on_cpu(func, _target(), {"x": data}, [out_name])[out_name]
    want = reference64(data.astype(np.float32), axis=1, log=log)
    if algorithm == "two-pass" and log:  # the documented limit (README, test_softmax): no finite
        o, i = divmod(2, view[2])  # shift for the all -FLT_MAX row (row 2)
        want[o, :, i] = got[o, :, i]
    assert_close(got, want, **TOLERANCES[dtype], what=f"{algorithm} {view} {dtype}")


def _accumulate_per_block(guarded: bool):
    """y[b] += x[b, 0] after a 64-thread stage: a unit loop bound to threadIdx.x (what the split-row
    schedule once did: TVM launches 64 threads and does not guard it, so all 64 run the
    read-modify-write), or a 64-wide binding predicated to thread 0."""
    if guarded:
        @T.prim_func(s_tir=True)
        def func(x: T.Buffer((4, 64), "float32"), y: T.Buffer((4,), "float32")):
            for b in T.thread_binding(4, thread="blockIdx.x"):
                for t in T.thread_binding(64, thread="threadIdx.x"):
                    with T.sblock("total"):
                        vb = T.axis.spatial(4, b)
                        T.where(t < 1)
                        y[vb] = y[vb] + x[vb, 0]
    else:
        @T.prim_func(s_tir=True)
        def func(x: T.Buffer((4, 64), "float32"), y: T.Buffer((4,), "float32")):
            for b in T.thread_binding(4, thread="blockIdx.x"):
                for t in T.thread_binding(64, thread="threadIdx.x"):
                    with T.sblock("scale"):
                        vb, vt = T.axis.remap("SS", [b, t])
                        x[vb, vt] = x[vb, vt] * T.float32(2)
                for u in T.thread_binding(1, thread="threadIdx.x"):
                    with T.sblock("total"):
                        vb = T.axis.spatial(4, b)
                        y[vb] = y[vb] + x[vb, 0]
    return func


def test_emulator_refuses_a_store_every_thread_makes_to_one_address():
    """The static check behind every emulated run: the unguarded per-block accumulation is
    reported (by buffer and thread tag) and refused before it runs; guarded by threadIdx.x < 1 it
    runs, and y = x[:, 0] * 1 from zeros."""
    data = np.arange(256, dtype=np.float32).reshape(4, 64)
    with pytest.raises(AssertionError, match=r"same global/shared address.*\('y', \['threadIdx.x'\]\)"):
        run_cuda_on_cpu(_accumulate_per_block(False), _target(), {"x": data, "y": np.zeros(4, np.float32)}, ["y"])
    got = run_cuda_on_cpu(_accumulate_per_block(True), _target(), {"x": data, "y": np.zeros(4, np.float32)}, ["y"])["y"]
    np.testing.assert_array_equal(got, data[:, 0])


@pytest.mark.parametrize("algorithm", ALGORITHMS[1:])
def test_split_rows_state_written_by_one_thread(algorithm):
    """Regression (CI failed now and then on split-rows two-pass): the chunk state of a split row is
    a read-modify-write of global memory, once per tree state; it must be made by one thread of
    the chunk's block, not by all of them (which double-counted states when warps interleaved)."""
    from cuda_emulator import _kernels

    view = (8, 1 << 17, 1)
    chosen, knobs = cuda.choose(algorithm, False, list(view))
    assert knobs.splits > 1
    x = te.placeholder(view, "float32", name="x")
    y = softmax(x, algorithm=chosen, partitioning=knobs.partitioning(True))
    _, kernels = _kernels(cuda.schedule_softmax(te.create_prim_func([x, y]), knobs), _target())  # raises on a race
    # chunk states and row merge per reduction (two for three-pass's max then sum), output
    assert len(kernels) == {"three-pass-recompute": 5}.get(algorithm, 3)
