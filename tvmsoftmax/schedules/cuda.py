"""CUDA schedule for the softmax compute of `tvmsoftmax.ops.softmax`: one thread block per row.

The ``threads`` partial states of a row (one per thread, interleaved so that a warp reads
consecutive elements) live in shared memory; every thread merges them into its own copy of the row
state (local), then the threads write the output together. Rows are (outer, inner) pairs, so a
strided axis works too (uncoalesced). The warp-per-row and split-row schedules are issue 5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import s_tir, tirx

from ..ops.softmax import Partitioning
from ._tir import named_root_blocks


@dataclass(frozen=True)
class CudaSoftmaxKnobs:
    """Tunable knobs of the CUDA softmax schedule."""

    threads: int = 256  # threads per block (= partial states per row)

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
    threads = 256 if length is None or length >= 2048 else 128 if length >= 256 else 32
    return algorithm, CudaSoftmaxKnobs(threads=threads)


def schedule_softmax(func: tirx.PrimFunc, knobs: CudaSoftmaxKnobs) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    named = named_root_blocks(sch)
    _, output = named[-1]
    o, k, i = sch.get_loops(output)
    sch.reorder(o, i, k)
    row = sch.fuse(o, i)
    sch.bind(row, "blockIdx.x")
    _, tx = sch.split(k, [None, knobs.threads])
    sch.bind(tx, "threadIdx.x")
    for name, block in reversed(named[:-1]):
        sch.compute_at(block, row)
        loops = sch.get_loops(block)[1:]
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
