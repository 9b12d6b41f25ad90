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
GQA: a query head reads its key/value head by index (the compute's ``h // group``); nothing is
copied.

Tensor cores (float16/bfloat16 inputs whose head sizes are multiples of 16; `auto` picks them,
knob ``operand_dtype``): the compute keeps the packed K tiles and P in the input dtype
(`FlashTiling.operand_dtype`), and both inner products become TVM's WMMA intrinsics
(16 x 16 x 16, float32 accumulators): the output fragments of a tile are spread over the warps,
each accumulated over 16-deep steps from matrix_a/matrix_b fragments loaded from shared memory,
then stored to shared memory (the scores for the softmax, which runs as above; the tile's P V for
the update of the register accumulator acc = acc * alpha + P V). The 16-bit operands live in
dynamic shared memory, the float32 results in static shared memory (see `SHARED`). Without
tensor cores 16-bit inputs are converted to float32 as they are read (CUDA cores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import s_tir, tirx

from ..ops.attention import FlashTiling
from ._tir import all_blocks as _blocks
from ._tir import reduce_loop_index, static_extent

WARP = 32


@dataclass(frozen=True)
class CudaAttentionKnobs:
    """Tunable knobs of the CUDA flash attention schedule."""

    query_block: int = 32  # query rows per thread block (they share each K/V tile)
    key_block: int = 64  # keys per tile (the online-softmax rescale granularity)
    warps: int = 4  # threadIdx.y: warps per thread block
    softmax_algorithm: str = "auto"  # materialized: the softmax algorithm of the score rows
    # The inner products' operand dtype (K tiles, P): "float32" multiplies on CUDA cores;
    # "float16"/"bfloat16" (the input's dtype) on tensor cores (WMMA 16x16x16, float32 sums).
    operand_dtype: str = "float32"

    @property
    def tensor_cores(self) -> bool:
        return self.operand_dtype in TENSOR_CORE_DTYPES

    def tiling(self) -> FlashTiling:
        # No masked-tile skipping: its branch around a tile would put the tile's barriers under
        # a condition (CUDA needs every thread of a block at each barrier).
        return FlashTiling(query_block=self.query_block, key_block=self.key_block, skip_masked=False,
                           operand_dtype=self.operand_dtype)

    def to_json(self) -> dict:
        return asdict(self)

    def check(self, spec) -> None:
        from ..errors import TvmSoftmaxError

        problems = []
        if self.query_block % self.warps:
            problems.append(f"query_block {self.query_block} is not a multiple of warps {self.warps}")
        if self.key_block % WARP:
            problems.append(f"key_block {self.key_block} is not a multiple of {WARP}")
        if self.operand_dtype not in ("float32", *TENSOR_CORE_DTYPES):
            problems.append(f"operand_dtype {self.operand_dtype} is not float32, float16 or bfloat16")
        elif self.tensor_cores:
            problems += _tensor_core_problems(self, spec)
        shared = shared_bytes(self, spec)
        if shared > SHARED_LIMIT:
            problems.append(f"up to {shared} bytes of shared memory per block (limit {SHARED_LIMIT})")
        if problems:
            raise TvmSoftmaxError(f"CUDA flash attention knobs {self.to_json()}: " + "; ".join(problems))


# Static shared arrays of one block (no opt-in to more than 48 KiB).
SHARED_LIMIT = 48 * 1024
TENSOR_CORE_DTYPES = ("float16", "bfloat16")
FRAGMENT = 16  # WMMA tiles are 16 x 16 x 16
# With tensor cores the 16-bit operands live in dynamic shared memory and the float32 results of
# the fragments in static shared memory: TVM's reuse of static shared buffers whose lifetimes do
# not overlap would place a float16 operand in a float32 buffer, which the WMMA pointers refuse;
# buffers of different scopes are never merged.
SHARED = "shared.dyn"


def _tensor_core_problems(knobs: CudaAttentionKnobs, spec) -> list[str]:
    problems = []
    if knobs.operand_dtype != spec.dtype:
        problems.append(f"tensor cores multiply the input dtype ({spec.dtype}), not {knobs.operand_dtype}")
    sizes = {"query_block": knobs.query_block, "key_block": knobs.key_block, "head_size": spec.head_size,
             "v_head_size": spec.v_head_size}
    problems += [f"{name} {size} is not a multiple of {FRAGMENT}" for name, size in sizes.items() if size % FRAGMENT]
    for name, cols in (("key_block", knobs.key_block), ("v_head_size", spec.v_head_size)):
        if not problems and _warp_grid(knobs.query_block // FRAGMENT, cols // FRAGMENT, knobs.warps) is None:
            problems.append(f"the {knobs.query_block} x {cols} fragments of {name} do not split over {knobs.warps} warps")
    return problems


def _warp_grid(rows: int, cols: int, warps: int) -> tuple[int, int] | None:
    """(warp rows, warp columns) splitting a rows x cols grid of fragments evenly over `warps`:
    as many warps along the columns as divide them, the rest along the rows (None when the rows
    do not split that way)."""
    import math

    across = math.gcd(cols, warps)
    down = warps // across
    return (down, across) if rows % down == 0 else None


def shared_bytes(knobs: CudaAttentionKnobs, spec) -> int:
    """Shared memory of one thread block, at most (TVM reuses a buffer whose use has ended): Q's
    rows and the V tile (input dtype), the packed K tile and the probabilities (operand dtype),
    and with tensor cores the scores and the tile's P V (float32, stored from the fragments)."""
    item = 2 if spec.dtype in ("float16", "bfloat16") else 4
    operand = 4 if knobs.operand_dtype == "float32" else 2
    qb, kb = knobs.query_block, knobs.key_block
    total = (spec.head_size * kb + qb * kb) * operand + (qb * spec.head_size + kb * spec.v_head_size) * item
    if knobs.tensor_cores:
        total += (qb * kb + qb * spec.v_head_size) * 4
    return total


# (query_block, key_block), best first: 64-key tiles where they fit, smaller ones for wide heads.
_TILES = ((32, 64), (32, 32), (16, 32))


def choose(requested: str, dims: dict, spec, algorithm: str = "auto") -> tuple[str, CudaAttentionKnobs]:
    """`auto` on CUDA: flash; float16/bfloat16 inputs on tensor cores where the head sizes are
    multiples of 16 (else CUDA cores); 4 warps (2 where a tile's fragments do not split over 4);
    the first tile of `_TILES` that fits 48 KiB of shared memory (and, for tensor cores, splits
    into 16 x 16 fragments over the warps).
    ``materialized`` keeps the scores in global memory (`schedule_materialized`, its softmax by
    `schedules.cuda`)."""
    from ..errors import TvmSoftmaxError

    strategy = "flash" if requested == "auto" else requested
    # (operand dtype, warps) in order of preference: tensor cores with 4 warps, or 2 where the
    # 16 x 16 fragments of a tile do not split over 4 (e.g. 3 of them across a 48-wide head).
    options = [(spec.dtype, 4), (spec.dtype, 2)] if spec.dtype in TENSOR_CORE_DTYPES else []
    knobs = None
    for operand, warps in [*options, ("float32", 4)]:
        for query_block, key_block in _TILES:
            candidate = CudaAttentionKnobs(query_block=query_block, key_block=key_block, warps=warps,
                                           softmax_algorithm=algorithm, operand_dtype=operand)
            try:
                candidate.check(spec)
            except TvmSoftmaxError:
                knobs = knobs or candidate
                continue
            knobs = candidate
            break
        else:
            continue
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
    copy = sch.cache_read(block, index, SHARED if knobs.tensor_cores else "shared")
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
    reduce_at = reduce_loop_index(sch, block, loops)
    spatial = [loop for i, loop in enumerate(loops) if i != reduce_at]
    ty, tx, ri, ci = _tile_2d(sch, spatial[0], spatial[1], knobs)
    sch.reorder(ty, tx, loops[reduce_at], ri, ci)
    for buffer in shared:
        _copy_to_shared(sch, block, buffer, knobs)
    _bind(sch, ty, tx)
    sch.decompose_reduction(block, loops[reduce_at])


def _wmma_product(sch, block, knobs: CudaAttentionKnobs, a: str, b: str) -> list:
    """An inner product ([rows, cols] over a reduction, float32 sums of 16-bit operands in
    shared memory) on tensor cores: 16 x 16 output fragments spread over the warps
    (`_warp_grid`), each accumulated over 16-deep steps of the reduction in a WMMA accumulator
    from fragments of `a` and `b` loaded from shared memory, then stored to the block's output
    buffer (which `_set_scopes` puts in shared memory). Returns (block, intrinsic) pairs to
    tensorize once the scopes are set."""
    from tvm.s_tir.tensor_intrin import cuda as intrinsics

    loops = sch.get_loops(block)[-3:]
    reduce_at = reduce_loop_index(sch, block, loops)
    rows, cols = [loop for i, loop in enumerate(loops) if i != reduce_at]
    row_tiles, row_in = sch.split(rows, [None, FRAGMENT])
    col_tiles, col_in = sch.split(cols, [None, FRAGMENT])
    depth, depth_in = sch.split(loops[reduce_at], [None, FRAGMENT])
    down, across = _warp_grid(static_extent(sch.get(row_tiles).extent), static_extent(sch.get(col_tiles).extent),
                              knobs.warps)
    warp_row, row_tiles = sch.split(row_tiles, [down, None])
    warp_col, col_tiles = sch.split(col_tiles, [across, None])
    sch.reorder(warp_row, warp_col, row_tiles, col_tiles, depth, row_in, col_in, depth_in)
    sch.bind(sch.fuse(warp_row, warp_col), "threadIdx.y")
    store = sch.cache_write(block, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, col_tiles, preserve_unit_loops=True)
    names = [str(region.source.name) for region in sch.get(block).reads]

    def index(name):  # the buffer, or its shared copy ("<name>_shared...")
        return next(i for i, n in enumerate(names) if n.startswith(name))

    frag_a = sch.cache_read(block, index(a), "wmma.matrix_a")
    frag_b = sch.cache_read(block, index(b), "wmma.matrix_b")
    sch.compute_at(frag_a, depth)
    sch.compute_at(frag_b, depth)
    init = sch.decompose_reduction(block, depth)
    dtype = knobs.operand_dtype
    return [(frag_a, _intrinsic("load_a", dtype)), (frag_b, _intrinsic("load_b", dtype)),
            (init, intrinsics.WMMA_FILL_16x16x16_F32_INTRIN), (block, _intrinsic("sync", dtype)),
            (store, intrinsics.WMMA_STORE_16x16x16_F32_SHARED_INTRIN)]


def _intrinsic(kind: str, dtype: str) -> str:
    """TVM's WMMA intrinsics for float16; bfloat16 ones registered here (same shapes)."""
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin import cuda as intrinsics

    if dtype == "float16":
        return {"load_a": intrinsics.WMMA_LOAD_16x16x16_F16_A_DYN_INTRIN,
                "load_b": intrinsics.WMMA_LOAD_16x16x16_F16_B_DYN_INTRIN,
                "sync": intrinsics.WMMA_SYNC_16x16x16_f16f16f32_INTRIN}[kind]
    name = f"tvmsoftmax_wmma_{kind}_16x16x16_{dtype}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        if kind == "sync":
            pair = intrinsics.get_wmma_sync_intrin(16, 16, 16, dtype, "float32", False)
        else:
            pair = intrinsics.get_wmma_load_intrin(16, 16, 16, dtype, SHARED, kind == "load_b", False)
        TensorIntrin.register(name, *pair)
    return name


def _tensorize(sch, pairs) -> None:
    """Each block's 16 x 16 (x 16) inner loops replaced by its intrinsic."""
    for block, intrinsic in pairs:
        loops = sch.get_loops(block)
        sch.tensorize(loops[-3] if intrinsic.startswith(("wmma_sync", "tvmsoftmax_wmma_sync")) else loops[-2],
                      intrinsic)


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
    in_place, tensorized = [], []
    for name, block in blocks.items():
        base = name.removesuffix("_full")
        if base in _OUTER or base.endswith(("_scope", "_tile")):
            continue
        if base == "flash_qk" and knobs.tensor_cores:
            _copy_to_shared(sch, block, "key_tiles", knobs)
            tensorized += _wmma_product(sch, block, knobs, "q_rows", "key_tiles")
        elif base == "flash_pv" and knobs.tensor_cores:
            tensorized += _wmma_product(sch, block, knobs, "probs", "v_tile")
        elif base == "flash_qk":
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
    # With tensor cores the scores and the tile's P V come out of fragments through shared memory.
    tensor_scopes = {"dots": "shared", "tile_pv": "shared", "q_rows": SHARED, "probs": SHARED, "v_tile": SHARED}
    _set_scopes(sch, tensor_scopes if knobs.tensor_cores else {})
    _tensorize(sch, tensorized)
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


def _set_scopes(sch, extra: dict) -> None:
    """Each buffer of the thread block in the scope `_SCOPES` (or `extra`) gives it (set through
    one block that writes it)."""
    scopes = {**_SCOPES, **extra}
    done = set()
    for block in _blocks(sch).values():
        for index, region in enumerate(sch.get(block).writes):
            name = str(region.source.name)
            if name in done or region.source.scope() != "global" or name in ("y", "key_tiles"):
                continue
            done.add(name)
            sch.set_scope(block, index, scopes.get(name, "local"))
