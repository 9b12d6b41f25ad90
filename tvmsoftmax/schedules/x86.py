"""x86 (LLVM) schedule for the softmax compute of `tvmsoftmax.ops.softmax`.

The PrimFunc's blocks are recognised by the names the compute gives them:
``*_partial`` (per-row partial states over the row), ``*_treeN`` (the halving levels that merge
them), ``*_state`` (the final merge with the row's tail), ``*_exp``
(three-pass's stored exponentials), row constants (``*_scale``, ``*_logsum``, ``*_shift``) and
the output block. Two layouts:

* rows contiguous (inner == 1): the ``partials`` partial states of a row are vector lanes
  (several accumulators), the output pass is vectorised along the row. With ``splits == 1`` every
  stage is computed at the row inside one loop parallel over rows (the row stays in cache between
  passes); with ``splits > 1`` a row's chunks are reduced on different threads and the partial
  states merged (for few long rows).
* strided rows (inner > 1, i.e. an ONNX axis that is not the last): rows are reduced side by side,
  vectorised across ``inner``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import s_tir, tirx

from ..ops.softmax import Partitioning
from ._tir import STACK_SCRATCH_ATTR, named_root_blocks, prefetch_next, static_extent, with_prefetches

# llvm.prefetch's locality of each `X86SoftmaxKnobs.prefetch`
PREFETCH_LOCALITY = {"l1": 3, "l2": 2}


@dataclass(frozen=True)
class X86SoftmaxKnobs:
    """Tunable knobs of the x86 softmax schedule."""

    vector_lanes: int = 8  # float32 lanes of one vector register (8: AVX2, 16: AVX-512)
    accumulators: int = 2  # vector accumulators per row (partial states = lanes * accumulators)
    splits: int = 1  # threads sharing one row (for few long rows)
    unroll: int = 2  # unroll of the vectorised output loop
    prefetch: str = "off"  # rows: the next row prefetched into "l1" or "l2" during the last pass over x, or "off"

    def partitioning(self, contiguous_rows: bool) -> Partitioning:
        """Partial states the compute must provide for this schedule (see `ops.softmax`)."""
        if not contiguous_rows:
            return Partitioning()  # strided rows are vectorised across rows, one state each
        return Partitioning(partials=self.vector_lanes * self.accumulators, splits=self.splits)

    def to_json(self) -> dict:
        return asdict(self)


def schedule_softmax(func: tirx.PrimFunc, knobs: X86SoftmaxKnobs) -> tirx.PrimFunc:
    """Return ``func`` (a softmax PrimFunc from `ops.softmax`) scheduled for x86."""
    sch = s_tir.Schedule(func)
    named = named_root_blocks(sch)
    inner = sch.get(sch.get_loops(named[-1][1])[2]).extent
    if static_extent(inner) == 1:
        if knobs.splits == 1:
            _schedule_rows_fused(sch, named, knobs, func.params[0].name)
        else:
            _schedule_rows_split(sch, named, knobs)
    else:
        _schedule_strided(sch, named, knobs)
    # A row's stored exponentials (three-pass) and partial states live on the parallel task's
    # stack (up to `lowering.pipeline.STACK_ARRAY_BYTES`), not in a TVMBackendAllocWorkspace /
    # FreeWorkspace pair per row.
    scheduled = with_prefetches(sch.mod["main"])
    return scheduled.with_attrs({"tirx.is_scheduled": True, STACK_SCRATCH_ATTR: True})


def _vectorize_tail(sch, loop, lanes: int, unroll: int = 1):
    """Split `loop` into (outer, lanes) and vectorise the lanes; return the loop around the vector.

    A static extent that is not a multiple of `lanes` is first partitioned into a multiple-of-lanes
    body and a scalar tail: TVM scalarises a vector loop whose last vector carries a bounds
    predicate (measured: 2.3x slower on 64x1000). Dynamic extents keep the predicate (TVM's
    partition refuses them).
    """
    extent = static_extent(sch.get(loop).extent)
    if extent is not None and extent > lanes and extent % lanes:
        loop, _tail = sch.loop_partition(loop, [extent // lanes * lanes, None])
        extent = extent // lanes * lanes
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    vectors = extent // lanes if extent is not None else None
    if unroll > 1 and (vectors is None or vectors % unroll == 0):
        _, outer = sch.split(outer, [None, unroll])
    return outer


def _schedule_rows_fused(sch, named, knobs: X86SoftmaxKnobs, source: str):
    """inner == 1, splits == 1: all stages computed at the row, parallel over rows. The last pass
    that reads the input (`source`) prefetches the next row (`with_prefetches`): three-pass's
    stored exponentials, the others' output pass."""
    _, output = named[-1]
    o, k, i = sch.get_loops(output)
    sch.parallel(o)
    row_loops = [(sch.fuse(k, i), knobs.unroll, output)]  # vectorised last: partitioning must follow compute_at
    for name, block in reversed(named[:-1]):
        sch.compute_at(block, o, preserve_unit_loops=True)
        loops = sch.get_loops(block)[2:]  # [o, unit o, *block loops]
        if name.endswith("_partial"):
            # loops: states, inner (1), j -> j outer, states vectorised (accumulators x lanes).
            states, _, j = loops
            sch.reorder(j, states)
            lane_outer, lanes = sch.split(states, [None, knobs.vector_lanes])
            sch.vectorize(lanes)
            sch.unroll(lane_outer)
            sch.decompose_reduction(block, j)
        elif name.endswith("_exp"):
            k_loop, unit = loops
            row_loops.append((sch.fuse(k_loop, unit), 1, block))
        elif "_tree" in name:  # halving level of the partial states: elementwise, vectorised
            states, unit = loops
            sch.vectorize(sch.fuse(states, unit))
    reads_source = [any(str(r.source.name) == source for r in sch.get(block).reads) for *_, block in row_loops]
    last_read = reads_source.index(True) if True in reads_source else None  # row_loops: output first
    rows = static_extent(sch.get(o).extent)
    for n, (loop, unroll, _block) in enumerate(row_loops):
        vector_loop = _vectorize_tail(sch, loop, knobs.vector_lanes, unroll)
        if n == last_read and knobs.prefetch in PREFETCH_LOCALITY and rows != 1:
            prefetch_next(sch, vector_loop, source, 0, PREFETCH_LOCALITY[knobs.prefetch])


def _schedule_rows_split(sch, named, knobs: X86SoftmaxKnobs):
    """inner == 1, splits > 1: a row's chunks on different threads, partial states merged."""
    for name, block in named:
        loops = sch.get_loops(block)
        if name.endswith("_partial"):
            o, split, states, unit, j = loops
            lane_outer, lanes = sch.split(states, [knobs.accumulators, knobs.vector_lanes])
            sch.reorder(o, split, j, lane_outer, lanes, unit)
            sch.parallel(sch.fuse(o, split))
            sch.vectorize(lanes)
            sch.unroll(lane_outer)
            sch.decompose_reduction(block, j)
        elif name.endswith("_state") or "_tree" in name:
            sch.parallel(loops[0])
        elif len(loops) == 3:  # elementwise over the row: stored exp or output
            o, k, i = loops
            k_outer, k_inner = sch.split(sch.fuse(k, i), [knobs.splits, None])
            sch.parallel(sch.fuse(o, k_outer))
            _vectorize_tail(sch, k_inner, knobs.vector_lanes, knobs.unroll)


def _schedule_strided(sch, named, knobs: X86SoftmaxKnobs):
    """inner > 1: rows side by side, vectorised across `inner`, parallel over `outer`."""
    _, output = named[-1]
    o, k, i = sch.get_loops(output)
    sch.parallel(o)
    _vectorize_inner(sch, i, knobs)
    for name, block in reversed(named[:-1]):
        sch.compute_at(block, o, preserve_unit_loops=True)
        loops = sch.get_loops(block)[2:]  # [o, unit o, *block loops]
        if name.endswith("_partial"):
            _, i_loop, j = loops  # states (extent 1), inner, j
            sch.reorder(j, i_loop)
            _vectorize_inner(sch, i_loop, knobs)
            sch.decompose_reduction(block, j)
        elif name.endswith("_exp"):
            _vectorize_inner(sch, loops[-1], knobs)


def _vectorize_inner(sch, loop, knobs):
    extent = static_extent(sch.get(loop).extent)
    if extent is not None and extent % knobs.vector_lanes == 0:
        _, lanes = sch.split(loop, [None, knobs.vector_lanes])
        sch.vectorize(lanes)
    elif extent is not None and extent <= 64:
        sch.vectorize(loop)


# Row lengths at or above which the max-free / single-read algorithms pay off (rows leave L1/L2).
LONG_ROW = 8192
SPLIT_ROW = 1 << 16


def choose(
    requested: str, log: bool, view: list[int | None], vector_lanes: int, num_cores: int
) -> tuple[str, X86SoftmaxKnobs]:
    """The `auto` rule for x86, and the knobs for an explicit algorithm.

    * LogSoftmax: ``three-pass-recompute`` (what onnxruntime does; two-pass cannot know the max of
      a fully masked row, see the README's limits).
    * Softmax, contiguous rows of at least LONG_ROW elements: ``online`` (3 memory accesses per
      element instead of 5, exact onnxruntime semantics on masked rows).
    * otherwise ``three-pass`` (its passes after the first read the row from L1; the stored exp
      is cheaper than recomputing it).
    Knobs: one vector accumulator for rows of fewer than 32 vectors, two beyond; a row is split
    across threads when there are fewer rows than cores and rows of at least SPLIT_ROW elements.
    The three-pass algorithms, whose first pass (the max) does little but wait for the row, have
    the next row prefetched into L1 for rows shorter than LONG_ROW (1 thread, emeraldrapids:
    three-pass 1024 x 1024 0.45 -> 0.32 ms, 6144 x 512 1.24x, 128 x 4096 1.29x, 64 x 8192 1.18x,
    three-pass-recompute 1.12-1.24x); online and two-pass, whose first pass computes
    exponentials, gained nothing and lost 10-20% on rows of 4096 and more. With the prefetch,
    three-pass beats online up to 4096-element rows (1024: 0.32 against 0.65 ms), online wins
    from 8192 (0.23 against 0.29 ms).
    """
    outer, length, inner = view
    contiguous = inner == 1
    algorithm = requested
    if requested == "auto":
        if log:
            algorithm = "three-pass-recompute"
        elif contiguous and length is not None and length >= LONG_ROW:
            algorithm = "online"
        else:
            algorithm = "three-pass"
    rows = outer if outer is not None else None
    splits = 1
    if contiguous and num_cores > 1 and length is not None and length >= SPLIT_ROW:
        if rows is not None and rows < num_cores:
            splits = num_cores
    # Partial states cost merge work per row: rows of fewer than 32 vectors use one vector
    # accumulator, longer rows two (knob sweeps on the benchmark shapes, see benchmarks/README.md).
    accumulators = 2 if length is None or length >= 32 * vector_lanes else 1
    short = length is None or length < LONG_ROW
    prefetch = "l1" if algorithm in ("three-pass", "three-pass-recompute") and short else "off"
    return algorithm, X86SoftmaxKnobs(
        vector_lanes=vector_lanes, accumulators=accumulators, splits=splits, prefetch=prefetch
    )
