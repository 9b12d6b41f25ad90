"""CUDA schedule for the flash attention of `tvmsoftmax.ops.attention` (the same TensorIR compute as
x86; only the schedule is CUDA's).

One thread block per (batch, query head, query block) of ``query_block`` rows, ``warps`` x 32
threads laid out as threadIdx.y x threadIdx.x. Per key tile (the compute's loop over tiles, whose
bound already stops at the causal diagonal and at kv_length: tiles above it are never visited):

* Q's rows of the block (once per block), the packed K tile ([D, key_block]) and the V tile are
  copied into shared memory by all threads, then read from there (the compute's copies clamp rows
  past Sq and Skv, so every tile has a static size, also with symbolic lengths);
* S = Q K^T: thread (y, x) accumulates rows y*rq + [0, rq) and keys x*rk + [0, rk) in registers
  over D; the scores stay in those registers for the mask and the exponentials;
* the tile's row max and row sum are cross-thread reductions (warp shuffles, a warp per row group)
  whose result reaches every lane; the running state (max, sum, rescale factor) is kept by every
  lane of the warp in its own registers; the probabilities go to a shared tile (P V reads every
  key of a row);
* P V: thread (y, x) owns rows y*rq.. and value columns x*rv.. of the output accumulator, a
  register array for the whole kernel (``local`` scope with the same thread mapping in every block
  that touches it), rescaled and accumulated per tile and divided by the row sum at the end.

Masks, exponentials and the output use the same thread mapping as the scores. Masked key tiles
are not skipped on CUDA (`FlashTiling.skip_masked` off: the branch around a tile would put its
barriers under a condition); the causal diagonal and kv_length still bound the tile loop.
Float16/bfloat16 inputs are converted to float32 as they are read (float32 accumulation on CUDA
cores; tensor cores are not used yet). GQA: a query head reads its key/value head by index (the
compute's ``h // group``); nothing is copied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import s_tir, tirx

from ..ops.attention import FlashTiling
from ._tir import all_blocks as _blocks
from ._tir import static_extent

WARP = 32


@dataclass(frozen=True)
class CudaAttentionKnobs:
    """Tunable knobs of the CUDA flash attention schedule."""

    query_block: int = 32  # query rows per thread block (they share each K/V tile)
    key_block: int = 64  # keys per tile (the online-softmax rescale granularity)
    warps: int = 4  # threadIdx.y: warps per thread block
    softmax_algorithm: str = "auto"  # materialized: the softmax algorithm of the score rows

    def tiling(self) -> FlashTiling:
        # No masked-tile skipping: its branch around a tile would put the tile's barriers under
        # a condition (CUDA needs every thread of a block at each barrier).
        return FlashTiling(query_block=self.query_block, key_block=self.key_block, skip_masked=False)

    def to_json(self) -> dict:
        return asdict(self)

    def check(self, spec) -> None:
        from ..errors import TvmSoftmaxError

        problems = []
        if self.query_block % self.warps:
            problems.append(f"query_block {self.query_block} is not a multiple of warps {self.warps}")
        if self.key_block % WARP:
            problems.append(f"key_block {self.key_block} is not a multiple of {WARP}")
        shared = shared_bytes(self, spec)
        if shared > SHARED_LIMIT:
            problems.append(f"up to {shared} bytes of shared memory per block (limit {SHARED_LIMIT})")
        if problems:
            raise TvmSoftmaxError(f"CUDA flash attention knobs {self.to_json()}: " + "; ".join(problems))


# Static shared arrays of one block (no opt-in to more than 48 KiB).
SHARED_LIMIT = 48 * 1024


def shared_bytes(knobs: CudaAttentionKnobs, spec) -> int:
    """Shared memory of one thread block, at most (TVM reuses a buffer whose use has ended): the
    packed K tile (float32), the probabilities tile (float32), Q's rows and the V tile."""
    item = 2 if spec.dtype in ("float16", "bfloat16") else 4
    qb, kb = knobs.query_block, knobs.key_block
    return (spec.head_size * kb + qb * kb) * 4 + (qb * spec.head_size + kb * spec.v_head_size) * item


# (query_block, key_block), best first: 64-key tiles where they fit, smaller ones for wide heads.
_TILES = ((32, 64), (32, 32), (16, 32))


def choose(requested: str, dims: dict, spec, algorithm: str = "auto") -> tuple[str, CudaAttentionKnobs]:
    """`auto` on CUDA: flash, 4 warps, the first tile of `_TILES` that fits 48 KiB of shared
    memory. ``materialized`` keeps the scores in global memory (`schedule_materialized`, its
    softmax by `schedules.cuda`)."""
    strategy = "flash" if requested == "auto" else requested
    for query_block, key_block in _TILES:
        knobs = CudaAttentionKnobs(query_block=query_block, key_block=key_block, warps=4,
                                   softmax_algorithm=algorithm)
        if shared_bytes(knobs, spec) <= SHARED_LIMIT:
            break
    if strategy == "flash":
        knobs.check(spec)
    return strategy, knobs


def _thread_per_element(sch, loops, threads: int) -> None:
    """Fused `loops` -> (blockIdx.x, threadIdx.x): a thread per element, `threads` per block."""
    bx, tx = sch.split(sch.fuse(*loops), [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _bind(sch, ty, tx) -> None:
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def _spread(sch, loops, knobs: CudaAttentionKnobs) -> None:
    """Fused `loops` -> (serial, threadIdx.y, threadIdx.x): every thread of the block takes one
    element per step, consecutive threads consecutive elements (a predicate where the extent is
    not a whole number of steps)."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, ty, tx = sch.split(fused, [None, knobs.warps, WARP])
    _bind(sch, ty, tx)


def _tile_2d(sch, rows, cols, knobs: CudaAttentionKnobs):
    """rows x cols -> thread (y, x) owns rows y*rq + [0, rq) and columns x*rc + [0, rc): returns
    (ty, tx, row_inner, col_inner). Every [rows, keys] and [rows, values] block uses this mapping
    and the row reductions split the same way, so a thread reads back from its registers exactly
    what it wrote (TVM compacts a ``local`` buffer to the thread's own rq x rc region)."""
    rq = static_extent(sch.get(rows).extent) // knobs.warps
    ty, ri = sch.split(rows, [knobs.warps, rq])
    tx, ci = sch.split(cols, [WARP, None])
    return ty, tx, ri, ci


def _elementwise(sch, block, knobs: CudaAttentionKnobs) -> None:
    rows, cols = sch.get_loops(block)[-2:]
    ty, tx, ri, ci = _tile_2d(sch, rows, cols, knobs)
    sch.reorder(ty, tx, ri, ci)
    _bind(sch, ty, tx)


def _copy_to_shared(sch, block, buffer: str, knobs: CudaAttentionKnobs) -> None:
    """The tile of `buffer` that `block` reads, copied to shared memory by all threads first."""
    index = [str(region.source.name) for region in sch.get(block).reads].index(buffer)
    copy = sch.cache_read(block, index, "shared")
    _spread(sch, sch.get_loops(copy)[-len(sch.get(copy).iter_vars):], knobs)


def _reduce_rows(sch, block, knobs: CudaAttentionKnobs) -> None:
    """[rows, n] -> [rows]: rows as in `_tile_2d`, the reduction over threadIdx.x (n / 32
    elements per thread, then TVM's cross-thread reduction of max/sum: warp shuffles); the result
    reaches every lane of the warp."""
    rows, keys = sch.get_loops(block)[-2:]
    ty, _ = sch.split(rows, [knobs.warps, None])
    tx, _ = sch.split(keys, [WARP, None])
    _bind(sch, ty, tx)


def _row_state(sch, block, knobs: CudaAttentionKnobs) -> None:
    """Per-row state (running max and sum, rescale factor): warp y holds its rows' state and every
    lane keeps its own copy in registers (threadIdx.x unbound: the lanes compute the same values,
    each into its own registers; no race, no shared memory)."""
    (rows,) = sch.get_loops(block)[-1:]
    ty, _ = sch.split(rows, [knobs.warps, None])
    sch.bind(ty, "threadIdx.y")


def _inner_product(sch, block, knobs: CudaAttentionKnobs, shared: list) -> None:
    """Q K^T ([rows, keys] over D) and P V ([rows, values] over keys): register blocks of
    `_tile_2d`, the reduction outside them; the operands are in shared memory (the compute's
    copies of Q's rows and of the V tile, the probabilities) or copied there (`shared`: the
    packed K tile)."""
    loops = sch.get_loops(block)[-3:]
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    reduce_at = kinds.index(tirx.IterVar.CommReduce)
    spatial = [loop for i, loop in enumerate(loops) if i != reduce_at]
    ty, tx, ri, ci = _tile_2d(sch, spatial[0], spatial[1], knobs)
    sch.reorder(ty, tx, loops[reduce_at], ri, ci)
    for buffer in shared:
        _copy_to_shared(sch, block, buffer, knobs)
    _bind(sch, ty, tx)
    sch.decompose_reduction(block, loops[reduce_at])


# Blocks whose loops stay as they are: the kernels' outer levels and the scopes of the tiles.
_OUTER = ("root", "flash_key_t", "flash_block")
# Buffers of the compute's thread block (names from `ops.attention`) and where they live: the
# registers of a thread hold its rq x rc tile of scores, its part of the output accumulator and
# its warp's row state; the probabilities are shared (P V reads every key of a row).
_SCOPES = {"probs": "shared", "q_rows": "shared", "v_tile": "shared"}  # every other one: "local"


def schedule_flash(func: tirx.PrimFunc, knobs: CudaAttentionKnobs) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    # K packed per tile (float32, the compute's layout): a thread per element.
    _thread_per_element(sch, sch.get_loops(blocks["flash_key_t"]), 256)
    # A thread block per (batch, head, query block).
    sch.bind(sch.fuse(*sch.get_loops(blocks["flash_block"])), "blockIdx.x")
    in_place = []
    for name, block in blocks.items():
        base = name.removesuffix("_full")
        if base in _OUTER or base.endswith(("_scope", "_tile")):
            continue
        if base == "flash_qk":
            _inner_product(sch, block, knobs, ["key_tiles"])
        elif base == "flash_pv":
            _inner_product(sch, block, knobs, [])
        elif base in ("flash_q", "flash_v"):  # the operand copies: shared, all threads copy
            _spread(sch, sch.get_loops(block)[-2:], knobs)
        elif base in ("flash_tile_max", "flash_sum", "flash_open"):
            _reduce_rows(sch, block, knobs)
        elif base in ("flash_init_acc", "flash_output", "flash_mask", "flash_exp"):
            _elementwise(sch, block, knobs)
        elif base == "flash_init":
            _row_state(sch, block, knobs)
        elif base in ("flash_rescale", "flash_total", "flash_update"):
            in_place.append(name)
        else:
            from ..errors import TvmSoftmaxError

            raise TvmSoftmaxError(f"the CUDA flash schedule has no rule for block {name!r} of the compute")
    _set_scopes(sch)
    # The running-state updates read and write the same element of their buffers (m = max(m,
    # tile max), l = l * alpha + tile sum, acc = acc * alpha + P V): elements are independent,
    # but TensorIR's bind refuses any block that reads what it writes, so only these loops are
    # bound without that check.
    unchecked = s_tir.Schedule(sch.mod, enable_check=False)
    for name in in_place:
        if name.removesuffix("_full") == "flash_update":
            _elementwise(unchecked, unchecked.get_sblock(name), knobs)
        else:
            _row_state(unchecked, unchecked.get_sblock(name), knobs)
    return unchecked.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_materialized(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The score and output kernels of the materialized strategy (their softmax is scheduled by
    `schedules.cuda`): a thread per output element, its reduction (over D, or over the keys)
    serial in the thread. Correct for every shape, not tuned: on CUDA flash is the fast strategy
    (TVM's dlight rules refuse these kernels: their reduction loops are not the innermost)."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
        loops = sch.get_loops(block)
        spatial = [loop for loop, kind in zip(loops, kinds) if kind == tirx.IterVar.DataPar]
        _thread_per_element(sch, spatial, 128)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _set_scopes(sch) -> None:
    """Each buffer of the thread block in the scope `_SCOPES` gives it (set through one block that
    writes it)."""
    done = set()
    for block in _blocks(sch).values():
        for index, region in enumerate(sch.get(block).writes):
            name = str(region.source.name)
            if name in done or region.source.scope() != "global" or name in ("y", "key_tiles"):
                continue
            done.add(name)
            sch.set_scope(block, index, _SCOPES.get(name, "local"))
