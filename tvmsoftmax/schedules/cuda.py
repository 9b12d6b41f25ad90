"""CUDA schedule for the softmax compute of `tvmsoftmax.ops.softmax`: one thread block per row.

The ``threads`` partial states of a row (one per thread, interleaved so that a warp reads
consecutive elements) live in shared memory; every thread merges them into its own copy of the row
state (local), then the threads write the output together. Rows are (outer, inner) pairs, so a
strided axis works too (uncoalesced). Short rows get a warp per row (``threads=32``) and ``rows_per_block`` rows per block
(threadIdx.y). The split-row schedule (a row across blocks) is not built yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import s_tir, tirx

from ..ops.softmax import Partitioning
from ._tir import named_root_blocks


@dataclass(frozen=True)
class CudaSoftmaxKnobs:
    """Tunable knobs of the CUDA softmax schedule."""

    threads: int = 256  # threads of one row (= partial states per row): 32 = a warp per row
    rows_per_block: int = 1  # rows of one thread block (threadIdx.y), for short rows

    def partitioning(self, contiguous_rows: bool) -> Partitioning:
        return Partitioning(partials=self.threads, splits=1)

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
    if length is None or length >= 2048:
        return algorithm, CudaSoftmaxKnobs(threads=256)
    if length >= 1024:
        return algorithm, CudaSoftmaxKnobs(threads=128)
    # Several rows per block only when they divide the rows: a partial last block would put the
    # block's barriers under a row predicate, which TVM refuses.
    rows = None if view[0] is None or view[2] is None else view[0] * view[2]
    return algorithm, CudaSoftmaxKnobs(threads=32, rows_per_block=4 if rows is not None and rows % 4 == 0 else 1)


def schedule_softmax(func: tirx.PrimFunc, knobs: CudaSoftmaxKnobs) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
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
    _, tx = sch.split(k, [None, knobs.threads])
    sch.bind(tx, "threadIdx.x")
    for name, block in reversed(named[:-1]):
        sch.compute_at(block, row)
        loops = sch.get_loops(block)[2 if knobs.rows_per_block > 1 else 1:]
        if name.endswith("_partial"):
            sch.set_scope(block, 0, "shared")
            if len(sch.get(block).writes) > 1:
                sch.set_scope(block, 1, "shared")
            states = loops[0]
            sch.bind(states, "threadIdx.x")
        elif name.endswith("_exp"):
            sch.set_scope(block, 0, "shared")  # the row's exponentials (see SHARED_ROW_LIMIT)
            _, tx = sch.split(loops[0], [None, knobs.threads])
            sch.bind(tx, "threadIdx.x")
        else:  # tree levels, merged states, row constants: every thread keeps its own copy
            for index in range(len(sch.get(block).writes)):
                sch.set_scope(block, index, "local")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
