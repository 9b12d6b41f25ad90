"""CUDA schedule for the softmax compute of `tvmsoftmax.ops.softmax`: one thread block per row.

Thread t of a row owns ``vector`` partial states (``knobs.vector`` elements per access: 16-byte
loads of float32 x 4 where a row is contiguous, static and whole steps of threads x 4) and keeps them
in registers while it reads its elements; they are then stored to shared memory and the halving
levels of the compute's tree run on the block's threads together (one level per barrier). The last
state, merged with the row's tail, and the row constants are computed by every thread in registers,
and the threads write the output together (vectorised like the loads). Rows are (outer, inner)
pairs, so a strided axis works too (uncoalesced, ``vector`` 1). Short rows get a warp per row
(``threads=32``) and ``rows_per_block`` rows per block (threadIdx.y).

Few long rows (``splits > 1``, `_schedule_split_rows`): a row is cut into ``splits`` contiguous
chunks, one thread block each, so the grid has rows x splits blocks instead of rows. Each reduction
is three steps: a kernel over all chunks (partial states in registers, the chunk's tree in shared
memory, one state per chunk written to global memory), a small kernel with a thread per row that
merges the row's chunk states with the algorithm's associative operator (online: the (max, sum)
merge of Milakov & Gimelshein; two-pass: the (mantissa, exponent) sum), and the consumers (the next
reduction, the output) read that row state; the output is again a block per chunk. With
``ragged`` chunks (the row is not a whole number of chunks of threads x vector steps) the row's
tail is folded into the chunk states by a masked elementwise level (the compute's ``*_fold``, a
level of the chunk's tree here), so the row merge stays a few states per thread.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from tvm import s_tir, tirx

from ..ops.softmax import Partitioning
from ._tir import named_root_blocks


@dataclass(frozen=True)
class CudaSoftmaxKnobs:
    """Tunable knobs of the CUDA softmax schedule."""

    threads: int = 256  # threads of one row: 32 = a warp per row
    rows_per_block: int = 1  # rows of one thread block (threadIdx.y), for short rows
    vector: int = 1  # elements per thread access (4: 16-byte float32 loads); partial states per thread
    splits: int = 1  # thread blocks sharing one row (few long rows), each a contiguous chunk
    ragged: bool = False  # split rows: the row's tail folded into the chunks' states (any splits)

    def partitioning(self, contiguous_rows: bool) -> Partitioning:
        return Partitioning(partials=self.threads * self.vector, splits=self.splits, ragged=self.ragged)

    def to_json(self) -> dict:
        return asdict(self)


# three-pass keeps the row's exponentials in shared memory (48 KiB per block without opt-in).
SHARED_ROW_LIMIT = 12 * 1024


def choose(requested: str, log: bool, view: list[int | None]) -> tuple[str, CudaSoftmaxKnobs]:
    """`auto` on CUDA: online for Softmax (one read less), recompute for LogSoftmax."""
    algorithm = requested
    if requested == "auto":
        algorithm = "three-pass-recompute" if log else "online"
    length = view[1]
    if algorithm == "three-pass" and (length is None or length > SHARED_ROW_LIMIT):
        from ..errors import TvmSoftmaxError

        raise TvmSoftmaxError(
            f"three-pass on CUDA keeps a row in shared memory: rows must be static and at most "
            f"{SHARED_ROW_LIMIT} elements (this one: {length if length is not None else 'dynamic'}); "
            "use three-pass-recompute, online or two-pass"
        )
    # Long rows: a 256-thread block per row. Short rows: a warp per row (its states merged from
    # shared memory within the warp), several rows per block so a block still has 128+ threads.
    # 16-byte loads (4 elements per thread access) where the row is contiguous, static and cut
    # into whole steps of threads * 4: a row's start stays aligned and no tail is left (the tail
    # is merged by every thread of the row, see `schedule_softmax`).
    contiguous = view[2] == 1 and length is not None

    def vector(threads: int) -> int:
        return 4 if contiguous and length % (threads * 4) == 0 else 1

    if length is None or length >= 2048:
        splits, ragged = _splits(algorithm, view, vector(256))
        if ragged:  # 16-byte loads need only a row length that is a multiple of 4 here
            return algorithm, CudaSoftmaxKnobs(threads=256, vector=4 if length % 4 == 0 else 1, splits=splits,
                                               ragged=True)
        if splits > 1 or vector(256) == 4:
            return algorithm, CudaSoftmaxKnobs(threads=256, vector=vector(256), splits=splits)
        # Enough rows for the GPU: fewer threads per row where that makes whole steps of 16-byte
        # loads (32000 = 125 x 64 x 4), else 4-byte loads by 256 threads.
        threads = next((t for t in (128, 64) if vector(t) == 4), 256)
        return algorithm, CudaSoftmaxKnobs(threads=threads, vector=vector(threads))
    if length >= 1024:
        return algorithm, CudaSoftmaxKnobs(threads=128, vector=vector(128))
    # Several rows per block only when they divide the rows: a partial last block would put the
    # block's barriers under a row predicate, which TVM refuses.
    rows = None if view[0] is None or view[2] is None else view[0] * view[2]
    return algorithm, CudaSoftmaxKnobs(threads=32, rows_per_block=4 if rows is not None and rows % 4 == 0 else 1,
                                       vector=vector(32))


# Split rows when a static, contiguous row has at least this many elements per chunk and there are
# too few rows to give every SM of a large GPU (132 on H100, 108 on A100) two blocks.
SPLIT_TARGET_BLOCKS = 256
SPLIT_MIN_CHUNK = 16 * 1024


def _splits(algorithm: str, view: list[int | None], vector: int) -> tuple[int, bool]:
    """(chunks per row, ragged): as many chunks as bring the grid to SPLIT_TARGET_BLOCKS, with
    chunks of at least SPLIT_MIN_CHUNK elements ((1, False): no split). Whole chunks (a divisor
    of the row's steps of threads x vector: no row tail) where one comes within half of that
    count; otherwise exactly that count, ragged: the row's tail is folded into the chunks'
    states (`Partitioning.ragged`; merged per row it would run on the one thread of the row's
    merge kernel). (32, 128256) gets 7 ragged chunks a row instead of 3 whole ones of scalar
    loads. three-pass keeps its row in shared memory and is never split."""
    outer, length, inner = view
    if algorithm == "three-pass" or None in view or inner != 1 or length < 2 * SPLIT_MIN_CHUNK:
        return 1, False
    most = min(-(-SPLIT_TARGET_BLOCKS // outer), length // SPLIT_MIN_CHUNK)
    if most < 2:
        return 1, False
    steps, rest = divmod(length, 256 * vector)
    whole = max((s for s in range(1, most + 1) if steps % s == 0), default=1) if rest == 0 else 1
    if 2 * whole > most:
        return whole, False
    return most, True


def schedule_softmax(func: tirx.PrimFunc, knobs: CudaSoftmaxKnobs) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    if knobs.splits > 1:
        _schedule_split_rows(sch, knobs)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    named = named_root_blocks(sch)
    _, output = named[-1]
    o, k, i = sch.get_loops(output)
    sch.reorder(o, i, k)
    row = sch.fuse(o, i)
    if knobs.rows_per_block > 1:
        block_loop, row = sch.split(row, [None, knobs.rows_per_block])
        sch.bind(block_loop, "blockIdx.x")
        sch.bind(row, "threadIdx.y")
    else:
        sch.bind(row, "blockIdx.x")
    _thread_loop(sch, k, knobs)
    first = 2 if knobs.rows_per_block > 1 else 1  # loops of a block below the row loop(s)
    for name, block in reversed(named[:-1]):
        sch.compute_at(block, row)
        loops = sch.get_loops(block)[first:]
        if name.endswith("_partial"):
            _schedule_partial(sch, block, loops, knobs)
        elif loops and (name.endswith("_exp") or "_tree" in name):
            # three-pass's stored exponentials (see SHARED_ROW_LIMIT) and the halving levels of
            # the partial states: shared, one element per thread, a barrier between levels.
            for index in range(len(sch.get(block).writes)):
                sch.set_scope(block, index, "shared")
            _thread_loop(sch, loops[0], knobs, vector=False)
        else:  # last tree level, merged state with the row's tail, row constants: every thread
            # computes its own copy in registers (TVM's cross-thread reduction knows sum and max,
            # not the online or two-pass reducers, so the tail is merged per thread; `choose`
            # keeps it empty where it can)
            for index in range(len(sch.get(block).writes)):
                sch.set_scope(block, index, "local")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _thread_loop(sch, loop, knobs: CudaSoftmaxKnobs, vector: bool = True) -> None:
    """loop -> (serial, threadIdx.x, vector lanes): a warp touches consecutive elements, each
    thread `vector` of them at once (16-byte accesses for float32 x 4)."""
    if vector and knobs.vector > 1:
        _, tx, lanes = sch.split(loop, [None, knobs.threads, knobs.vector])
        sch.vectorize(lanes)
    else:
        _, tx = sch.split(loop, [None, knobs.threads])
    sch.bind(tx, "threadIdx.x")


def _schedule_partial(sch, block, loops, knobs: CudaSoftmaxKnobs) -> None:
    """The row's partial states: thread t owns states [t * vector, (t + 1) * vector), kept in
    registers while it reads its elements (vector of them per load), then stored to shared memory
    for the tree."""
    states, j = loops[0], loops[-1]
    if knobs.vector > 1:
        tx, lanes = sch.split(states, [knobs.threads, knobs.vector])
        sch.reorder(tx, j, lanes)
        sch.vectorize(lanes)
    else:
        tx = states  # extent: threads
    # Registers for the running states: the reduction writes a local copy, stored to shared
    # memory once at the end by the thread that owns it.
    copies = [sch.cache_write(block, index, "local") for index in range(len(sch.get(block).writes))]
    for copy in copies:
        sch.reverse_compute_at(copy, tx)
        sch.set_scope(copy, 0, "shared")
    sch.bind(tx, "threadIdx.x")


def _schedule_split_rows(sch, knobs: CudaSoftmaxKnobs) -> None:
    """Rows of ``x[outer, length, 1]`` across ``splits`` blocks each (see the module docstring).

    Blocks of the compute, by name: ``*_split_state`` (one state per chunk, global memory: the
    anchor of a kernel over rows x splits blocks) with its ``*_partial`` (registers, then shared)
    and ``*_tree*`` levels (shared) computed at it; ``*_splittree*`` and ``*_state`` (merging a
    row's chunk states: a thread per row, registers); row constants (every thread of the output
    kernel, in registers); the output (rows x splits blocks)."""
    named = named_root_blocks(sch)
    _, output = named[-1]
    o, k, i = sch.get_loops(output)
    sch.reorder(o, i, k)
    # Lanes split off first: with ragged chunks the last chunk's bound then predicates whole
    # vectors (the row length is a multiple of the vector), never single lanes.
    k, lanes = sch.split(k, [None, knobs.vector])
    chunk, _, tx = sch.split(k, [knobs.splits, None, knobs.threads])
    out_block = sch.fuse(sch.fuse(o, i), chunk)
    sch.bind(out_block, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    if knobs.vector > 1:
        sch.vectorize(lanes)
    anchors = {}  # reduction name -> the loop its producers are computed at
    for name, block in reversed(named[:-1]):
        reduction = re.sub(r"_(partial|fold|tree\d+|split_state|splittree\d+|state)(_v\d+)?$", "", name)
        if name.endswith("_state") and not name.endswith("_split_state"):
            o, i, _ = sch.get_loops(block)
            bx, row_thread = sch.split(sch.fuse(o, i), [None, 32])
            sch.bind(bx, "blockIdx.x")
            sch.bind(row_thread, "threadIdx.x")
            anchors[reduction] = row_thread
        elif "_splittree" in name:
            sch.compute_at(block, anchors[reduction])
            sch.set_scope(block, 0, "local")
        elif name.endswith("_split_state"):
            o, chunk, i, _ = sch.get_loops(block)
            sch.reorder(o, i, chunk)
            bx = sch.fuse(sch.fuse(o, i), chunk)
            sch.bind(bx, "blockIdx.x")
            # Written once, by thread 0: a loop of the block's thread extent guarded by
            # threadIdx.x < 1. (A unit loop bound to threadIdx.x is not guarded: TVM gives the
            # kernel the largest extent of the tag, so every thread ran this read-modify-write
            # of the global state, a race that double-counted tree states now and then.)
            _, thread = sch.split(sch.add_unit_loop(block), [None, knobs.threads])
            sch.bind(thread, "threadIdx.x")
            anchors[reduction] = bx
        elif name.endswith("_partial"):
            sch.compute_at(block, anchors[reduction])
            _schedule_partial(sch, block, sch.get_loops(block)[1:], knobs)
        elif "_tree" in name or re.search(r"_fold(_v\d+)?$", name):  # fold: the ragged tail, a level too
            sch.compute_at(block, anchors[reduction])
            sch.set_scope(block, 0, "shared")
            _thread_loop(sch, sch.get_loops(block)[1], knobs, vector=False)
        else:  # row constants
            sch.compute_at(block, out_block)
            sch.set_scope(block, 0, "local")
