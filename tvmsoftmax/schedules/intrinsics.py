"""Tensor intrinsics of the CPU schedules (`sch.tensorize` targets), registered on first use.

`transpose(lanes, dtype)`: C[i, j] = A[j, i] for a lanes x lanes tile (rows of A and C at any
stride, elements contiguous), implemented as `lanes` vector loads, log2(lanes) butterfly stages
of two-source shuffles and `lanes` vector stores. Stage s swaps bit s of the row index with bit s
of the column index: row r (bit s clear) takes its columns with that bit set from row r | 2^s,
and row r | 2^s takes its columns with that bit clear from row r. For 16 float32 lanes that is 64
shuffles per 256 elements (LLVM: vpermt2ps / vunpck*), where a vectorised loop can only store
the transposed elements one by one (vextractps + a store each).
"""

from __future__ import annotations

from tvm import s_tir, tirx


def _butterfly(rows: list, lanes: int) -> list:
    """The rows of the transposed tile, as shuffles of the loaded `rows` (see the docstring)."""
    bit = 1
    while bit < lanes:
        stage = []
        for r in range(lanes):
            if r & bit == 0:
                pair = [rows[r], rows[r | bit]]
                pick = [lanes + (c & ~bit) if c & bit else c for c in range(lanes)]
            else:
                pair = [rows[r & ~bit], rows[r]]
                pick = [lanes + c if c & bit else c | bit for c in range(lanes)]
            stage.append(tirx.Shuffle(pair, [tirx.const(p, "int32") for p in pick]))
        rows, bit = stage, bit * 2
    return rows


def _transpose_func(lanes: int, dtype: str, index_dtype: str, implementation: bool) -> tirx.PrimFunc:
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    def index(value: int) -> tirx.IntImm:
        return tirx.const(value, index_dtype)

    n = index(lanes)
    with IRBuilder() as builder:
        with T.prim_func(s_tir=True):
            T.func_name("transpose")
            a, c = T.arg("a", T.handle()), T.arg("c", T.handle())
            source = T.match_buffer(a, (n, n), dtype, strides=[tirx.Var("a_stride", index_dtype), index(1)],
                                    offset_factor=1)
            target = T.match_buffer(c, (n, n), dtype, strides=[tirx.Var("c_stride", index_dtype), index(1)],
                                    offset_factor=1)
            with T.sblock("root"):
                T.reads(source[0:lanes, 0:lanes])
                T.writes(target[0:lanes, 0:lanes])
                if implementation:
                    vector = tirx.Ramp(index(0), index(1), lanes)
                    rows = [tirx.BufferLoad(source, [index(r), vector]) for r in range(lanes)]
                    for r, row in enumerate(_butterfly(rows, lanes)):
                        T.buffer_store(target, row, [index(r), vector])
                else:
                    with T.grid(n, n) as (i, j):
                        with T.sblock("transpose"):
                            vi, vj = T.axis.remap("SS", [i, j])
                            T.buffer_store(target, tirx.BufferLoad(source, [vj, vi]), [vi, vj])
    return builder.get()


def transpose(lanes: int, dtype: str, index_dtype: str = "int64") -> str:
    """The name of the lanes x lanes transpose intrinsic for `dtype` elements and `index_dtype`
    loops (tensorize matches index expressions with their types; a power-of-two `lanes`)."""
    if lanes & (lanes - 1):
        raise ValueError(f"transpose intrinsic: lanes must be a power of two, got {lanes}")
    name = f"tvmsoftmax_transpose_{lanes}x{lanes}_{dtype}_{index_dtype}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is None:
        s_tir.TensorIntrin.register(name, *(_transpose_func(lanes, dtype, index_dtype, impl) for impl in (False, True)))
    return name
