"""A generic x86 rule for the rest of a model (the kernels TVM legalizes for non-softmax ops).

TVM 0.27's default Relax pipeline leaves those kernels unscheduled on llvm (one thread, scalar).
This rule gives every root block of such a PrimFunc: the outer spatial loops fused and parallel
(unless the block is small, `PARALLEL_MIN_ITERATIONS`),
the innermost spatial loop vectorised (by the widest of lanes, lanes/2, lanes/4 that divides it);
for a matmul-like block (reduction loops innermost, two or more inputs: matmul, convolution) the
reduction loops are moved outside the last spatial loop first, so that loop vectorises over
contiguous output columns; a matmul with a static column extent gets register tiles
(`_register_tiled`: `register_tile` rows x vectors, a predicated last tile where the rows do not
divide; sums longer than `K_BLOCK` in k blocks; groups of column panels that fit L2 outside the
row tiles, `panel_group`; its elementwise consumer, a bias add say, computed in each tile,
`_fuse_epilogue`), and where
its second operand is a constant (TVM's `layout_free_buffers`) reads it as contiguous column
panels (`_packed_weights`; the re-layout runs once, at compile time, see
`lowering.pipeline.fold_weight_prepacks`). Before all that, chains of elementwise kernels are
inlined into one loop nest (`_inline_elementwise`). A reduction along contiguous memory that is
not a product (LayerNorm's sums, ReduceMean over the last axis) is computed as vector-lane partial
results (`_lane_partials`). A block the rule cannot handle is left as it is.
It is a baseline, not a tuned schedule: fixed tile and group sizes, convolutions not tiled.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad

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


def register_tile(lanes: int, column_vectors: int | None = None) -> tuple[int, int]:
    """(rows, vectors of columns) of a matmul's register tile: accumulators plus the vectors of
    the other operand fill the register file without spilling (MLAS's kernel shapes): 6 x 4 of
    the 32 AVX-512 registers (24 accumulators, 4 vectors, a broadcast: 29), 6 x 2 of the 16
    AVX2/SSE ones (15). Where `column_vectors` (the output's columns in vectors) is not a
    multiple of that, fewer vectors of more rows, as many accumulators, at most 12 rows (AVX-512:
    12 x 2, 12 x 1). Fewer broadcasts per FMA with 4 vectors: on emeraldrapids 6 x 4 ran a
    [197, 768] @ [768, 3072] matmul at 129-131 GFLOP/s against 121-122 for 12 x 2 (onnxruntime
    137), [64, 768] @ [768, 3072] 107 against 94; on znver5 12 x 2 ran 240-260 GFLOP/s at 1
    thread and 8 x 3 and 6 x 4 within noise of it (4 x 4: 200)."""
    rows, vectors = (6, 4) if lanes >= 16 else (6, 2)
    if column_vectors is None:
        return rows, vectors
    fitting = next(c for c in (vectors, 2, 1) if column_vectors % c == 0)
    return min(rows * vectors // fitting, 12), fitting


# Annotation of a block that only re-lays out a constant weight: TVM's SplitLayoutRewritePreproc
# moves it into a function of its own, which `lowering.pipeline.fold_weight_prepacks` runs once,
# at compile time.
LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"
# Attribute of a PrimFunc with such a block (the pipeline keeps TVM's layout_free_buffers only there).
PACKED_ATTR = "tvmsoftmax.packed_weights"


def _packed_weights(sch: s_tir.Schedule, block, layout_free, panel: int) -> None:
    """The matmul's constant operand B[k, n] (or B[n, k]) read as panels B'[n // panel, k, n % panel]:
    a register tile's columns for every k are then contiguous (one sequential stream instead of
    a k-stride of a whole row). The re-layout is a block of its own marked for compile-time
    folding; nothing is done unless B is a layout-free buffer (a constant at every call site) of
    two static dims indexed by exactly the column and the reduction axis."""
    stmt = sch.get(block)
    column = next(iv.var for iv in reversed(stmt.iter_vars) if int(iv.iter_type) == _DATA_PAR)
    reduction = next(iv.var for iv in stmt.iter_vars if int(iv.iter_type) == _REDUCE)
    for index, region in enumerate(stmt.reads):
        buffer = region.source
        if not any(buffer.same_as(param) for param in layout_free) or len(buffer.shape) != 2:
            continue
        mins = [r.min for r in region.region]
        if not all(isinstance(m, tirx.Var) for m in mins) or any(static_extent(r.extent) != 1 for r in region.region):
            return
        if mins[0].same_as(reduction) and mins[1].same_as(column):
            index_map = lambda k, n: (n // panel, k, n % panel)  # noqa: E731
        elif mins[0].same_as(column) and mins[1].same_as(reduction):
            index_map = lambda n, k: (n // panel, k, n % panel)  # noqa: E731
        else:
            return
        if any(static_extent(d) is None for d in buffer.shape):
            return
        copy = sch.cache_read(block, index, "global")
        sch.transform_layout(block, ("read", index), index_map)
        sch.annotate(copy, LAYOUT_REWRITE_PREPROC, True)
        return


# Bytes of the second operand's column panels that a group of them may take (`panel_group`):
# half of a 512 KiB L2 (a quarter of znver5's 1 MiB; 200 and 400 KiB ran alike there).
PANEL_GROUP_BYTES = 256 * 1024


def panel_group(panels: int, panel_bytes: int) -> int:
    """How many of a matmul's `panels` column panels (of `panel_bytes` each, over the whole
    reduction) are visited together by every row tile: the most that divide `panels` and fit
    `PANEL_GROUP_BYTES`, at least one."""
    return next((g for g in range(panels, 0, -1) if panels % g == 0 and g * panel_bytes <= PANEL_GROUP_BYTES), 1)


# Reductions longer than this are summed in blocks of about this many terms (a divisor of the
# length between K_BLOCK/2 and K_BLOCK), each block's sum from zero, then the blocks' sums: MLAS's
# k blocking. One running float32 sum over K = 3072 terms was 6x further from float64 than
# onnxruntime (2.5e-5 against 4.3e-6 on outputs of ~10), and a 12-layer GPT-2 failed the check
# for it; blocked, 4.9e-6, at 2-4% of the speed.
K_BLOCK = 256


def _unrolled_vectors(sch: s_tir.Schedule, rows, columns, width: int) -> None:
    """A register tile's rows x columns loops (its write-back, block sums or epilogue): the columns
    in vectors of `width`, the vectors and rows unrolled, so every access to the accumulators is
    at a constant index (they stay in registers)."""
    vectors, lanes = sch.split(columns, [None, width])
    sch.vectorize(lanes)
    sch.unroll(vectors)
    sch.unroll(rows)


def _sum_of_blocks(sch: s_tir.Schedule, total, k_outer, width: int) -> None:
    """The sum over k blocks of a register tile's partial products (`_register_tiled`): each
    block's sum added to the tile's output as soon as it is complete, read from the accumulators
    where they are (the block-local write-back inlined), the output tile zeroed before the first
    block. Same order of additions as summing the blocks' sums afterwards; the blocks' sums were
    kept in a stack buffer of their own and summed after the last block: about 3% of a [197, 768]
    @ [768, 3072] matmul in that buffer's stores and loads."""
    from tvm.tirx.analysis import undefined_vars

    sch.reverse_compute_at(total, k_outer, preserve_unit_loops=True)
    loops = sch.get_loops(total)
    realize = sch.get(loops[-1]).body
    values = list(zip(realize.block.iter_vars, realize.iter_values))

    def loop_of(value):
        used = undefined_vars(value, [])
        return next(loop for loop in reversed(loops) if any(v.same_as(sch.get(loop).loop_var) for v in used))

    spatial = [value for iv, value in values if int(iv.iter_type) == _DATA_PAR]
    _unrolled_vectors(sch, loop_of(spatial[-2]), loop_of(spatial[-1]), width)
    init = sch.decompose_reduction(total, k_outer)
    init_columns = sch.get_loops(init)[-1]
    _, init_lanes = sch.split(init_columns, [None, width])
    sch.vectorize(init_lanes)


@dataclass(frozen=True)
class Tiled:
    """A register-tiled matmul: the block that writes its output and the loop over its tiles."""

    output: object  # SBlockRV
    tile: object  # LoopRV
    width: int
    copy: bool  # `output` only copies the accumulators (no k blocks)


def _register_tiled(sch: s_tir.Schedule, block, spatial, reduce, lanes: int, parallel: bool,
                    layout_free=()) -> Tiled | None:
    """A matmul (one reduction, a static column extent, rows static or symbolic, whole vectors of
    columns) as register tiles: rows x (vectors of columns) accumulators in a block-local buffer (registers
    once unrolled), the reduction outside them, each row's value broadcast against a vector of the
    other operand's row; written back once per tile. Each output's sum keeps its order, up to
    `K_BLOCK` terms; longer ones are summed in blocks (`_sum_of_blocks`).
    Returns None (nothing changed) where it does not apply. Convolutions are not tiled: tried
    (output rows x vectors of columns, sharing the weights), VGG-19 ran 15% slower, ResNet-50 level."""
    if len(reduce) != 1 or len(spatial) < 2:
        return None
    row, column = spatial[-2], spatial[-1]
    rows, columns = static_extent(sch.get(row).extent), static_extent(sch.get(column).extent)
    if columns is None or (rows is not None and rows < 2):
        return None
    width = _vector_width(columns, lanes)
    if width is None:
        return None
    most_rows, tile_vectors = register_tile(lanes, columns // width)
    # a partial last tile (predicated) where it does not divide the rows, static or symbolic
    tile_rows = most_rows if rows is None else min(most_rows, rows)
    if layout_free:
        _packed_weights(sch, block, layout_free, tile_vectors * width)
    depth, k_block, total = static_extent(sch.get(reduce[0]).extent), None, None
    if depth is not None and depth > K_BLOCK:
        k_block = next((b for b in range(K_BLOCK, K_BLOCK // 2 - 1, -1) if depth % b == 0), None)
    if k_block:  # block: the partial products of each k block; total: their sum (see K_BLOCK)
        k_outer, k_inner = sch.split(reduce[0], [None, k_block])
        total, block = block, sch.rfactor(k_outer, factor_axis=0)
        *spatial, k_outer, k_inner = sch.get_loops(block)  # rfactor made the loops anew
        row, column, reduce = spatial[-2], spatial[-1], [k_inner]
    row_outer, row_inner = sch.split(row, [None, tile_rows])
    column_outer, column_vector, lane = sch.split(column, [None, tile_vectors, width])
    # Groups of column panels outermost, each visited by every row tile while it is in L2: the
    # second operand is read from memory once per call (row tiles outermost streamed all of it
    # once per tile: with a model's weights cold, as they are in a real run, 12 x [128, 768] @
    # [768, 3072] @ [3072, 768] ran at 206 GFLOP/s against onnxruntime's 220; grouped, 233, and
    # 2 threads 370 -> 462 GFLOP/s, as both parallelise over groups x row tiles).
    group = panel_group(columns // (tile_vectors * width), (depth or K_BLOCK) * tile_vectors * width * 4)
    column_group, column_outer = sch.split(column_outer, [None, group])
    blocks = [k_outer] if k_block else []
    sch.reorder(*spatial[:-2], column_group, row_outer, column_outer, *blocks, reduce[0], row_inner, column_vector,
                lane)
    if parallel:  # before the write-back block exists (its subtree is no longer a plain reduction)
        outer = [*spatial[:-2], column_group, row_outer]
        sch.parallel(sch.fuse(*outer))
    writeback = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(writeback, k_outer if k_block else column_outer, preserve_unit_loops=True)
    if total is not None:
        _sum_of_blocks(sch, total, k_outer, width)
        sch.compute_inline(writeback)  # the blocks' sums read from the accumulators
    else:
        _unrolled_vectors(sch, *sch.get_loops(writeback)[-2:], width)
    sch.vectorize(lane)
    sch.unroll(column_vector)
    sch.unroll(row_inner)
    sch.decompose_reduction(block, reduce[0])
    return Tiled(total if total is not None else writeback, column_outer, width, copy=total is None)


def _fuse_epilogue(sch: s_tir.Schedule, tiled: Tiled, params) -> str | None:
    """The elementwise consumer of a tiled matmul (its bias add, activation, residual add: one
    block once `_inline_elementwise` has run) computed per tile, right after the tile's sums,
    from its accumulators: the product never makes a trip through memory and the consumer no pass
    of its own ([126, 256] @ [256, 768] + bias: 0.45 -> 0.41 ms).
    Returns the consumer's name, None where it does not apply; raises where TVM refuses (the
    caller tries on a copy).

    Only tiles without k blocks (K <= K_BLOCK): with k blocks the product's running total is
    an intermediate that LLVM then keeps in registers from one k block to the next (the blocks of
    K = 768 are fully unrolled), 24 totals beside 24 accumulators, and it spilled the
    accumulators in the middle block's inner loop: [126, 768] @ [768, 3072] + bias ran at 55
    GFLOP/s against 120 unfused (rows a multiple of the tile's 6; a predicated last tile hid it:
    the predicate keeps the totals in memory). Unfused, the k-block shapes measured the same or
    faster ([197, 3072] @ [3072, 768]: within 1%), one k block 8-9% slower ([126, 256] @ [256,
    768])."""
    if not tiled.copy:
        return None
    consumers = sch.get_consumers(tiled.output)
    if len(consumers) != 1:
        return None
    consumer = consumers[0]
    stmt = sch.get(consumer)
    written = sch.get(tiled.output).writes[0].source
    if not _spatial(stmt) or any(written.same_as(param) for param in params):
        return None
    if any(static_extent(r.extent) != 1 for read in stmt.reads if read.source.same_as(written) for r in read.region):
        return None
    sch.reverse_compute_at(consumer, tiled.tile, preserve_unit_loops=True)
    sch.compute_inline(tiled.output)  # the tile's write-back: the consumer reads the accumulators themselves
    rows, columns = sch.get_loops(consumer)[-2:]  # the tile's
    extent = static_extent(sch.get(columns).extent)
    if extent is None or extent % tiled.width:
        raise ValueError("the tile's columns are not whole vectors")
    # unrolled: left as loops over the accumulators, LLVM kept them as an array in memory, and the
    # tile's inner loop read-modified-wrote it
    _unrolled_vectors(sch, rows, columns, tiled.width)
    return stmt.name_hint


def _spatial(stmt) -> bool:
    return all(int(iv.iter_type) == _DATA_PAR for iv in stmt.iter_vars)


def _domain(stmt) -> int | None:
    total = 1
    for iv in stmt.iter_vars:
        extent = static_extent(iv.dom.extent)
        if extent is None:
            return None
        total *= extent
    return total


def _copy_like(stmt) -> bool:
    """A block whose value is a load, or a cast of one (reshape, transpose, broadcast, cast)."""
    value = getattr(stmt.body, "value", None)
    if isinstance(value, tirx.Cast):
        value = value.value
    return isinstance(value, TensorLoad)  # (TVM 0.27's BufferLoad node)


def _inline_elementwise(sch: s_tir.Schedule) -> s_tir.Schedule:
    """Elementwise intermediates computed where they are used (one loop nest, no buffer between):
    a spatial block writing an intermediate (not a parameter) is inlined into its consumers when
    they are all spatial too and each has the same number of iterations and reads one element
    of it per iteration (no recomputation), or the block only moves data (a load or cast).
    Producers of reductions stay (inlined into a matmul's k loop they would be recomputed for
    every column tile). Each try on a copy. Buffers are told apart by identity, not by name: topi
    names every product "T_multiply", so an intermediate can share its name with the output
    (ONNX Gelu: its erf pass stayed a buffer of its own, scalarised)."""
    params = list(sch.mod["main"].params)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        try:
            stmt = sch.get(block)
            if not _spatial(stmt) or len(stmt.writes) != 1:
                continue
            written = stmt.writes[0].source
            if any(written.same_as(param) for param in params):
                continue
            consumers = [sch.get(c) for c in sch.get_consumers(block)]
            if not consumers or not all(_spatial(c) for c in consumers):
                continue
            if not _copy_like(stmt) and any(
                _domain(c) is None or _domain(c) != _domain(stmt)
                or any(static_extent(r.extent) != 1 for read in c.reads if read.source.same_as(written) for r in read.region)
                for c in consumers
            ):
                continue
            attempt = sch.copy()
            attempt.compute_inline(block)
        except Exception:  # noqa: BLE001 - not inlinable: left as it is
            continue
        sch = attempt
    return sch


def _schedule_block(sch: s_tir.Schedule, block, lanes: int, tile: bool = True, layout_free=()) -> Tiled | None:
    """Schedules `block`; returns the register tiling of a tiled matmul (`_fuse_epilogue`)."""
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
    # A reduction whose reads run along the output's columns (a matmul; ReduceSum over axis 0 of
    # [rows, columns]): the reduction goes outside the columns, which are then vectorised (each
    # output's terms still in their order). Over axis 0 of [197, 3072], 0.72 -> 0.09 ms (it was
    # parallel over columns, each a scalar chain of strided loads).
    column_major = trailing and _last_dim_uses(stmt, _DATA_PAR)
    matmul_like = column_major and len(stmt.reads) >= 2
    if tile and matmul_like:
        tiled = _register_tiled(sch, block, spatial, reduce, lanes, parallel, layout_free)
        if tiled is not None:
            return tiled
    if reduce and not column_major:
        # Reductions over inner axes (LayerNorm, mean, ...): parallel over the spatial prefix,
        # and a reduction along contiguous memory summed in vector lanes.
        prefix = loops[: kinds.index(_REDUCE)]
        if prefix and parallel:
            sch.parallel(sch.fuse(*prefix) if len(prefix) > 1 else prefix[0])
        if trailing and _contiguous_reduction(stmt):
            _lane_partials(sch, block, len(spatial), lanes)
        return
    if not reduce and _copy_like(stmt) and _transpose_tiles(sch, stmt, loops):
        return
    if column_major:
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
    if column_major:
        sch.decompose_reduction(block, reduce[0])


# Side of the square tiles of a transposition (`_transpose_tiles`): over [197, 3072] -> [3072, 197],
# 8: 0.27-0.33 ms, 16: 0.22-0.24, 32: 0.26-0.38 (emeraldrapids; the plain rule, parallel over output
# rows: 0.6-0.8; onnxruntime 0.44).
TRANSPOSE_TILE = 16


def _transpose_tiles(sch: s_tir.Schedule, stmt, loops) -> bool:
    """A copy whose input's last dim is indexed by an outer axis of the output (a transposition)
    walked in square tiles, the input's contiguous axis innermost: each tile reads and writes a
    few cache lines instead of one strided element per output row. Only a plain axis-to-axis
    move of static extents at least a tile (a Reshape fused into it indexes by arithmetic: left
    to the plain rule). On one thread: LLVM vectorises the tile with gathers there, but not in
    the body of a parallel loop (scalar moves: 0.22 -> 0.47 ms, slower than untiled even on 2
    threads), and the copy is bound by memory."""
    if len(stmt.reads) != 1 or len(loops) < 2:
        return False
    index = stmt.reads[0].region[-1].min
    axes = [iv.var for iv in stmt.iter_vars]
    used = [n for n, axis in enumerate(axes) if _uses(index, axis)]
    if len(used) != 1 or used[0] == len(axes) - 1 or not index.same_as(axes[used[0]]):
        return False
    moved = used[0]
    if any((static_extent(sch.get(loops[n]).extent) or 0) < TRANSPOSE_TILE for n in (moved, len(loops) - 1)):
        return False
    moved_outer, moved_inner = sch.split(loops[moved], [None, TRANSPOSE_TILE])
    last_outer, last_inner = sch.split(loops[-1], [None, TRANSPOSE_TILE])
    others = [loop for n, loop in enumerate(loops[:-1]) if n != moved]
    sch.reorder(*others, moved_outer, last_outer, last_inner, moved_inner)
    return True


def _uses(expr, var) -> bool:
    from tvm.tirx.analysis import undefined_vars

    return any(v.same_as(var) for v in undefined_vars(expr, []))


def _last_dim_uses(stmt, kind: int) -> bool:
    """Some read of the block is indexed in its last dim by the block's innermost axis of `kind`
    (spatial: a matmul's columns run along its second operand's rows; a row reduction's output,
    [rows, 1] after keepdims, does not, even when it reads a second buffer such as the mean)."""
    axis = [iv.var for iv in stmt.iter_vars if int(iv.iter_type) == kind][-1]
    return any(region.region and _uses(region.region[-1].min, axis) for region in stmt.reads)


def _contiguous_reduction(stmt) -> bool:
    """The block's innermost reduction axis runs along the last dim of what it reads: some read
    is indexed there by that axis alone, and no read by it in another dim."""
    axis = [iv.var for iv in stmt.iter_vars if int(iv.iter_type) == _REDUCE][-1]
    along = False
    for region in stmt.reads:
        for dim, extent in enumerate(region.region):
            uses = _uses(extent.min, axis)
            if uses and (dim != len(region.region) - 1 or not extent.min.same_as(axis)):
                return False
            along = along or uses
    return along


def _lane_partials(sch: s_tir.Schedule, block, spatial: int, lanes: int) -> None:
    """A row reduction as `lanes` partial results per row, each over every lanes-th element
    (rfactor: one vector op per `lanes` elements instead of a serial chain of dependent scalar
    ones), then the partial results combined. A LayerNorm of 768 float64 sums was bound by the
    latency of its chain: 0.15 ms per [128, 768] call (3% of a BERT-base). Rows whose length
    `lanes` does not divide stay serial, and so do reductions TVM's rfactor does not know (it
    matches the combiner and identity against its registry: a max from -inf, ONNX's ReduceMax,
    is not there; tried on a copy first)."""
    reduce = sch.get_loops(block)[-1]
    extent = static_extent(sch.get(reduce).extent)
    if extent is None or extent % lanes or extent < 2 * lanes:
        return
    trial = sch.copy()
    try:
        trial.rfactor(trial.split(trial.get_loops(block)[-1], [None, lanes])[1], factor_axis=spatial)
    except Exception:  # noqa: BLE001 - not a reducer rfactor knows
        return
    _outer, inner = sch.split(reduce, [None, lanes])
    partial = sch.rfactor(inner, factor_axis=spatial)
    step, lane = sch.get_loops(partial)[-2:]  # rfactor keeps the order: the lane innermost
    sch.vectorize(lane)
    sch.decompose_reduction(partial, step)


def schedule_generic(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    """Parallel + vectorised baseline schedule for an unscheduled PrimFunc (see module doc)."""
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - no root block: nothing to schedule
        return func
    free = func.attrs.get("layout_free_buffers", []) if func.attrs is not None else []
    layout_free = [func.params[int(i)] for i in free]  # (TVM 0.27: params are the buffers; by identity)
    sch = _inline_elementwise(sch)
    root = sch.get_sblock("root")
    params = list(func.params)
    fused = set()  # epilogues computed in a matmul's tiles (`_fuse_epilogue`)
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint in fused:
            continue
        # Register tiles where they apply; where they fail, the plain rule; where that fails too,
        # the block as it is (each attempt on a copy: a failed one leaves nothing behind).
        tiled = None
        for tile in (True, False):
            attempt = sch.copy()
            try:
                tiled = _schedule_block(attempt, block, lanes, tile, layout_free)
            except Exception:  # noqa: BLE001
                continue
            sch = attempt
            break
        if tiled is not None:
            attempt = sch.copy()
            try:
                name = _fuse_epilogue(attempt, tiled, params)
            except Exception:  # noqa: BLE001 - TVM refused: the consumer keeps a pass of its own
                name = None
            if name is not None:
                sch = attempt
                fused.add(name)
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    root = sch.get_sblock("root")
    if any(LAYOUT_REWRITE_PREPROC in sch.get(block).annotations for block in sch.get_child_blocks(root)):
        func = func.with_attr(PACKED_ATTR, True)
    return func
