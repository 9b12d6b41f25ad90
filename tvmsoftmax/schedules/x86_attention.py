"""x86 (LLVM) schedules for the fused attention of `tvmsoftmax.ops.attention`.

Both strategies are parallel over (batch, head, query block) and vectorise inner products along
the contiguous axis: scores along keys (the compute packs K as [D, Skv] per head, so a vector of
keys is one load), P @ V along the value dim. Inner products are register-blocked: `rows` query
rows times `key_block` keys (or the value dim) accumulate in vector registers while the reduction
axis runs outside them.

Blocks are found by the names the compute gives them (``flash_*``, ``attention_*``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import s_tir, tirx

from ..ops.attention import FlashTiling
from . import intrinsics
from ._tir import all_blocks as _blocks
from ._tir import STACK_SCRATCH_ATTR, reduce_loop_index, static_extent


@dataclass(frozen=True)
class X86AttentionKnobs:
    """Tunable knobs of the x86 attention schedules."""

    vector_lanes: int = 8  # float32 lanes of a vector register
    query_block: int = 32  # query rows that share each K/V tile (flash) or score tile
    key_block: int = 64  # keys per tile (flash: the online-softmax rescale granularity)
    rows: int = 4  # query rows of one register block of the scores (Q K^T)
    pv_rows: int = 4  # query rows of one register block of P V (and the materialized output)
    softmax_algorithm: str = "auto"  # materialized: the softmax algorithm of the score rows
    fold_group: bool = False  # flash, GQA: a block's rows span the query heads of a K/V head
    pack_keys: bool = True  # flash: K packed per tile for the inner products (else read in place)
    transpose_keys: bool = True  # flash: K's whole tiles packed by in-register transposes
    key_tail: int = 0  # flash: keys of the narrow tile past the whole ones (0: tiles all whole)

    def tiling(self) -> FlashTiling:
        return FlashTiling(query_block=self.query_block, key_block=self.key_block, fold_group=self.fold_group,
                           pack_keys=self.pack_keys, pack_whole_tiles_apart=self.transpose_keys,
                           key_tail=self.key_tail)

    def to_json(self) -> dict:
        return asdict(self)


def _vectorize(sch, loop, lanes: int, unroll: bool = False):
    extent = static_extent(sch.get(loop).extent)
    if extent is None or extent % lanes:
        return
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    if unroll:
        sch.unroll(outer)


def _register_block(sch, block, row_loop, reduce_loop, vector_loop, lanes: int, rows: int):
    """(rows x vector) accumulators in registers, the reduction axis outside them. They live in a
    block-local buffer written back once per register block (`cache_write`): accumulating in the
    output buffer itself left LLVM a memset of it before every block (2-3% of the flash kernel)."""
    rows = rows if static_extent(sch.get(row_loop).extent) % rows == 0 else 1
    row_outer, row_inner = sch.split(row_loop, [None, rows])
    vec_outer, vec_inner = sch.split(vector_loop, [None, lanes])
    sch.reorder(row_outer, reduce_loop, row_inner, vec_outer, vec_inner)
    writeback = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(writeback, row_outer, preserve_unit_loops=True)
    back_rows, back_vector = sch.get_loops(writeback)[-2:]
    _vectorize(sch, back_vector, lanes, unroll=True)
    sch.unroll(back_rows)
    _register_loops(sch, block, reduce_loop, row_inner, vec_outer, vec_inner)


def _register_loops(sch, block, reduce_loop, row_inner, vec_outer, vec_inner):
    sch.vectorize(vec_inner)
    sch.unroll(vec_outer)
    sch.unroll(row_inner)
    sch.decompose_reduction(block, reduce_loop)


def _register_block_into(sch, block, consumer, lanes: int, rows: int):
    """`block` (rows x vector, reduced over its middle loop) computed per register block of
    `consumer`'s rows, its accumulators in registers that `consumer` (an in-place elementwise
    update of another buffer, e.g. acc = acc * alpha + P V) reads directly: no write-back of the
    product to memory (the copy was 4.4% of the D=128 kernel)."""
    writeback = sch.cache_write(block, 0, "local")
    sch.compute_inline(writeback)
    c_rows, c_vector = sch.get_loops(consumer)[-2:]
    rows = rows if static_extent(sch.get(c_rows).extent) % rows == 0 else 1
    row_outer, c_inner = sch.split(c_rows, [None, rows])
    _vectorize(sch, c_vector, lanes, unroll=True)
    sch.unroll(c_inner)
    sch.compute_at(block, row_outer, preserve_unit_loops=True)
    loops = sch.get_loops(block)[-3:]  # compute_at orders them as the block's axes
    reduce_loop = loops[reduce_loop_index(sch, block, loops)]
    row_inner, vector_loop = [loop for loop in loops if loop != reduce_loop]
    vec_outer, vec_inner = sch.split(vector_loop, [None, lanes])
    sch.reorder(reduce_loop, row_inner, vec_outer, vec_inner)
    _register_loops(sch, block, reduce_loop, row_inner, vec_outer, vec_inner)


def _lane_reduce(sch, block, lanes: int):
    """A row reduction [rows(, keys), n] -> [rows(, keys)] as `lanes` partial results per row
    (rfactor), combined vector-wise along the row, then `lanes` scalars per row: the serial chain
    of n dependent max/add becomes n / lanes vector ops."""
    loops = sch.get_loops(block)
    reduce = loops[-1]
    extent = static_extent(sch.get(reduce).extent)
    if extent is None or extent % lanes:
        return
    axis = len(sch.get(block).iter_vars) - 1  # the partial results after the block's spatial axes
    _outer, inner = sch.split(reduce, [None, lanes])
    partial = sch.rfactor(inner, factor_axis=axis)
    step, lane = sch.get_loops(partial)[-2:]  # rfactor keeps the order: lane is innermost
    sch.vectorize(lane)
    sch.decompose_reduction(partial, step)
    # The lanes are combined by halving (16 -> 8 -> 4 -> 2 per row, vector ops, then the last two
    # as scalars): left as one loop over lanes, LLVM gathered the partial results across rows
    # (vgatherqps, about 7% of the flash kernel's time).
    width = lanes
    while width > 2:
        width //= 2
        _outer, inner = sch.split(sch.get_loops(block)[-1], [2, width])
        level = sch.rfactor(inner, factor_axis=axis)
        halves, half = sch.get_loops(level)[-2:]  # rfactor keeps the order: the half is innermost
        sch.vectorize(half)
        sch.decompose_reduction(level, halves)
        sch.unroll(halves)
    sch.unroll(sch.get_loops(block)[-1])


def _reads(sch, block, buffer_name: str) -> bool:
    return any(str(region.source.name) == buffer_name for region in sch.get(block).reads)


def _base(name: str) -> str:
    """A flash block's name without the suffixes of its copies: `_tail` (the narrow last key
    tile, `FlashTiling.key_tail`), `_full` (the block recomputed without skipping) and `_decode`
    (a decoding step's blocks, `ops.attention._flash_body`)."""
    return name.removesuffix("_tail").removesuffix("_full").removesuffix("_decode")


def _schedule_key_packing(sch, block, lanes: int, transpose: bool):
    """K [key, D] -> [D, key] (flash: per key tile; materialized: per head), parallel over (batch,
    head). A plain copy (flash: the whole tiles, `FlashTiling.pack_whole_tiles_apart`; the
    materialized strategy's, at static lengths) of float32 K is transposed lanes x lanes in
    registers (`intrinsics.transpose`): K packing was 10% of the kernel at (1,12,128,64) and 4%
    at S=512, stored lane by lane. Otherwise K is packed key by key: a key's row is one vector
    load (its bounds check one per key), its lanes stored a tile row apart. Element by element,
    a check each, the packing took 80% of a decoding step's kernel (0.66 -> 0.44 ms at 32 heads,
    1025 keys, D=128); a vector of keys gathered from D-strided rows: 0.54 ms."""
    loops = sch.get_loops(block)
    e, j = loops[-2:]
    if sch.get(loops[0]).kind != tirx.ForKind.PARALLEL:  # else: (batch, head) fused for a sibling
        sch.parallel(sch.fuse(*loops[:2]))
    dtype = sch.get(block).writes[0].source.dtype
    reads = {str(region.source.dtype) for region in sch.get(block).reads}
    extents = static_extent(sch.get(e).extent), static_extent(sch.get(j).extent)
    if transpose and reads == {str(dtype)} and all(x is not None and x % lanes == 0 for x in extents):
        e_outer, e_inner = sch.split(e, [None, lanes])
        j_outer, j_inner = sch.split(j, [None, lanes])
        sch.reorder(e_outer, j_outer, e_inner, j_inner)
        sch.tensorize(e_inner, intrinsics.transpose(lanes, str(dtype), str(sch.get(e_inner).loop_var.ty)))
        return
    sch.reorder(j, e)
    _vectorize(sch, e, lanes)


def schedule_flash(func: tirx.PrimFunc, knobs: X86AttentionKnobs) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    lanes = knobs.vector_lanes
    for name, block in blocks.items():
        if name in ("flash_key_t", "flash_key_t_tail"):
            _schedule_key_packing(sch, block, lanes, transpose=name == "flash_key_t" and knobs.transpose_keys)
    for name, block in blocks.items():
        if _base(name) == "flash_block":  # one, or a decoding step's and the rest's
            sch.parallel(sch.fuse(*sch.get_loops(block)))
    for name, block in blocks.items():
        base = _base(name)
        if base == "flash_qk" and not _reads(sch, block, "key_tiles"):
            # K read where it is (few rows, decoding): each score a dot product along D in vector
            # lanes, then the lanes summed by halving (no packing: a decoding step reads each key
            # once, and packing it cost more than the products); the mask is a pass of its own
            _lane_reduce(sch, block, lanes)
        elif base == "flash_qk":
            rows, keys, depth = sch.get_loops(block)
            # a narrow last tile (`key_tail`) holds as many accumulators in more rows
            width = static_extent(sch.get(keys).extent)
            rows_of_block = min(knobs.rows * max(1, knobs.key_block // (width or knobs.key_block)), knobs.query_block)
            _register_block(sch, block, rows, depth, keys, lanes, rows_of_block)
            # Scale and mask applied as the accumulators are written back: the raw dot products
            # never reach memory (a separate pass over the tile cost about 1.5%). The softmax
            # passes stay over the whole tile: run per register block of rows (its scores still
            # in L1) they were slower, bound by the latency of each row's max and sum.
            sch.reverse_compute_inline(blocks[name.replace("flash_qk", "flash_mask")])
        elif base in ("flash_tile_max", "flash_sum", "flash_open"):
            _lane_reduce(sch, block, lanes)
        elif base in ("flash_exp", "flash_init_acc", "flash_output"):
            _vectorize(sch, sch.get_loops(block)[-1], lanes)
    # P V's accumulators are read by the update of the running state (acc = acc * alpha + P V)
    # straight from registers, per register block of rows: the scope reads acc before it writes
    # it, which TensorIR's stage-pipeline check refuses although each register block reads its
    # rows of acc before it writes them and blocks own disjoint rows; so these steps run unchecked.
    unchecked = s_tir.Schedule(sch.mod, enable_check=False)
    for name in blocks:
        if _base(name) == "flash_pv":
            block = unchecked.get_sblock(name)
            update = unchecked.get_sblock(name.replace("flash_pv", "flash_update"))
            _register_block_into(unchecked, block, update, lanes, knobs.pv_rows)
            # P V reads V where it is (contiguous rows already): the compute's copy of the tile's
            # rows of V would cost a load and a store per element per tile.
            unchecked.compute_inline(unchecked.get_sblock(name.replace("flash_pv", "flash_v")))
    # Likewise Q K^T reads Q's rows where they are (the block's copy: 4% at S=128).
    for name in blocks:
        if _base(name) == "flash_q":
            unchecked.compute_inline(unchecked.get_sblock(name))
    return unchecked.mod["main"].with_attrs({"tirx.is_scheduled": True, STACK_SCRATCH_ATTR: True})


# Blocks of at most this many query rows read K in place (a dot product per score along D, its
# lanes summed by halving) instead of packing it: a decoding step reads each key once, and the
# packing (a transpose, 16 lane stores per vector) cost more than the products. Decode step,
# 1025 keys, D=128, 1 thread, the kernel packed -> in place: 32 q / 8 kv heads (4 rows) 0.42 ->
# 0.17 ms; 32 / 4 (8 rows) 0.27 -> 0.18; 64 / 4 (16 rows) 0.39 -> 0.33; 32 / 1 (32 rows)
# 0.146 -> 0.155, so packed from 32 rows.
UNPACKED_ROWS = 16


def _tile(length, whole: int, half: int, saving_percent: int) -> int:
    """`whole`, or `half` where a static `length` padded to `half`s is at least `saving_percent`
    shorter than padded to `whole`s."""
    if not isinstance(length, int) or length <= 0:
        return whole
    padded = lambda size: -(-length // size) * size  # noqa: E731
    return half if padded(half) * 100 <= padded(whole) * (100 - saving_percent) else whole


# The narrow key tile of a symbolic Skv: this many keys (or a vector), used where the keys past the
# last whole tile fit (at run time). Symbolic Skv, (1, 12, S, 64), 1 thread, kernel ms, whole tiles
# / 16 / 32: S = 77 0.31 / 0.22 / 0.25; 150 0.74 / 0.75 / 0.65; 197 1.35 / 1.16 / 1.22; 64, 100
# and 180 alike. 32 pays off at half the lengths, 16 at a quarter.
NARROW_KEYS = 32


def key_tail(kv_len, key_block: int, lanes: int) -> int:
    """`X86AttentionKnobs.key_tail`: for a static `kv_len`, its keys past the last whole tile padded
    to whole vectors (one narrow tile; 0 where the tiles divide it or the padding fills a tile);
    for a symbolic one, NARROW_KEYS (at least a vector; 0 where that fills a tile)."""
    if isinstance(kv_len, int):
        tail = -(-(kv_len % key_block) // lanes) * lanes
    else:
        tail = max(NARROW_KEYS, lanes)
    return tail if tail < key_block else 0


def choose(requested: str, dims: dict, spec, vector_lanes: int, algorithm: str = "auto"):
    """The `auto` rule for x86: flash (it never materialises the scores and skips masked tiles;
    it was faster than materialized on every benchmark shape, benchmarks/README.md).

    Knobs: 32-row query blocks (fewer when the query length is known and shorter: a power of two
    at least as long; 16 where a static length pads much less so, `_tile`) and 64-key tiles (a
    packed K tile of 64 x D floats stays in L1/L2 while the block's rows use it), the keys past
    the last whole one in narrow tiles (`key_tail`: one as wide as they are where the length is
    static, a 32-key one where it is not and they fit); GQA/MQA blocks fold the query heads of a
    key/value head into their rows
    (`FlashTiling.fold_group`; decoding 32 query heads over 8 key/value heads, 1025 keys, D=128,
    1 thread: the kernel 1.10 -> 0.71 ms); with a query length known only at run time the kernel
    holds a decoding step's own blocks (as many rows as the group) beside the 32-row ones (that
    step's kernel 0.71 -> 0.42 ms). Register blocks hold at most half the vector registers as
    accumulators (32 registers with AVX-512, 16 with AVX2), the rest for operands: scores
    rows x key_block / lanes, P V pv_rows x Dv / lanes. Measured (1 thread, (1,12,512,64)):
    AVX-512 4 rows 157 GFLOP/s vs 8-row/32-key 130; AVX2 code 1 row 86 vs 2 rows 58 (spills).
    """
    strategy = "flash" if requested == "auto" else requested
    fold = spec.group > 1 and strategy == "flash"
    q_len = dims.get("q_len")
    rows = q_len * spec.group if fold and isinstance(q_len, int) else q_len
    # Static lengths that the usual tiles would pad by much: the last key tile is only as wide as
    # the keys left (`key_tail`, in vectors), the query block halves where that pads at least 5%
    # fewer rows (S = 197: 256 keys x 224 rows -> 208 x 208). 1 thread, interleaved, kernel alone:
    # (1, 12, 197, 64) 1.36 ms (whole tiles) -> 1.24 (32-key tiles, 16 rows) -> 1.09 (64-key tiles
    # and a 16-key tail); 77: 0.31 -> 0.23 -> 0.20 ms; 100: 0.36 -> 0.32 ms. Where the padding is
    # alike, 32-key tiles ran 8-10% slower (S = 128, 384) and 16-row blocks within noise.
    key_block = 64
    query_block = _tile(rows, 32, 16, saving_percent=5)
    if isinstance(rows, int) and 0 < rows < query_block:
        # few queries (decoding: 1 per head): a block as small as they are, not 32 rows of which
        # all but these repeat the last one (static tiles clamp their rows)
        query_block = 1 << (rows - 1).bit_length()
    budget = (32 if vector_lanes >= 16 else 16) // 2

    def rows_for(width: int) -> int:
        rows = max(1, budget // max(1, -(-width // vector_lanes)))
        return min(1 << (rows.bit_length() - 1), query_block)  # a power of two: it divides the block

    return strategy, X86AttentionKnobs(
        vector_lanes=vector_lanes, query_block=query_block, key_block=key_block,
        rows=rows_for(key_block), pv_rows=rows_for(spec.v_head_size), softmax_algorithm=algorithm,
        fold_group=fold, pack_keys=query_block > UNPACKED_ROWS or (isinstance(rows, int) and rows > UNPACKED_ROWS),
        key_tail=key_tail(dims.get("kv_len"), key_block, vector_lanes),
    )


def schedule_scores(func: tirx.PrimFunc, knobs: X86AttentionKnobs) -> tirx.PrimFunc:
    """attention_key_t (packing), attention_dot [rows, Skv, 1] = reduce over D, then the masked
    attention_scores (elementwise)."""
    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    _schedule_key_packing(sch, blocks["attention_key_t"], knobs.vector_lanes, transpose=knobs.transpose_keys)
    block = blocks["attention_dot"]
    row, key, unit, depth = sch.get_loops(block)
    row_outer, row_inner = sch.split(row, [None, knobs.rows])
    sch.parallel(row_outer)
    keys = static_extent(sch.get(key).extent)
    whole = keys - keys % knobs.key_block if keys is not None else 0
    if 0 < whole < keys:
        # The keys past the last whole key block in a loop of their own (scalar): left in the
        # tiles, the last tile's bounds predicate made TVM scalarise every vector of every tile
        # ((1, 12, 197, 64)'s scores: 17 ms -> 4 ms; 192 keys: 0.6 ms, as LLVM keeps those
        # tiles' sums in registers and not these: the partition leaves the block's write region
        # whole, so a register block (cache_write) cannot be placed per tile here).
        sch.reorder(row_outer, key, row_inner, unit, depth)
        key, _tail = sch.loop_partition(key, [whole, None])
        (block,) = sch.get_child_blocks(key)  # the block of the whole key blocks (renamed)
        row_inner, unit, depth = sch.get_loops(block)[-3:]
    key_outer, key_block = sch.split(key, [None, knobs.key_block])
    sch.reorder(key_outer, depth, row_inner, key_block)
    vec_outer, vec_inner = sch.split(key_block, [None, knobs.vector_lanes])
    sch.vectorize(vec_inner)
    sch.unroll(vec_outer)
    sch.unroll(row_inner)
    sch.decompose_reduction(block, depth)
    row, key, unit = sch.get_loops(blocks["attention_scores"])
    sch.parallel(row)
    _vectorize(sch, sch.fuse(key, unit), knobs.vector_lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_output(func: tirx.PrimFunc, knobs: X86AttentionKnobs) -> tirx.PrimFunc:
    """attention_pv [B, H, Sq, Dv] = reduce over keys, then the empty-row rule and cast."""
    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    output = blocks["attention_output"]
    pv = blocks["attention_pv"]
    b, h, i, e = sch.get_loops(output)
    io, ii = sch.split(i, [None, knobs.query_block])
    outer = sch.fuse(b, h, io)
    sch.parallel(outer)
    for name in ("attention_pv", "attention_open"):
        if name in blocks:
            sch.compute_at(blocks[name], outer, preserve_unit_loops=True)
    loops = sch.get_loops(pv)
    i_loop, e_loop, j_loop = loops[-3:]
    _register_block(sch, pv, i_loop, j_loop, e_loop, knobs.vector_lanes, knobs.pv_rows)
    _vectorize(sch, sch.get_loops(output)[-1], knobs.vector_lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_attention(func: tirx.PrimFunc, kind: str, knobs: X86AttentionKnobs) -> tirx.PrimFunc:
    if kind == "flash":
        return schedule_flash(func, knobs)
    if kind == "scores":
        return schedule_scores(func, knobs)
    return schedule_output(func, knobs)
