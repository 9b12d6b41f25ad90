"""Fused scaled-dot-product attention: the canonical op and its two algorithms (no scheduling here).

The canonical op (what `lowering.rewrite` turns every recognised form into) works on
Q [B, Hq, Sq, D], K [B, Hkv, Skv, D], V [B, Hkv, Skv, Dv] (Hq a multiple of Hkv; query head h
reads key/value head h // (Hq / Hkv), so GQA/MQA heads are indexed, never copied) and computes,
per query row i and key j, in float32:

    s = (q_i . k_j) * scale                      (Attention-23's sqrt(scale) on Q and on K, and
                                                  torch's d^-1/4 on both, are folded into `scale`)
    s = softcap * tanh(s / softcap)              if softcap > 0 (before any mask, as ONNX says)
    s = keep[i, j] ? s : fill                    if a select mask exists (``Where(mask, s, fill)``)
    s = s + bias[i, j]                           if an additive mask/bias exists
    s = -inf   where j >= kv_length[b] (``nonpad_kv_seqlen``) or, if causal, j > i + offset
    y_i = sum_j softmax(s_i)_j v_j                (with a sink logit per head: softmax over
                                                  [s_i, sink_h], its column dropped; flash only)

``bias`` and ``keep`` are 4-D and broadcast (a dim of 1) over batch, heads, queries or keys.
Causal masking (``causal``): 1 is top-left (offset 0: ONNX Attention without a cache), 2 is
bottom-right (offset kv_length - Sq: with a KV cache or ``nonpad_kv_seqlen`` query i of Sq sits at
position kv_length - Sq + i, the 2026 ONNX errata).

Rows whose softmax is undefined follow the source graph (``empty_row``):

* ``nan``: what a decomposed graph gives in onnxruntime (all -inf row -> NaN; +inf or NaN -> NaN).
* ``zero_if_nan``: a decomposed graph with the ``Where(IsNaN(p), 0, p)`` guard: those rows are 0.
* ``zero_if_masked``: ONNX Attention-23+: a row whose every key is masked (decided on the mask,
  causal and padding alone, not on the scores) is 0; NaN scores still propagate elsewhere.

Two algorithms:

* `attention_scores` + `ops.softmax` + `attention_output` (materialized): the scores exist as a
  float32 [B*Hq*Sq, Skv] buffer, normalised by any softmax algorithm of `ops.softmax`.
* `flash_attention` (FlashAttention's online softmax, Milakov & Gimelshein's normalizer on tiles):
  per block of `query_block` rows, keys are visited in tiles of `key_block` (those past the last
  whole tile in a narrower one where they fit, `FlashTiling.key_tail`); each tile's scores
  live in a [query_block, key_block] buffer and the running (max, sum, acc) are rescaled by
  e^(m_old - m_new). No Sq x Skv buffer exists. Tiles are skipped, not computed:
  - above the causal diagonal and past kv_length (exact: those scores are -inf);
  - where every mask value of the tile is at most half the mask dtype's lowest value (the -FLT_MAX /
    -65504 that exporters use): their e^(s - m) is exactly 0 in float32 (onnxruntime flushes it too)
    unless the row's maximum is itself that low, i.e. the row is fully masked; a query block with
    such a row is recomputed without skipping, so the result is that of the full row.
  The tiles are part of the algorithm (they decide where the rescale happens), so `FlashTiling` is
  an argument here; schedules choose its values.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from tvm import te, tirx

from .exp import _dtype, exp_nonpositive

EMPTY_ROW_MODES = ("nan", "zero_if_nan", "zero_if_masked")
FLT_LOWEST = -3.4028234663852886e38
_LOWEST = {"float32": FLT_LOWEST, "float16": -65504.0}


@dataclass(frozen=True)
class AttentionSpec:
    """Everything about one attention site that changes the compute (not the schedule)."""

    q_heads: int
    kv_heads: int
    head_size: int
    v_head_size: int
    dtype: str = "float32"  # of Q, K, V and the output
    scale: float = 1.0
    softcap: float = 0.0
    causal: int = 0  # 0: none, 1: top-left (offset 0), 2: bottom-right (offset kv_length - Sq)
    empty_row: str = "nan"
    bias_dtype: str | None = None  # additive mask/bias present (4-D, broadcast)
    bias_broadcast: tuple = (False, False, False, False)  # dims of size 1 (b, h, q, k)
    keep_broadcast: tuple | None = None  # select mask present (bool, 4-D, broadcast)
    fill: float = FLT_LOWEST  # value of the select mask's masked positions
    kv_lengths: bool = False  # per-batch valid key count (nonpad_kv_seqlen)
    # a per-query-head logit [Hq] that joins every row's softmax without a value (attention sinks:
    # onnxruntime GroupQueryAttention's head_sink; smooth_softmax is a sink of 0); flash only
    sink_dtype: str | None = None

    def __post_init__(self):
        if self.empty_row not in EMPTY_ROW_MODES:
            raise ValueError(
                f"empty_row must be one of {EMPTY_ROW_MODES}, got {self.empty_row!r}"
            )
        if self.q_heads % self.kv_heads:
            raise ValueError(
                f"q_heads {self.q_heads} is not a multiple of kv_heads {self.kv_heads}"
            )

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def to_json(self) -> dict:
        return asdict(self)

    def skip_threshold(self) -> float | None:
        """Mask values at or below this make a score negligible (see the module docstring)."""
        lows = []
        if self.bias_dtype is not None:
            lows.append(_LOWEST.get(self.bias_dtype, FLT_LOWEST) / 2)
        if self.keep_broadcast is not None and self.fill <= FLT_LOWEST / 2:
            lows.append(FLT_LOWEST / 2)
        return max(lows) if lows else None


@dataclass(frozen=True)
class FlashTiling:
    query_block: int = 32
    key_block: int = 64
    # Skip the tiles whose every mask value is negligible (see the module docstring). Off where
    # a schedule cannot branch around a tile (CUDA: the tile's barriers would sit under a
    # condition); the result is the same, only the work differs.
    skip_masked: bool = True
    # The dtype the operands of the two inner products are kept in: the packed K tiles and the
    # probabilities P of a tile (products and sums are float32 either way). float32 keeps P
    # exact; the 16-bit input dtype is what tensor cores multiply (FlashAttention rounds P to it
    # too), and then the row sum is taken over the rounded P, so P V stays normalised.
    operand_dtype: str = "float32"
    # K packed per key tile as [D, key_block] for the inner products (else read where it is)
    pack_keys: bool = True
    # K's whole tiles packed by a block of their own, a plain transpose (which a CPU schedule
    # replaces by in-register transposes), the last, partial tile by another (zeros past Skv);
    # else one block packs every tile (one kernel on CUDA)
    pack_whole_tiles_apart: bool = False
    # GQA/MQA: a block's rows run over the query heads of one key/value head (row r of key/value
    # head g is query head g * group + r // Sq, position r % Sq), so the heads that share K and V
    # share each tile of them too: a decoding step (Sq = 1) has `group` rows per block, each key
    # read once, instead of `group` one-row blocks that each read every key.
    fold_group: bool = False
    # The keys past the last whole key tile (Skv % key_block of them) are visited in a narrow tile
    # of this many keys (a multiple of the schedule's vector width) where they fit in it (decided
    # at run time for a symbolic Skv), else in a whole tile: at Skv = 197, whole 64-key tiles
    # compute 256 keys, a 16-key narrow tile 208. 0: every tile whole (the keys past Skv masked).
    key_tail: int = 0

    def narrow_width(self, skv) -> int | None:
        """The width of the narrow tile at this Skv, or None where every tile is whole."""
        kb, tail = self.key_block, self.key_tail
        if not 0 < tail < kb:
            return None
        if isinstance(skv, tirx.IntImm):
            rest = skv.value % kb
            return tail if 0 < rest <= tail else None
        return tail

    def last_tile_width(self, skv) -> int:
        """The columns of the last packed K tile that the tiles read."""
        tail = self.narrow_width(skv)
        return tail if tail is not None and isinstance(skv, tirx.IntImm) else self.key_block


def _f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def _to_f32(value: tirx.PrimExpr) -> tirx.PrimExpr:
    return value if _dtype(value) == "float32" else value.astype("float32")


def _load(tensor, *indices) -> tirx.PrimExpr:
    """tensor[indices] for a TE tensor or a TIR buffer (whose [] is not a PrimExpr in TVM 0.27)."""
    if isinstance(tensor, tirx.Buffer):
        return tirx.BufferLoad(tensor, list(indices))
    return tensor[indices]


def _broadcast_index(broadcast: tuple, b, h, i, j) -> list:
    return [
        tirx.const(0, "int64") if flag else index
        for flag, index in zip(broadcast, (b, h, i, j))
    ]


class _Masking:
    """The score element of the module docstring, for TE tensors and TIR buffers alike."""

    def __init__(self, spec: AttentionSpec, bias, keep, kv_lengths, sq, skv, sink=None):
        self.spec, self.bias, self.keep, self.kv_lengths = spec, bias, keep, kv_lengths
        self.sq, self.skv, self.sink = sq, skv, sink  # sink: flash only

    def kv_length(self, b):
        if self.kv_lengths is None:
            return self.skv
        return tirx.max(
            tirx.min(_load(self.kv_lengths, b).astype("int64"), self.skv),
            tirx.const(0, "int64"),
        )

    def key_end(self, b, i):
        """Keys j < key_end(b, i) are allowed for query row i (causal: j <= i + offset)."""
        length = self.kv_length(b)
        if not self.spec.causal:
            return length
        offset = length - self.sq if self.spec.causal == 2 else tirx.const(0, "int64")
        return tirx.min(length, i + offset + 1)

    def allowed(self, b, i, j):
        return j < self.key_end(b, i)

    def bias_value(self, b, h, i, j):
        return _to_f32(
            _load(self.bias, *_broadcast_index(self.spec.bias_broadcast, b, h, i, j))
        )

    def keep_value(self, b, h, i, j):
        return _load(self.keep, *_broadcast_index(self.spec.keep_broadcast, b, h, i, j))

    def score(self, dot, b, h, i, j):
        spec = self.spec
        s = dot * _f32(spec.scale)
        if spec.softcap > 0:
            s = _f32(spec.softcap) * tirx.tanh(s / _f32(spec.softcap))
        if self.keep is not None:
            s = tirx.Select(self.keep_value(b, h, i, j), s, _f32(spec.fill))
        if self.bias is not None:
            s = s + self.bias_value(b, h, i, j)
        return tirx.Select(self.allowed(b, i, j), s, _f32(-math.inf))

    def mask_open(self, b, h, i, j):
        """-inf where the mask alone removes key j (for ``zero_if_masked``), else the bias."""
        value = self.bias_value(b, h, i, j) if self.bias is not None else _f32(0.0)
        return tirx.Select(self.allowed(b, i, j), value, _f32(-math.inf))

    def row_open(self, b, i):
        """max over keys of `mask_open` when it needs no per-key value (no bias): 0 if the row
        allows some key, else -inf; None when the bias decides."""
        if self.bias is not None:
            return None
        return tirx.Select(self.key_end(b, i) > tirx.const(0, "int64"), _f32(0.0), _f32(-math.inf))

    def negligible(self, b, h, i, j, threshold: float):
        """True where the score cannot count unless its row is fully masked (tile skipping)."""
        conditions = [tirx.Not(self.allowed(b, i, j))]
        if self.bias is not None:
            conditions.append(self.bias_value(b, h, i, j) <= _f32(threshold))
        if self.keep is not None and self.spec.fill <= threshold:
            conditions.append(tirx.Not(self.keep_value(b, h, i, j)))
        out = conditions[0]
        for c in conditions[1:]:
            out = tirx.Or(out, c)
        return out


def finalize_row(spec: AttentionSpec, value, total, open_max):
    """y = acc / l with the ``empty_row`` rule; `open_max` >= the lowest float iff the mask keeps
    some key of the row (the maximum of `mask_open`, or 0 / -inf). The row is scaled by 1/l, one
    division per row, not per element (as MLAS's softmax does; a vector division per element cost
    about 2% of the x86 flash kernel)."""
    y = value * (_f32(1.0) / total)
    if spec.empty_row == "zero_if_nan":
        return tirx.Select(
            total > _f32(0.0), y, _f32(0.0)
        )  # false for l = 0 and l = NaN
    if spec.empty_row == "zero_if_masked":
        return tirx.Select(open_max >= _f32(FLT_LOWEST), y, _f32(0.0))
    return y


# --------------------------------------------------------------------------- materialized (TE)

_max_from_neg_inf = te.comm_reducer(lambda a, b: tirx.max(a, b), lambda dtype: tirx.const(-math.inf, dtype))


def attention_scores(
    q, k, bias=None, keep=None, kv_lengths=None, *, spec: AttentionSpec
):
    """Masked float32 scores as rows [B*Hq*Sq, Skv, 1] (the view `ops.softmax` normalises)."""
    batch, heads, sq, d = q.shape
    skv = k.shape[2]
    masking = _Masking(spec, bias, keep, kv_lengths, sq, skv)
    key_t = te.compute(
        (batch, spec.kv_heads, d, skv),
        lambda b, h, e, j: _to_f32(k[b, h, j, e]),
        name="attention_key_t",
    )
    r = te.reduce_axis((0, d), name="attention_d")

    def row_index(row):
        return row // (heads * sq), (row // sq) % heads, row % sq

    def dot(row, j, _unit):
        b, h, i = row_index(row)
        return te.sum(_to_f32(q[b, h, i, r]) * key_t[b, h // spec.group, r, j], axis=r)

    dots = te.compute((batch * heads * sq, skv, 1), dot, name="attention_dot")

    def element(row, j, unit):
        b, h, i = row_index(row)
        return masking.score(dots[row, j, unit], b, h, i, j)

    return te.compute((batch * heads * sq, skv, 1), element, name="attention_scores")


def attention_output(
    probs, v, q_shape, bias=None, keep=None, kv_lengths=None, *, spec: AttentionSpec
):
    """y [B, Hq, Sq, Dv] = probs [B*Hq*Sq, Skv, 1] @ V, with the ``empty_row`` rule."""
    batch, heads, sq, _ = q_shape
    skv, dv = v.shape[2], v.shape[3]
    masking = _Masking(spec, bias, keep, kv_lengths, sq, skv)
    j = te.reduce_axis((0, skv), name="attention_j")

    def row(b, h, i):
        return (b * heads + h) * sq + i

    def prob(b, h, i, jj):
        p = _to_f32(probs[row(b, h, i), jj, 0])
        if spec.empty_row == "zero_if_nan":
            p = tirx.Select(
                p >= _f32(0.0), p, _f32(0.0)
            )  # Where(IsNaN(p), 0, p); false for NaN
        return p

    acc = te.compute(
        (batch, heads, sq, dv),
        lambda b, h, i, e: te.sum(
            prob(b, h, i, j) * _to_f32(v[b, h // spec.group, j, e]), axis=j
        ),
        name="attention_pv",
    )
    if spec.empty_row == "zero_if_masked":
        jm = te.reduce_axis((0, skv), name="attention_jm")
        open_max = te.compute(
            (batch, heads, sq),
            # max from -inf (te.max starts at -FLT_MAX, which would count as an open key)
            lambda b, h, i: _max_from_neg_inf(masking.mask_open(b, h, i, jm), axis=jm),
            name="attention_open",
        )
        return te.compute(
            acc.shape,
            lambda b, h, i, e: tirx.Select(
                open_max[b, h, i] >= _f32(FLT_LOWEST), acc[b, h, i, e], _f32(0.0)
            ).astype(spec.dtype),
            name="attention_output",
        )
    return te.compute(
        acc.shape, lambda *ix: acc(*ix).astype(spec.dtype), name="attention_output"
    )


# --------------------------------------------------------------------------- flash (TensorIR)


def flash_attention(
    spec: AttentionSpec, tiling: FlashTiling, dims: dict
) -> tirx.PrimFunc:
    """The flash algorithm as a TensorIR PrimFunc (all loops serial; see `schedules`).

    `dims` gives ``batch``, ``q_len``, ``kv_len`` (ints, or None for a symbolic dim) and the mask
    dims; arguments: q, k, v, [bias], [keep], [kv_lengths], [sink], y.
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    i64 = lambda value: tirx.const(value, "int64")  # noqa: E731
    hq, hkv, d, dv = spec.q_heads, spec.kv_heads, spec.head_size, spec.v_head_size

    def dim(name):
        value = dims.get(name)
        return i64(value) if value is not None else tirx.Var(name, "int64")

    batch, sq, skv = dim("batch"), dim("q_len"), dim("kv_len")

    def mask_shape(broadcast):
        return [
            i64(1) if flag else full
            for flag, full in zip(broadcast, (batch, i64(hq), sq, skv))
        ]

    with IRBuilder() as builder:
        with T.prim_func(s_tir=True):
            T.func_name("flash_attention")
            T.func_attr({"tirx.noalias": True})
            q = T.arg("q", T.buffer((batch, hq, sq, d), spec.dtype))
            k = T.arg("k", T.buffer((batch, hkv, skv, d), spec.dtype))
            v = T.arg("v", T.buffer((batch, hkv, skv, dv), spec.dtype))
            bias = keep = lengths = None
            if spec.bias_dtype is not None:
                bias = T.arg(
                    "bias", T.buffer(mask_shape(spec.bias_broadcast), spec.bias_dtype)
                )
            if spec.keep_broadcast is not None:
                keep = T.arg("keep", T.buffer(mask_shape(spec.keep_broadcast), "bool"))
            if spec.kv_lengths:
                lengths = T.arg("kv_lengths", T.buffer((batch,), "int64"))
            sink = T.arg("sink", T.buffer((hq,), spec.sink_dtype)) if spec.sink_dtype else None
            y = T.arg("y", T.buffer((batch, hq, sq, dv), spec.dtype))
            masking = _Masking(spec, bias, keep, lengths, sq, skv, sink)
            _flash_body(T, spec, tiling, masking, q, k, v, y, batch, sq, skv, i64)
    return builder.get()


def _flash_body(T, spec, tiling, masking, q, k, v, y, batch, sq, skv, i64):
    qb = tiling.query_block
    fold = tiling.fold_group and spec.group > 1
    if fold and not isinstance(sq, tirx.IntImm):
        # A query length known only at run time, folded: a decoding step (Sq = 1) fills `group`
        # rows of a block, so it gets blocks of its own (as few rows as the group, a power of
        # two, reading K where it is), the rest (prompts) the tiling's.
        decode_block = 1 << (spec.group - 1).bit_length()
        if decode_block < qb:
            with T.If(sq == i64(1)):
                with T.Then():
                    _flash_blocks(T, spec, tiling, masking, q, k, v, y, batch, i64(1), skv, i64,
                                  decode_block, "_decode")
                with T.Else():
                    _flash_blocks(T, spec, tiling, masking, q, _keys(T, spec, tiling, k, batch, skv, i64), v, y,
                                  batch, sq, skv, i64, qb, "")
            return
    _flash_blocks(T, spec, tiling, masking, q, _keys(T, spec, tiling, k, batch, skv, i64), v, y, batch, sq, skv,
                  i64, qb, "")


def _keys(T, spec, tiling, k, batch, skv, i64):
    """What the inner products read K from: its packed tiles, or K itself (`pack_keys`)."""
    return _pack_keys(T, spec, tiling, k, batch, skv, i64) if tiling.pack_keys else k


def _pack_keys(T, spec, tiling, k, batch, skv, i64):
    """K packed per key tile as [D, key_block] (zero past Skv): a vector of keys is one load, and
    a tile is contiguous (rows of a [D, Skv] layout, Skv * 4 bytes apart, would map to the same
    few L1 sets). Worth it where many query rows share a tile; a block of few rows (decoding)
    reads K's rows where they are (`FlashTiling.pack_keys`)."""
    from tvm.script.ir_builder import IRBuilder

    kb, hkv, d, operand = tiling.key_block, spec.kv_heads, spec.head_size, tiling.operand_dtype
    kv_tiles = tirx.floordiv(skv + i64(kb - 1), i64(kb))
    key_t = IRBuilder.name("key_tiles", T.alloc_buffer((batch, hkv, kv_tiles, d, kb), operand, scope="global"))

    def pack(name, b, h, first_tile, tiles, partial, width=kb):
        if isinstance(tiles, tirx.IntImm) and tiles.value == 0:
            return
        with T.grid(tiles, i64(d), i64(width)) as (t, e, jj):
            with T.sblock(name):
                vb, vh, vt, ve, vj = T.axis.remap("SSSSS", [b, h, t, e, jj])
                j = (first_tile + vt) * i64(kb) + vj
                value = _load(k, vb, vh, tirx.min(j, skv - i64(1)) if partial else j, ve)
                value = value if _dtype(value) == operand else value.astype(operand)
                if partial:
                    value = tirx.Select(j < skv, value, tirx.const(0.0, operand))
                T.buffer_store(key_t, value, [vb, vh, first_tile + vt, ve, vj])

    # One loop over (batch, head) around both packings: a schedule runs them in one parallel loop
    # (each parallel loop wakes the thread pool; with its workers asleep, a wake-up was 10-20% of
    # a 0.2 ms kernel at 2 threads).
    with T.grid(batch, i64(hkv)) as (b, h):
        if tiling.pack_whole_tiles_apart:
            whole = tirx.floordiv(skv, i64(kb))
            pack("flash_key_t", b, h, i64(0), whole, partial=False)
            # a narrow last tile (`key_tail`) reads only its first columns
            pack("flash_key_t_tail", b, h, whole, kv_tiles - whole, partial=True, width=tiling.last_tile_width(skv))
        else:
            pack("flash_key_t", b, h, i64(0), kv_tiles, partial=True)
    return key_t


def _flash_blocks(T, spec, tiling, masking, q, keys, v, y, batch, sq, skv, i64, qb, variant):
    """The loop over (batch, head, query block) of `qb` rows; `variant` suffixes its block names;
    keys: K packed (`_pack_keys`, 5-D) or K itself."""
    from tvm.script.ir_builder import IRBuilder

    kb = tiling.key_block
    hq, hkv, d, dv = spec.q_heads, spec.kv_heads, spec.head_size, spec.v_head_size
    threshold = spec.skip_threshold() if tiling.skip_masked else None
    operand = tiling.operand_dtype
    fold = tiling.fold_group and spec.group > 1
    group = spec.group if fold else 1
    rows = sq * i64(group)  # a block head's rows (its query heads' positions when folded)
    q_blocks = tirx.floordiv(rows + i64(qb - 1), i64(qb))
    with T.grid(batch, i64(hkv if fold else hq), q_blocks) as (b, h, blk):
        with T.sblock(f"flash_block{variant}"):
            vb, vh, vblk = T.axis.remap("SSS", [b, h, blk])
            def state(name, shape):  # a float32 buffer of the block, named in the IR
                return IRBuilder.name(name, T.sblock_alloc_buffer(shape, "float32"))

            m, total, acc = state("m", (qb,)), state("l", (qb,)), state("acc", (qb, dv))
            m_new = state("m_new", (qb,))
            probs = IRBuilder.name("probs", T.sblock_alloc_buffer((qb, kb), operand))
            tile_max, tile_sum = state("tile_max", (qb,)), state("tile_sum", (qb,))
            alpha, open_max, tile_open = state("alpha", (qb,)), state("open_max", (qb,)), state("tile_open", (qb,))
            flag = state("tile_live", (1,))
            q0 = vblk * i64(qb)
            kh = vh if fold else tirx.floordiv(vh, i64(spec.group))
            # Keys past the causal diagonal of the block's last position (or past kv_length) are
            # never visited: a tile loop bound, not a mask. Folded, a block that spans two heads
            # holds a head's last position.
            last = tirx.min(q0 + i64(qb - 1), rows - i64(1))
            if fold:
                last = tirx.Select(tirx.floordiv(q0, sq) == tirx.floordiv(last, sq),
                                   tirx.floormod(last, sq), sq - i64(1))
            key_end = tirx.max(masking.key_end(vb, last), i64(0))
            tiles = tirx.floordiv(key_end + i64(kb - 1), i64(kb))
            ctx = _FlashTile(
                T, spec, masking, q=q, keys=keys, v=v, b=vb, h=vh, kh=kh, q0=q0, sq=sq, skv=skv,
                fold=fold, group=group, rows=rows,
                i64=i64, qb=qb, kb=kb, d=d, dv=dv, tiles=tiles, m=m, m_new=m_new, total=total, acc=acc, probs=probs, tile_max=tile_max, tile_sum=tile_sum,
                alpha=alpha, open_max=open_max, tile_open=tile_open, flag=flag,
            )
            # The block's query rows, copied once (rows past Sq repeat the last one): the inner
            # products read plain [row, dim] operands (a schedule may keep them in fast memory or
            # inline the copy).
            q_rows = IRBuilder.name("q_rows", T.sblock_alloc_buffer((qb, d), spec.dtype))
            with T.grid(i64(qb), i64(d)) as (ii, e):
                with T.sblock(f"flash_q{variant}"):
                    vi, ve = T.axis.remap("SS", [ii, e])
                    T.buffer_store(q_rows, _load(q, vb, ctx.head(vi), ctx.position(vi), ve), [vi, ve])
            ctx.q_rows = q_rows
            tail = tiling.narrow_width(skv)

            def visit(suffix, skipping):
                """The block's key tiles: whole ones, then (`tail`) a narrow one past them."""

                def one(t, suffix, extent, width):
                    if not skipping:
                        ctx.tile(t, suffix, extent, width)
                        return
                    ctx.liveness(t, threshold, suffix, extent, width)
                    with T.If(_load(flag, 0) > _f32(0.0)):
                        with T.Then():
                            ctx.tile(t, suffix, extent, width)

                if tail is None:
                    with T.serial(tiles) as t:
                        one(t, suffix, tiles, None)
                    return
                # The keys past the whole tiles in one narrow tile where it holds them (always at a
                # static Skv), else in a whole one: several narrow tiles cost more than a whole one
                # (each rescales the running state; a symbolic Skv with 52 keys past its whole
                # tiles, four 16-key tiles: 1.19 -> 1.40 ms).
                whole = tirx.floordiv(skv, i64(kb))
                fits = skv - whole * i64(kb) <= i64(tail)
                with T.serial(tirx.Select(fits, tirx.min(tiles, whole), tiles)) as t:
                    one(t, suffix, tiles, None)
                narrow = tirx.Select(tirx.And(fits, key_end > whole * i64(kb)), i64(1), i64(0))
                with T.serial(narrow) as n:
                    one(n, f"{suffix}_tail", narrow, tail)

            ctx.init(variant)
            visit(variant, skipping=threshold is not None)
            if threshold is not None:
                # A fully masked row saw only skipped tiles (or scores as low as the mask): redo
                # the block without skipping so that its result is that of the whole row.
                ctx.need_full(threshold, variant)
                with T.If(_load(flag, 0) > _f32(0.0)):
                    with T.Then():
                        ctx.init(f"{variant}_full")
                        visit(f"{variant}_full", skipping=False)
            with T.grid(i64(qb), i64(dv)) as (ii, e):
                with T.sblock(f"flash_output{variant}"):
                    vi, ve = T.axis.remap("SS", [ii, e])
                    T.where(q0 + ii < rows)
                    value = finalize_row(
                        spec, _load(acc, vi, ve), _load(total, vi), _load(open_max, vi)
                    )
                    T.buffer_store(y, value.astype(spec.dtype), [vb, ctx.head(vi), ctx.position(vi), ve])


class _FlashTile:
    """Emits the blocks of one key tile (and the state init) of `flash_attention`."""

    def __init__(self, T, spec, masking, **fields):
        self.T, self.spec, self.masking = T, spec, masking
        self.__dict__.update(fields)  # inputs, indices, dims and the block's state buffers

    def row(self, ii):
        return tirx.min(self.q0 + ii, self.rows - self.i64(1))  # rows past the last repeat it

    def place(self, vt, width):
        """(packed tile, first column) of tile vt: a whole tile, or (`width`) the narrow tile past
        the whole ones (`FlashTiling.key_tail`; vt = 0, its loop runs once or not at all)."""
        if width is None:
            return vt, self.i64(0)
        return tirx.floordiv(self.skv, self.i64(self.kb)), vt * self.i64(width)

    def key(self, tile, column, ve):
        """Dim ve of the key in `column` of packed `tile`: from the packed tiles or from K (keys
        past Skv repeat the last one; their scores are masked)."""
        if len(self.keys.shape) == 5:
            return _load(self.keys, self.b, self.kh, tile, ve, column)
        j = tirx.min(tile * self.i64(self.kb) + column, self.skv - self.i64(1))
        return _load(self.keys, self.b, self.kh, j, ve)

    def head(self, ii):
        """The query head of block row ii."""
        if not self.fold:
            return self.h
        return self.h * self.i64(self.group) + tirx.floordiv(self.row(ii), self.sq)

    def position(self, ii):
        """The query position (of Sq) of block row ii."""
        return tirx.floormod(self.row(ii), self.sq) if self.fold else self.row(ii)

    def init(self, suffix):
        T, i64 = self.T, self.i64
        with T.serial(i64(self.qb)) as ii:
            with T.sblock(f"flash_init{suffix}"):
                vi = T.axis.spatial(i64(self.qb), ii)
                sink = self.masking.sink
                if sink is None:
                    T.buffer_store(self.m, _f32(FLT_LOWEST), [vi])
                    T.buffer_store(self.total, _f32(0.0), [vi])
                else:  # the sink is the state's first key: e^(sink - sink) = 1, no value
                    T.buffer_store(self.m, _to_f32(_load(sink, self.head(vi))), [vi])
                    T.buffer_store(self.total, _f32(1.0), [vi])
                row_open = self.masking.row_open(self.b, self.position(vi))
                T.buffer_store(self.open_max, _f32(-math.inf) if row_open is None else row_open, [vi])
        with T.grid(i64(self.qb), i64(self.dv)) as (ii, e):
            with T.sblock(f"flash_init_acc{suffix}"):
                vi, ve = T.axis.remap("SS", [ii, e])
                T.buffer_store(self.acc, _f32(0.0), [vi, ve])

    def liveness(self, t, threshold, variant="", extent=None, width=None):
        """_load(flag, 0) = 1 if some score of tile t (of `extent`; narrow, `width` keys wide: see
        `place`) may count (see the module docstring), else 0."""
        T, i64 = self.T, self.i64
        with T.grid(i64(self.qb), i64(width or self.kb)) as (ii, jj):
            with T.sblock(f"flash_live{variant}"):
                vt = T.axis.spatial(extent if extent is not None else self.tiles, t)
                vi, vj = T.axis.remap("RR", [ii, jj])
                with T.init():
                    T.buffer_store(self.flag, _f32(0.0), [0])
                tile, column = self.place(vt, width)
                j = tile * i64(self.kb) + column + vj
                dead = self.masking.negligible(
                    self.b,
                    self.head(vi),
                    self.position(vi),
                    tirx.min(j, self.skv - i64(1)),
                    threshold,
                )
                dead = tirx.Or(dead, j >= self.skv)
                T.buffer_store(
                    self.flag,
                    tirx.max(
                        _load(self.flag, 0), tirx.Select(dead, _f32(0.0), _f32(1.0))
                    ),
                    [0],
                )

    def need_full(self, threshold, variant=""):
        T, i64 = self.T, self.i64
        with T.serial(i64(self.qb)) as ii:
            with T.sblock(f"flash_need_full{variant}"):
                vi = T.axis.reduce(i64(self.qb), ii)
                with T.init():
                    T.buffer_store(self.flag, _f32(0.0), [0])
                low = tirx.Select(
                    _load(self.m, vi) <= _f32(threshold / 2), _f32(1.0), _f32(0.0)
                )
                T.buffer_store(self.flag, tirx.max(_load(self.flag, 0), low), [0])

    @contextmanager
    def scope(self, name, t, extent):
        """A scope block around the pure dataflow of tile t of `extent` (an inner product, the
        softmax of the scores): the blocks around it update the running state in place, and
        TensorIR reorders, vectorises, inlines and rfactors only in scopes of pure dataflow."""
        with self.T.sblock(name):
            yield self.T.axis.spatial(extent, t)

    def row_reduce(self, name, vt, width, out, identity: float, combine, value_of):
        """out[i] = combine over the tile's `width` keys j of value_of(vt, i, j), from `identity`:
        a pure reduction (identity init), which a schedule can split across lanes (rfactor)."""
        T, qb, kb = self.T, self.i64(self.qb), width
        with T.grid(qb, kb) as (ii, jj), T.sblock(name):
            vi = T.axis.spatial(qb, ii)
            vj = T.axis.reduce(kb, jj)
            with T.init():
                T.buffer_store(out, _f32(identity), [vi])
            T.buffer_store(out, combine(_load(out, vi), value_of(vt, vi, vj)), [vi])

    def tile(self, t, suffix, extent=None, width=None):
        """The blocks of tile t of `extent` tiles: whole (key_block keys), or narrow (`width` keys,
        the narrow tile past the whole ones, see `place`)."""
        from tvm.script.ir_builder import IRBuilder

        T, i64, spec = self.T, self.i64, self.spec
        extent = extent if extent is not None else self.tiles
        qb, kb, kw = i64(self.qb), i64(self.kb), i64(width or self.kb)  # kb: the tile stride
        per_key_open = spec.empty_row == "zero_if_masked" and self.masking.row_open(self.b, self.q0) is None
        # The scores, their softmax and its row sum form one scope of pure dataflow (the running
        # state is only read in it; the new max goes to `m_new`, state updates follow the scope):
        # every row of the tile is complete once its scores are, so a schedule can run the whole
        # softmax of a register block of rows while its scores are in L1.
        with self.scope(f"flash_qk_tile{suffix}", t, extent) as vt:
            tile, column = self.place(vt, width)
            first = tile * kb + column  # the key of the tile's column 0
            # The scores exist only in this scope (a schedule may keep them out of memory).
            self.dots = IRBuilder.name("dots", T.sblock_alloc_buffer((qb, kw), "float32"))
            self.scores = IRBuilder.name("scores", T.sblock_alloc_buffer((qb, kw), "float32"))
            with T.grid(qb, kw, i64(self.d)) as (ii, jj, e):
                with T.sblock(f"flash_qk{suffix}"):
                    vi, vj, ve = T.axis.remap("SSR", [ii, jj, e])
                    with T.init():
                        T.buffer_store(self.dots, _f32(0.0), [vi, vj])
                    product = _to_f32(
                        _load(self.q_rows, vi, ve)
                    ) * _to_f32(self.key(tile, column + vj, ve))
                    T.buffer_store(
                        self.dots, _load(self.dots, vi, vj) + product, [vi, vj]
                    )
            with T.grid(qb, kw) as (ii, jj):
                with T.sblock(f"flash_mask{suffix}"):
                    vi, vj = T.axis.remap("SS", [ii, jj])
                    j = first + vj
                    s = self.masking.score(
                        _load(self.dots, vi, vj),
                        self.b,
                        self.head(vi),
                        self.position(vi),
                        tirx.min(j, self.skv - i64(1)),
                    )
                    T.buffer_store(
                        self.scores, tirx.Select(j < self.skv, s, _f32(-math.inf)), [vi, vj]
                    )
            if per_key_open:
                # 0 where the mask keeps key j, else the lowest float (the identity of a max that
                # a schedule can split across lanes; -inf is not one).
                def kept(vt, vi, vj):
                    j = first + vj
                    value = self.masking.mask_open(self.b, self.head(vi), self.position(vi), tirx.min(j, self.skv - i64(1)))
                    keep = tirx.And(j < self.skv, value >= _f32(FLT_LOWEST))
                    return tirx.Select(keep, _f32(0.0), _f32(FLT_LOWEST))

                self.row_reduce(f"flash_open{suffix}", vt, kw, self.tile_open, FLT_LOWEST, tirx.max, kept)
            self.row_reduce(f"flash_tile_max{suffix}", vt, kw, self.tile_max, FLT_LOWEST, tirx.max,
                            lambda vt, vi, vj: _load(self.scores, vi, vj))
            with T.serial(qb) as ii:
                with T.sblock(f"flash_rescale{suffix}"):
                    vi = T.axis.spatial(qb, ii)
                    # e^(m_old - m_new) <= 1; -FLT_MAX - -FLT_MAX = 0 keeps an empty state at 1.
                    new_max = tirx.max(_load(self.m, vi), _load(self.tile_max, vi))
                    T.buffer_store(self.alpha, exp_nonpositive(_load(self.m, vi) - new_max), [vi])
                    T.buffer_store(self.m_new, new_max, [vi])
            with T.grid(qb, kw) as (ii, jj):
                with T.sblock(f"flash_exp{suffix}"):
                    vi, vj = T.axis.remap("SS", [ii, jj])
                    p = exp_nonpositive(_load(self.scores, vi, vj) - _load(self.m_new, vi))
                    T.buffer_store(self.probs, p if self.probs.dtype == "float32" else p.astype(self.probs.dtype), [vi, vj])
            self.row_reduce(f"flash_sum{suffix}", vt, kw, self.tile_sum, 0.0, lambda x, y: x + y,
                            lambda vt, vi, vj: _to_f32(_load(self.probs, vi, vj)))
        with T.serial(qb) as ii:
            with T.sblock(f"flash_total{suffix}"):
                vi = T.axis.spatial(qb, ii)
                T.buffer_store(self.total, _load(self.total, vi) * _load(self.alpha, vi) + _load(self.tile_sum, vi), [vi])
                T.buffer_store(self.m, _load(self.m_new, vi), [vi])
                if per_key_open:
                    opened = tirx.Select(_load(self.tile_open, vi) >= _f32(0.0), _f32(0.0), _f32(-math.inf))
                    T.buffer_store(self.open_max, tirx.max(_load(self.open_max, vi), opened), [vi])
        # acc' = alpha * acc + P V: the tile's P V is a pure inner product (zero-initialised, in a
        # buffer of the scope: TensorIR vectorises and tensorizes no in-place update), then
        # folded into the rescaled acc (a schedule may inline that into the product's write-back).
        with self.scope(f"flash_pv_tile{suffix}", t, extent) as vt:
            tile, column = self.place(vt, width)
            first = tile * kb + column
            self.tile_pv = IRBuilder.name("tile_pv", T.sblock_alloc_buffer((qb, i64(self.dv)), "float32"))
            # The tile's rows of V (keys past Skv repeat the last one; their P is 0).
            v_tile = IRBuilder.name("v_tile", T.sblock_alloc_buffer((kw, i64(self.dv)), spec.dtype))
            with T.grid(kw, i64(self.dv)) as (jj, e):
                with T.sblock(f"flash_v{suffix}"):
                    vj, ve = T.axis.remap("SS", [jj, e])
                    j = tirx.min(first + vj, self.skv - i64(1))
                    T.buffer_store(v_tile, _load(self.v, self.b, self.kh, j, ve), [vj, ve])
            with T.grid(qb, kw, i64(self.dv)) as (ii, jj, e):
                with T.sblock(f"flash_pv{suffix}"):
                    # Block axes (row, value dim, key) as an inner product's (i, j, k), which a
                    # tensor intrinsic matches; the loops keep the keys in the middle.
                    vi, ve, vj = T.axis.remap("SSR", [ii, e, jj])
                    with T.init():
                        T.buffer_store(self.tile_pv, _f32(0.0), [vi, ve])
                    product = _to_f32(_load(self.probs, vi, vj)) * _to_f32(_load(v_tile, vj, ve))
                    T.buffer_store(self.tile_pv, _load(self.tile_pv, vi, ve) + product, [vi, ve])
            with T.grid(qb, i64(self.dv)) as (ii, e):
                with T.sblock(f"flash_update{suffix}"):
                    vi, ve = T.axis.remap("SS", [ii, e])
                    rescaled = _load(self.acc, vi, ve) * _load(self.alpha, vi)
                    T.buffer_store(self.acc, rescaled + _load(self.tile_pv, vi, ve), [vi, ve])
