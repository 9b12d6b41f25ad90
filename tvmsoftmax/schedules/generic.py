"""A generic x86 rule for the rest of a model (the kernels TVM legalizes for non-softmax ops).

TVM 0.27's default Relax pipeline leaves those kernels unscheduled on llvm (one thread, scalar).
This rule gives every root block of such a PrimFunc: the outer spatial loops fused and parallel
(unless the block is small, `PARALLEL_MIN_ITERATIONS`),
the innermost spatial loop vectorised (by the widest of lanes, lanes/2, lanes/4 that divides it);
for a matmul-like block (reduction loops innermost, two or more inputs: matmul, convolution) the
reduction loops are moved outside the last spatial loop first, so that loop vectorises over
contiguous output columns; a matmul with static extents gets register tiles (`_register_tiled`).
A block the rule cannot handle is left as it is.
It is a baseline, not a tuned schedule (whole-model speed is its own issue).
"""

from __future__ import annotations

from tvm import s_tir, tirx

from ._tir import static_extent

_DATA_PAR, _REDUCE = 0, 2
# Blocks of fewer loop iterations than this run on one thread (see `_schedule_block`).
PARALLEL_MIN_ITERATIONS = 1 << 16


def _iterations(sch: s_tir.Schedule, loops) -> int | None:
    total = 1
    for loop in loops:
        extent = static_extent(sch.get(loop).extent)
        if extent is None:
            return None
        total *= extent
    return total


def _vector_width(extent: int, lanes: int) -> int | None:
    """The widest of lanes, lanes/2, lanes/4 (at least 4) that divides `extent` (56 output
    columns: 8 lanes on AVX-512, 7 vectors), None if none does."""
    return next((w for w in (lanes, lanes // 2, lanes // 4) if w >= 4 and extent % w == 0), None)


# Register tile of a matmul: up to TILE_ROWS output rows x TILE_VECTORS vectors of columns.
TILE_ROWS, TILE_VECTORS = 4, 4


def _register_tiled(sch: s_tir.Schedule, block, spatial, reduce, lanes: int, parallel: bool) -> bool:
    """A matmul (one reduction, static row and column extents, whole vectors of columns) as
    register tiles: rows x (vectors of columns) accumulators in a block-local buffer (registers
    once unrolled), the reduction outside them, each row's value broadcast against a vector of the
    other operand's row; written back once per tile. Each output's sum keeps its order.
    Returns False (nothing changed) where it does not apply. Convolutions are not tiled: tried
    (output rows x vectors of columns, sharing the weights), VGG-19 ran 15% slower, ResNet-50 level."""
    if len(reduce) != 1 or len(spatial) < 2:
        return False
    row, column = spatial[-2], spatial[-1]
    rows, columns = static_extent(sch.get(row).extent), static_extent(sch.get(column).extent)
    if rows is None or columns is None or rows < 2:
        return False
    width = _vector_width(columns, lanes)
    if width is None:
        return False
    tile_rows = next(r for r in (TILE_ROWS, 2, 1) if rows % r == 0)
    tile_vectors = next(c for c in (TILE_VECTORS, 2, 1) if (columns // width) % c == 0)
    row_outer, row_inner = sch.split(row, [None, tile_rows])
    column_outer, column_vector, lane = sch.split(column, [None, tile_vectors, width])
    sch.reorder(*spatial[:-2], row_outer, column_outer, reduce[0], row_inner, column_vector, lane)
    if parallel:  # before the write-back block exists (its subtree is no longer a plain reduction)
        outer = [*spatial[:-2], row_outer]
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    writeback = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(writeback, column_outer, preserve_unit_loops=True)
    back_rows, back_columns = sch.get_loops(writeback)[-2:]
    back_vectors, back_lanes = sch.split(back_columns, [None, width])
    sch.vectorize(back_lanes)
    sch.unroll(back_vectors)
    sch.unroll(back_rows)
    sch.vectorize(lane)
    sch.unroll(column_vector)
    sch.unroll(row_inner)
    sch.decompose_reduction(block, reduce[0])
    return True


def _schedule_block(sch: s_tir.Schedule, block, lanes: int, tile: bool = True) -> None:
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if len(kinds) != len(loops) or any(k not in (_DATA_PAR, _REDUCE) for k in kinds) or not loops:
        return
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == _DATA_PAR]
    reduce = [loop for loop, kind in zip(loops, kinds) if kind == _REDUCE]
    if not spatial:
        return
    last = spatial[-1]
    # A parallel launch of TVM's thread pool costs microseconds (it re-reads the CPU count from
    # sysfs each time): more than a small block's work. An unrolled LSTM is a thousand kernels of
    # a few hundred elements; parallel, the launches were a quarter of its run time.
    iterations = _iterations(sch, loops)
    parallel = iterations is None or iterations >= PARALLEL_MIN_ITERATIONS
    # A product reduced over its innermost loops (matmul; convolution: channels x kernel window):
    # the reductions go outside the last spatial loop, which then vectorises over output columns.
    trailing = bool(reduce) and all(kind == _REDUCE for kind in kinds[len(spatial):])
    matmul_like = trailing and len(stmt.reads) >= 2
    if tile and matmul_like and _register_tiled(sch, block, spatial, reduce, lanes, parallel):
        return
    if reduce and not matmul_like:
        # Reductions over inner axes (LayerNorm, mean, ...): parallel over the spatial prefix.
        prefix = loops[: kinds.index(_REDUCE)]
        if prefix and parallel:
            sch.parallel(sch.fuse(*prefix) if len(prefix) > 1 else prefix[0])
        return
    if matmul_like:
        sch.reorder(*spatial[:-1], *reduce, last)
    outer = spatial[:-1]
    if outer and parallel:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)
    buffers = [region.source for region in list(stmt.reads) + list(stmt.writes)]  # (TVM 0.27 TensorRegion)
    if any(buffer.dtype == "bool" for buffer in buffers):
        # TVM 0.27's LLVM codegen mixes <N x i1> and <N x i8> for vectorised boolean logic.
        extent = None
    else:
        extent = static_extent(sch.get(last).extent)
    if extent is not None and extent > lanes:
        width = _vector_width(extent, lanes)
        if width is not None:
            _, inner = sch.split(last, [None, width])
            sch.vectorize(inner)
    elif extent is not None and extent > 1:
        sch.vectorize(last)
    if matmul_like:
        sch.decompose_reduction(block, reduce[0])


def schedule_generic(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    """Parallel + vectorised baseline schedule for an unscheduled PrimFunc (see module doc)."""
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - no root block: nothing to schedule
        return func
    for block in sch.get_child_blocks(root):
        # Register tiles where they apply; where they fail, the plain rule; where that fails too,
        # the block as it is (each attempt on a copy: a failed one leaves nothing behind).
        for tile in (True, False):
            attempt = sch.copy()
            try:
                _schedule_block(attempt, block, lanes, tile)
            except Exception:  # noqa: BLE001
                continue
            sch = attempt
            break
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
