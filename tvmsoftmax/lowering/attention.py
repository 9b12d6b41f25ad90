"""Attention recognition: every form exporters emit becomes one ``ai.tvmsoftmax.AttentionSite``.

The site node is the canonical op of `ops.attention`: inputs Q [B, Hq, Sq, D], K [B, Hkv, Skv, D],
V [B, Hkv, Skv, Dv] (4-D, heads before sequence), then three optional inputs: an additive bias
(4-D, broadcast), a select mask ``keep`` (bool, 4-D, broadcast; masked scores become ``fill``)
and per-batch key counts; attributes: scale, softcap, causal, fill, empty_row. Layout changes the
source form needs (3-D to 4-D, BSHD to BHSD, bool masks to additive ones, KV-cache concatenation)
are emitted as plain ONNX nodes around the site, which TVM compiles.

Forms, and why each exists:

* ONNX ``Attention`` (opset 23/24/25): the standard op. 3-D inputs carry heads in the hidden dim
  (``q_num_heads``/``kv_num_heads``); ``past_key``/``past_value`` are concatenated along the sequence
  (``present_*``); a bool mask means "attend" (True -> 0, False -> -inf added); a float mask shorter
  than the keys is padded with -inf; ``nonpad_kv_seqlen`` masks the keys past each batch's count;
  ``is_causal`` is bottom-right aligned; a fully masked row is 0. Not fused (and said why):
  ``qk_matmul_output`` requested (it needs the score matrix), sliding windows (opset 25).
* com.microsoft ``MultiHeadAttention``: onnxruntime's fused op (3-D Q/K/V or BNSH K/V, optional packed bias,
  key padding mask -> ``mask_filter_value`` added, attention bias, past key/value, unidirectional).
* com.microsoft ``Attention``: what onnxruntime's transformer optimizer fuses BERT-style attention
  into (input @ packed Q/K/V weights + bias, 1-D/2-D/3-D ``mask_index``, packed past/present).
* Decomposed graphs (torch exporters), matched from each Softmax(axis=-1) outwards:
  ``MatMul(Q, K^T)`` -> [Mul|Div by a constant] -> [softcap] -> [Where(keep, s, fill)] ->
  [Add(bias)]* -> Softmax -> [Where(IsNaN(p), 0, p)] -> ``MatMul(p, V)``, where
  - the softcap is Gemma 2's logit capping ``Mul(Tanh(Div(s, cap)), cap)``;
  - the score MatMul may be onnxruntime's com.microsoft ``FusedMatMul`` (its saved optimised
    models: the scale in ``alpha``, ``transB`` reading K untransposed);
  - the scale is a Mul or Div after the MatMul (eager form) or a Mul of Q and of K^T by d^-1/4
    before it (the TorchScript SDPA form); a Mul by a constant that varies per head or query only
    (Swin V2's per-head logit scale) multiplies Q instead;
  - K^T is Transpose(K, 0,1,3,2) of BHSD keys, Transpose(K, 0,2,3,1) of BSHD keys, either one
    possibly scaled; any other K^T is transposed back by an inserted node;
  - GQA keys/values repeated by Unsqueeze -> Expand -> Reshape are read from the unrepeated
    tensor (no copy);
  - causal and padding masks arrive as the additive bias or the Where (whatever subgraph built
    them: Range/Less/Where, Trilu, constants); fully masked tiles of such masks are skipped at run
    time (`ops.attention`), so no causal pattern has to be guessed;
  - the IsNaN guard turns rows that would be NaN into 0 (``zero_if_nan``); without it they stay NaN.
  A Softmax that does not match stays a softmax site; `inspect` says why it did not match.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .frontend import default_opset, dims_of, elem_dtype, node_reads, value_infos

DOMAIN = "ai.tvmsoftmax"
ATTENTION_OP = "AttentionSite"
INT_VECTOR_OP = "IntVector"  # a shape-derived integer as an int64 tensor (`lowering.importer`)
KV_APPEND_OP = "KVAppend"  # GroupQueryAttention's present: `ops.kv_cache.append_kv`
STRATEGY_CHOICES = ("auto", "materialized", "flash", "none")
FLOAT_TYPES = ("float32", "float16")


@dataclass
class AttentionSite:
    """One attention found in the model (or a Softmax that looked like one), and what it became."""

    id: str
    node: str  # the node (ONNX op) or the Softmax (decomposed form) it was found at
    form: str
    requested: str  # strategy asked for
    rewritten: bool = True
    reason: str = ""
    nodes: list = field(default_factory=list)  # source nodes it replaced
    attributes: dict = field(default_factory=dict)  # causal, scale, empty_row, ...
    lowered: dict = field(default_factory=dict)  # strategy, knobs, shapes (filled at import)

    def to_json(self) -> dict:
        data = asdict(self)
        data["kind"] = "attention"
        return data


class NoMatch(Exception):
    """A candidate is not (or not safely) an attention site; the message says why."""


class _Graph:
    """Producer/consumer tables and constants of a graph, plus a builder of new nodes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.infos = value_infos(model)
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in node_reads(n):  # an If reading a value in a branch consumes it
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.new_nodes: list = []
        self.known_ranks: dict[str, int] = {}  # of the values new nodes produce
        self.removed: set[int] = set()  # id() of the source nodes the sites replace
        self._counter = 0

    def const(self, name: str):
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(attr))
        return None

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        if value is None or value.size != 1 or value.dtype.kind != "f":
            return None
        return float(value.reshape(()))

    def dims(self, name: str):
        info = self.infos.get(name)
        if info is None and name in self.initializers:
            return list(self.initializers[name].dims)
        return dims_of(info) if info is not None else None

    def dtype(self, name: str) -> str | None:
        info = self.infos.get(name)
        if info is not None and info.type.tensor_type.elem_type:
            return elem_dtype(info)
        if name in self.initializers:
            return np.dtype(helper.tensor_dtype_to_np_dtype(self.initializers[name].data_type)).name
        return None

    def rank(self, name: str) -> int | None:
        if name in self.known_ranks:
            return self.known_ranks[name]
        dims = self.dims(name)
        return len(dims) if dims is not None else None

    def only_consumer(self, name: str, node) -> bool:
        users = self.consumers.get(name, [])
        return name not in self.outputs and len(users) == 1 and users[0] is node

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}__tsm{self._counter}"

    def add(self, op: str, inputs: list, outputs: list | None = None, domain: str = "", rank=None, **attrs):
        outputs = outputs or [self.fresh(op.lower())]
        if rank is None and op in ("Transpose", "Where", "Add", "Identity", "Concat", "Pad"):
            ranks = [self.rank(i) for i in inputs if i]
            rank = max((r for r in ranks if r is not None), default=None)
        if rank is not None:
            self.known_ranks[outputs[0]] = rank
        self.new_nodes.append(
            helper.make_node(op, inputs, outputs, name=self.fresh(op), domain=domain, **attrs)
        )
        return outputs[0]

    def constant(self, value: np.ndarray, hint: str = "const") -> str:
        return self.add("Constant", [], [self.fresh(hint)], value=numpy_helper.from_array(np.asarray(value)))

    def to_rank4(self, name: str, rank: int | None = None) -> str:
        rank = rank if rank is not None else self.rank(name)
        if rank is None:
            raise NoMatch(f"rank of {name!r} unknown")
        if rank > 4:
            raise NoMatch(f"{name!r} has rank {rank} (at most 4)")
        if rank == 4:
            return name
        axes = self.constant(np.arange(4 - rank, dtype=np.int64), "axes")
        return self.add("Unsqueeze", [name, axes], rank=4)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _broadcast_flags(graph: _Graph, name: str) -> list[bool]:
    dims = graph.dims(name) or []
    dims = [1] * (4 - len(dims)) + list(dims)
    return [d == 1 for d in dims]


def _heads_first(graph: _Graph, name: str, heads: int) -> str:
    """[B, S, heads * d] -> [B, heads, S, d]."""
    shape = graph.constant(np.array([0, 0, heads, -1], np.int64), "shape")
    return graph.add("Transpose", [graph.add("Reshape", [name, shape], rank=4)], perm=[0, 2, 1, 3])


def _heads_last(graph: _Graph, y4: str, output: str) -> str:
    """[B, heads, S, d] -> [B, S, heads * d]."""
    t = graph.add("Transpose", [y4], perm=[0, 2, 1, 3])
    return graph.add("Reshape", [t, graph.constant(np.array([0, 0, -1], np.int64), "shape")], [output])


def _site_node(graph: _Graph, site: AttentionSite, q, k, v, bias, keep, lengths, output, sink=None, **attrs) -> str:
    site.attributes.update(attrs)
    return graph.add(
        ATTENTION_OP,
        [q, k, v, bias or "", keep or "", lengths or ""] + ([sink] if sink else []),
        [output],
        domain=DOMAIN,
        site=site.id,
        strategy=site.requested,
        **attrs,
    )


# --------------------------------------------------------------------------- ONNX Attention-23+


def _rewrite_onnx_attention(graph: _Graph, node, site: AttentionSite, opset: int) -> None:
    a = _attrs(node)
    inputs = list(node.input) + [""] * (7 - len(node.input))
    q, k, v, mask, past_k, past_v, nonpad = inputs[:7]
    outputs = list(node.output) + [""] * (4 - len(node.output))
    if outputs[3] and (outputs[3] in graph.outputs or graph.consumers.get(outputs[3])):
        raise NoMatch("qk_matmul_output is requested (it needs the whole score matrix)")
    if a.get("left_window_size", -1) >= 0 or a.get("right_window_size", -1) >= 0:
        raise NoMatch("sliding-window attention (left/right_window_size) is not fused")
    dtype = graph.dtype(q)
    if dtype not in FLOAT_TYPES:
        raise NoMatch(f"Q dtype {dtype} (ours: {', '.join(FLOAT_TYPES)})")
    rank = graph.rank(q)
    if rank not in (3, 4):
        raise NoMatch(f"Q rank {rank} unknown or not 3/4")
    if rank == 3:
        hq, hkv = a.get("q_num_heads"), a.get("kv_num_heads")
        if not hq or not hkv:
            raise NoMatch("3-D inputs need q_num_heads and kv_num_heads")
        q, k, v = _heads_first(graph, q, hq), _heads_first(graph, k, hkv), _heads_first(graph, v, hkv)
        head_size = _dim(graph, inputs[0], 2)
        head_size = head_size // hq if head_size is not None else None
    else:
        head_size = _dim(graph, q, 3)
    if past_k:
        k = graph.add("Concat", [past_k, k], [outputs[1] or graph.fresh("present_key")], axis=2)
        v = graph.add("Concat", [past_v, v], [outputs[2] or graph.fresh("present_value")], axis=2)
    else:  # present_* without a cache are the inputs themselves
        for present, source in ((outputs[1], k), (outputs[2], v)):
            if present:
                graph.add("Identity", [source], [present])
    scale = a.get("scale")
    if scale is None:
        if head_size is None:
            raise NoMatch("head size unknown (needed for the default scale)")
        scale = 1.0 / math.sqrt(head_size)
    bias = None
    if mask:
        mask_dtype = graph.dtype(mask)
        if mask_dtype == "bool":
            zero = graph.constant(np.array(0, dtype), "zero")
            neg = graph.constant(np.array(-np.inf, dtype), "neg_inf")
            bias = graph.add("Where", [mask, zero, neg])
        else:
            bias = mask
        bias = _pad_keys(graph, bias, mask, k, dtype)
        bias = graph.to_rank4(bias, graph.rank(mask))
    # is_causal: top-left without a cache; bottom-right (offset = past length) with past_key,
    # which equals kv_length - Sq when the new keys are as many as the queries; and
    # nonpad_kv_seqlen[b] - Sq with an external cache.
    causal = 0
    if a.get("is_causal", 0):
        causal = 2 if (past_k or nonpad) else 1
        if past_k:
            axis = 1 if rank == 3 else 2
            new_keys, queries = ((graph.dims(x) or [None] * 4)[axis] for x in inputs[:2][::-1])
            # equal ints, or the same dim name (one value in every run), not '?' (unknown)
            if new_keys is None or new_keys == "?" or new_keys != queries:
                raise NoMatch("causal with a cache needs as many new keys as queries (static, or the same dim name)")
    y4 = graph.fresh("attention_y") if rank == 3 else outputs[0]
    _site_node(
        graph, site, q, k, v, bias, None, nonpad or None, y4,
        scale=float(scale), softcap=float(a.get("softcap", 0.0)), causal=causal,
        fill=float(-np.finfo(np.float32).max), empty_row="zero_if_masked",
    )
    if rank == 3:
        t = graph.add("Transpose", [y4], perm=[0, 2, 1, 3])
        graph.add("Reshape", [t, graph.constant(np.array([0, 0, -1], np.int64), "shape")], [outputs[0]])


def _dim(graph: _Graph, name: str, axis: int):
    dims = graph.dims(name)
    if dims is None or axis >= len(dims) or not isinstance(dims[axis], int):
        return None
    return dims[axis]


def _pad_keys(graph: _Graph, bias: str, mask: str, k: str, dtype: str) -> str:
    """A float mask shorter than the keys (past + new) is padded with -inf (ONNX Attention)."""
    mask_keys = _dim(graph, mask, -1 % max(graph.rank(mask) or 1, 1))
    total = _dim(graph, k, 2)
    if mask_keys is None or total is None or mask_keys >= total:
        return bias
    rank = graph.rank(mask)
    pads = np.zeros(2 * rank, np.int64)
    pads[2 * rank - 1] = total - mask_keys
    return graph.add(
        "Pad", [bias, graph.constant(pads, "pads"), graph.constant(np.array(-np.inf, dtype), "neg_inf")]
    )


# --------------------------------------------------------------------------- com.microsoft MHA


def _rewrite_mha(graph: _Graph, node, site: AttentionSite) -> None:
    a = _attrs(node)
    inputs = list(node.input) + [""] * (10 - len(node.input))
    q, k, v, proj_bias, key_mask, attn_bias, past_k, past_v = inputs[:8]
    if inputs[8] or inputs[9]:
        raise NoMatch("past_sequence_length / cache_indirection (beam search) are not fused")
    heads = a.get("num_heads")
    if not heads:
        raise NoMatch("num_heads missing")
    if not k or not v or graph.rank(q) != 3 or graph.rank(k) not in (3, 4) or graph.rank(k) != graph.rank(v):
        raise NoMatch("only separate query/key/value are fused, key/value 3-D or BNSH (packed QKV/KV forms, "
                      "which onnxruntime's CPU kernel does not run either, are not)")
    bnsh = graph.rank(k) == 4  # cross-attention keys/values already projected into heads
    if bnsh and (proj_bias or past_k):
        raise NoMatch("a packed bias or past with BNSH key/value is not fused")
    dtype = graph.dtype(q)
    if dtype not in FLOAT_TYPES:
        raise NoMatch(f"query dtype {dtype} (ours: {', '.join(FLOAT_TYPES)})")
    hidden = _dim(graph, q, 2)
    if proj_bias:
        if hidden is None or _dim(graph, v, 2) is None:
            raise NoMatch("hidden sizes unknown (needed to split the packed bias)")
        sizes = graph.constant(np.array([hidden, _dim(graph, k, 2), _dim(graph, v, 2)], np.int64), "split")
        parts = [graph.fresh("bias_q"), graph.fresh("bias_k"), graph.fresh("bias_v")]
        graph.add("Split", [proj_bias, sizes], parts, axis=0)
        q, k, v = (graph.add("Add", [x, b]) for x, b in zip((q, k, v), parts))

    q = _heads_first(graph, q, heads)
    if not bnsh:
        k, v = _heads_first(graph, k, heads), _heads_first(graph, v, heads)
    outputs = list(node.output) + [""] * (3 - len(node.output))
    if past_k:
        k = graph.add("Concat", [past_k, k], [outputs[1] or graph.fresh("present_key")], axis=2)
        v = graph.add("Concat", [past_v, v], [outputs[2] or graph.fresh("present_value")], axis=2)
    else:  # present_* without a past are the (BNSH) keys and values themselves
        for present, source in ((outputs[1], k), (outputs[2], v)):
            if present:
                graph.add("Identity", [source], [present])
    scale = a.get("scale") or (1.0 / math.sqrt(hidden // heads) if hidden else None)
    if scale is None:
        raise NoMatch("head size unknown (needed for the default scale)")
    bias = None
    filter_value = float(a.get("mask_filter_value", -10000.0))
    if key_mask:
        if graph.rank(key_mask) != 2:
            raise NoMatch("only a 2-D [batch, kv_len] key_padding_mask is fused")
        keep = graph.add("Cast", [key_mask], to=onnx.TensorProto.BOOL)
        values = [graph.constant(np.array(x, dtype)) for x in (0.0, filter_value)]
        padding = graph.add("Where", [keep, *values])
        axes = graph.constant(np.array([1, 2], np.int64), "axes")
        bias = graph.add("Unsqueeze", [padding, axes])
    if attn_bias:
        extra = graph.to_rank4(attn_bias)
        bias = graph.add("Add", [bias, extra]) if bias else extra
    y4 = graph.fresh("attention_y")
    _site_node(
        graph, site, q, k, v, bias, None, None, y4,
        scale=float(scale), softcap=0.0, causal=2 * int(a.get("unidirectional", 0)),
        fill=float(-np.finfo(np.float32).max), empty_row="nan",
    )
    _heads_last(graph, y4, outputs[0])


# --------------------------------------------------------------------------- com.microsoft Attention


def _rewrite_ms_attention(graph: _Graph, node, site: AttentionSite) -> None:
    """onnxruntime's packed-projection Attention (what its transformer optimizer fuses BERT-style
    self-attention into): Q, K, V = split(input @ weights + bias) by ``qkv_hidden_sizes`` (equal
    thirds by default), then multi-head attention. Its masks are additive, as onnxruntime applies
    them: ``mask_filter_value`` (-10000 by default) on masked keys, so a fully masked row averages
    every value (no NaN). ``unidirectional``: a key after its query (bottom-right with a past) is
    skipped. The packed past [2, B, heads, S_past, d] is concatenated in front; ``present`` is the
    same packing of the keys and values used."""
    a = _attrs(node)
    inputs = list(node.input) + [""] * (8 - len(node.input))
    x, weights, proj_bias, mask, past, attn_bias, past_length = inputs[:7]
    heads = a.get("num_heads")
    if not heads:
        raise NoMatch("num_heads missing")
    for name in ("do_rotary", "past_present_share_buffer"):
        if a.get(name):
            raise NoMatch(f"{name} is not fused")
    if past_length:
        raise NoMatch("past_sequence_length (a shared past/present buffer) is not fused")
    dtype = graph.dtype(x)
    if dtype not in FLOAT_TYPES:
        raise NoMatch(f"input dtype {dtype} (ours: {', '.join(FLOAT_TYPES)})")
    if graph.rank(x) != 3:
        raise NoMatch(f"input rank {graph.rank(x)} unknown or not 3")
    sizes = list(a.get("qkv_hidden_sizes") or [])
    if not sizes:
        total = _dim(graph, weights, 1)
        if total is None or total % 3:
            raise NoMatch("projection width unknown or not a multiple of 3 (needed to split Q, K, V)")
        sizes = [total // 3] * 3
    if sizes[0] != sizes[1] or any(size % heads for size in sizes):
        raise NoMatch(f"qkv_hidden_sizes {sizes} do not split into {heads} heads of equal Q/K width")
    # Half models: onnxruntime keeps the projected Q, K, V in float32 (rounding them to half
    # first put us 3x further from the float64 result than it); so do we, to the output.
    work = "float32" if dtype != "float32" else dtype

    def widened(name):
        return graph.add("Cast", [name], to=onnx.TensorProto.FLOAT) if work != dtype else name

    projected = graph.add("MatMul", [widened(x), widened(weights)], rank=3)
    if proj_bias:
        projected = graph.add("Add", [projected, widened(proj_bias)], rank=3)
    parts = [graph.fresh(n) for n in ("q", "k", "v")]
    graph.add("Split", [projected, graph.constant(np.array(sizes, np.int64), "split")], parts, axis=2)
    q, k, v = (_heads_first(graph, part, heads) for part in parts)
    outputs = list(node.output) + [""] * (2 - len(node.output))
    if past:
        index = [graph.constant(np.array(i, np.int64), "index") for i in (0, 1)]
        k = graph.add("Concat", [widened(graph.add("Gather", [past, index[0]], axis=0, rank=4)), k], axis=2)
        v = graph.add("Concat", [widened(graph.add("Gather", [past, index[1]], axis=0, rank=4)), v], axis=2)
    if outputs[1]:
        zero = graph.constant(np.array([0], np.int64), "axes")
        present = graph.add("Concat", [graph.add("Unsqueeze", [k, zero]), graph.add("Unsqueeze", [v, zero])],
                            [outputs[1] if work == dtype else graph.fresh("present")], axis=0)
        if work != dtype:
            graph.add("Cast", [present], [outputs[1]], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    bias = None
    if mask:
        bias = _ms_mask_bias(graph, mask, k, work, float(a.get("mask_filter_value", -10000.0)))
    if attn_bias:
        extra = graph.to_rank4(widened(attn_bias), graph.rank(attn_bias))
        bias = graph.add("Add", [bias, extra]) if bias else extra
    y4 = graph.fresh("attention_y")
    _site_node(
        graph, site, q, k, v, bias, None, None, y4,
        scale=float(a.get("scale") or 1.0 / math.sqrt(sizes[0] // heads)), softcap=0.0,
        causal=2 * int(a.get("unidirectional", 0)), fill=float(-np.finfo(np.float32).max), empty_row="nan",
    )
    if work == dtype:
        _heads_last(graph, y4, outputs[0])
    else:
        y = _heads_last(graph, y4, graph.fresh("attention_y3"))
        graph.add("Cast", [y], [outputs[0]], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


# --------------------------------------------------------------------------- com.microsoft GQA

_GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
               "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale",
               "q_norm_weight", "k_norm_weight", "query_seqlens")


def _rewrite_gqa(graph: _Graph, node, site: AttentionSite) -> None:
    """onnxruntime's GroupQueryAttention (what its LLM exporters, onnxruntime-genai's model builder
    among them, emit): 3-D Q/K/V or packed QKV, BNSH past key/value, per-batch ``seqlens_k``
    (total length - 1) and the scalar ``total_sequence_length``, as onnxruntime's CPU kernel
    computes it:

    * first prompt (S == total_sequence_length): no past; key j is attended by query s if j <= s
      (right-padded rows are don't-cares); later calls: batch b has ``past_b = seqlens_k[b] + 1 - S``
      valid past keys and query s sits at position past_b + s (bottom-right causal, the site's
      ``causal=2`` with key counts past_b + S); ``causal=0``: every valid key;
    * ``local_window_size`` W: a query attends to the W keys up to its own position (as onnxruntime
      1.32 computes it);
    * ``present_*`` [B, kv_heads, max(total_sequence_length, past buffer), d]: each batch's
      past_b valid past keys, then its S new ones, zeros after;
    * ``do_rotary``: Q and the new K rotated (half-split or interleaved) at ``position_ids`` if
      given, else at positions past_b + s (1 for a first prompt's padding), cos/sin from the caches;
    * scale (default 1/sqrt(d)) and softcap as the site's; ``attention_bias`` [B|1, N|1, S, total]
      added after the softcap (as onnxruntime 1.32 does)."""
    a = _attrs(node)
    inputs = dict(zip(_GQA_INPUTS, list(node.input) + [""] * len(_GQA_INPUTS)))
    for name in _GQA_INPUTS[12:]:
        if inputs[name]:
            raise NoMatch(f"input {name} is not fused")
    bias = inputs["attention_bias"]
    if bias and graph.rank(bias) != 4:
        raise NoMatch(f"attention_bias rank {graph.rank(bias)} unknown or not 4 ([B|1, N|1, S, total])")
    for name in ("qk_output", "sliding_window_cache", "kv_cache_bit_width"):
        if a.get(name):
            raise NoMatch(f"{name} is not fused")
    for name in ("k_quant_type", "v_quant_type"):
        if a.get(name, b"NONE") not in (b"NONE", "NONE"):
            raise NoMatch(f"{name} (a quantized cache) is not fused")
    outputs = list(node.output) + [""] * (4 - len(node.output))
    if outputs[3] and (outputs[3] in graph.outputs or graph.consumers.get(outputs[3])):
        raise NoMatch("output_qk is requested (it needs the whole score matrix)")
    heads, kv_heads = a.get("num_heads"), a.get("kv_num_heads")
    if not heads or not kv_heads or heads % kv_heads:
        raise NoMatch("num_heads must be a multiple of kv_num_heads")
    query = inputs["query"]
    dtype = graph.dtype(query)
    if dtype not in FLOAT_TYPES:
        raise NoMatch(f"query dtype {dtype} (ours: {', '.join(FLOAT_TYPES)})")
    if graph.rank(query) != 3:
        raise NoMatch(f"query rank {graph.rank(query)} unknown or not 3")
    hidden = _dim(graph, query, 2)
    if hidden is None:
        raise NoMatch("query hidden size unknown (needed to split heads)")
    packed = not inputs["key"]
    head_size = hidden // (heads + 2 * kv_heads) if packed else hidden // heads
    causal, window = int(a.get("causal", 1)), int(a.get("local_window_size", -1))
    if window > 0 and not causal:
        raise NoMatch("local_window_size without causal")
    if packed:
        parts = [graph.fresh(n) for n in ("q", "k", "v")]
        sizes = np.array([heads, kv_heads, kv_heads], np.int64) * head_size
        graph.add("Split", [query, graph.constant(sizes, "split")], parts, axis=2)
        q, k, v = parts
    else:
        q, k, v = query, inputs["key"], inputs["value"]
    q, k, v = _heads_first(graph, q, heads), _heads_first(graph, k, kv_heads), _heads_first(graph, v, kv_heads)

    int64 = onnx.TensorProto.INT64
    one = graph.constant(np.array([1], np.int64), "one")
    s_len = _dim_of(graph, query, 1)  # [1]
    # total_sequence_length as [1], scalar or 1-element vector, whether a tensor or (genai's
    # Shape -> Gather of the attention mask) a value TVM's importer keeps as a shape expression
    total = _int_vector(graph, inputs["total_sequence_length"])
    seq_total = graph.add("Add", [graph.add("Cast", [inputs["seqlens_k"]], to=int64), one], rank=1)  # [B]
    first = graph.add("Equal", [s_len, total])
    kv_len = graph.add("Where", [first, s_len, seq_total], rank=1)  # past_b + S
    past = graph.add("Sub", [kv_len, s_len], rank=1)  # past_b
    past4 = graph.add("Reshape", [past, graph.constant(np.array([-1, 1, 1, 1], np.int64), "shape")], rank=4)
    q_pos = _positions(graph, q, 2)  # [1, 1, S, 1]
    if a.get("do_rotary", 0):
        if not inputs["cos_cache"] or not inputs["sin_cache"]:
            raise NoMatch("do_rotary without cos_cache/sin_cache")
        half = _dim(graph, inputs["cos_cache"], 1)
        if half is None or 2 * half > head_size:
            raise NoMatch("cos_cache's rotary width unknown or wider than the head")
        if inputs["position_ids"]:  # [B, S], as given
            pos = graph.add("Cast", [inputs["position_ids"]], to=int64)
        else:
            pos = graph.add("Add", [past4, q_pos], rank=4)  # [B, 1, S, 1]
            total4 = graph.add("Reshape", [seq_total, graph.constant(np.array([-1, 1, 1, 1], np.int64), "shape")])
            pos = graph.add("Where", [graph.add("Less", [pos, total4]), pos, one], rank=4)
            pos = graph.add("Squeeze", [pos, graph.constant(np.array([1, 3], np.int64), "axes")])  # [B, S]
        # the rotation itself is com.microsoft RotaryEmbedding's (`onnx_ops`), on Q and the new K
        # [B, heads, S, d] at positions [B, S]
        q, k = (graph.add("RotaryEmbedding", [x, pos, inputs["cos_cache"], inputs["sin_cache"]], domain="com.microsoft",
                          rank=4, interleaved=int(bool(a.get("rotary_interleaved", 0))))
                for x in (q, k))

    present = [outputs[1], outputs[2]]
    if inputs["past_key"]:
        # [B, H, max(total, P), D] as onnxruntime's CPU kernel sizes present: each batch's valid
        # past rows, its new rows right after, zeros after (rows past total are no batch's keys)
        length = graph.add("Max", [total, _dim_of(graph, inputs["past_key"], 2)])
        new_kv = {"past_key": k, "past_value": v}
        k, v = (graph.add(KV_APPEND_OP, [inputs[p], x, past, length], [name or graph.fresh(p)], domain=DOMAIN, rank=4)
                for p, x, name in (("past_key", k, present[0]), ("past_value", v, present[1])))
        if bias:
            # The bias is total_sequence_length wide, the present max(total, past buffer) long:
            # the site reads keys of that width (the same append, `total` rows; no batch has more
            # valid keys), a second copy only where a bias is given.
            k, v = (graph.add(KV_APPEND_OP, [inputs[p], new_kv[p], past, total], domain=DOMAIN, rank=4)
                    for p in ("past_key", "past_value"))
    else:
        for name, x in zip(present, (k, v)):
            if name:
                graph.add("Identity", [x], [name])
    # head_sink [num_heads]: a logit per head in every row's softmax, without a value; smooth_softmax
    # is a sink of 0 (both as onnxruntime computes them; the sink is neither scaled nor capped)
    sink = inputs["head_sink"] or None
    if sink is None and a.get("smooth_softmax"):
        sink = graph.constant(np.zeros(heads, np.dtype(dtype)), "sink")
    if sink is not None and graph.rank(sink) not in (None, 1):
        raise NoMatch(f"head_sink rank {graph.rank(sink)} (1 expected: [num_heads])")
    keep = None
    if window > 0:
        oldest = graph.add("Sub", [graph.add("Add", [past4, q_pos]), graph.constant(np.array(window - 1, np.int64))])
        keep = graph.add("GreaterOrEqual", [_positions(graph, k, 2, last=True), oldest], rank=4)  # [B, 1, S, L]
    y4 = graph.fresh("attention_y")
    _site_node(
        graph, site, q, k, v, bias or None, keep, kv_len, y4, sink=sink,
        scale=float(a.get("scale") or 1.0 / math.sqrt(head_size)), softcap=float(a.get("softcap", 0.0)),
        causal=2 if causal else 0, fill=float("-inf"), empty_row="nan",
    )
    _heads_last(graph, y4, outputs[0])


def _dim_of(graph: _Graph, x: str, axis: int) -> str:
    """x's dim `axis` as an int64 [1] tensor (Shape -> Gather: Shape's start/end need opset 15)."""
    return _int_vector(graph, graph.add("Gather", [graph.add("Shape", [x]),
                                                   graph.constant(np.array([axis], np.int64), "axis")], axis=0))


def _int_vector(graph: _Graph, x: str) -> str:
    """x (an integer scalar or vector) as an int64 1-D tensor. TVM's importer keeps values computed
    from shapes as shape expressions, which its Max, Reshape and Expand converters refuse; our
    IntVector op makes them tensors."""
    return graph.add(INT_VECTOR_OP, [x], domain=DOMAIN, rank=1)


def _positions(graph: _Graph, x: str, axis: int, last: bool = False) -> str:
    """int64 positions 0..n-1 along `axis` of the 4-D float tensor x, as [1, 1, n, 1] or, with
    `last`, [1, 1, 1, n]: from x's own shape, without a Range (TVM cannot build a Range whose length
    is computed at run time), through Gathers at index 0 (a Slice to length 1 left TVM with
    min(1, B) dims it could not broadcast against B when dims are symbolic)."""
    line, zero = x, graph.constant(np.array(0, np.int64), "index")
    for other in sorted(set(range(4)) - {axis}, reverse=True):
        line = graph.add("Gather", [line, zero], axis=other)
    one = graph.constant(np.array(1, np.int64))
    ones = graph.add("Where", [graph.add("IsNaN", [line]), one, one])
    counted = graph.add("Sub", [graph.add("CumSum", [ones, graph.constant(np.array(0, np.int64), "axis")]), one])
    shape = [1, 1, 1, -1] if last else [1, 1, -1, 1]
    return graph.add("Reshape", [counted, graph.constant(np.array(shape, np.int64), "shape")], rank=4)


def _ms_mask_bias(graph: _Graph, mask: str, k: str, dtype: str, filter_value: float) -> str:
    """com.microsoft Attention's mask_index as an additive [B, 1, 1 or S, S_total] bias: 1-D
    [B] valid key counts (keys from the count on are masked), 2-D [B, S_total] or 3-D
    [B, S, S_total] 0/1 masks (0 masked)."""
    rank = graph.rank(mask)
    values = [graph.constant(np.array(x, dtype)) for x in (0.0, filter_value)]
    if rank == 1:
        if _dim(graph, mask, 0) is not None and _dim(graph, mask, 0) == 2 * (_dim(graph, k, 0) or -1):
            raise NoMatch("a 1-D mask_index with start positions ([2 * batch]) is not fused")
        positions = _positions(graph, k, 2, last=True)  # [1, 1, 1, S_total]
        counts = graph.add("Reshape", [graph.add("Cast", [mask], to=onnx.TensorProto.INT64),
                                       graph.constant(np.array([-1, 1, 1, 1], np.int64), "shape")])
        keep = graph.add("Less", [positions, counts])  # [B, 1, 1, S_total]
        axes = []
    elif rank in (2, 3):
        keep = graph.add("Cast", [mask], to=onnx.TensorProto.BOOL)
        axes = [1, 2] if rank == 2 else [1]
    else:
        raise NoMatch(f"mask_index of rank {rank} is not fused (1-D lengths, 2-D and 3-D masks are)")
    padding = graph.add("Where", [keep, *values], rank=4 if not axes else None)
    if not axes:
        return padding
    return graph.add("Unsqueeze", [padding, graph.constant(np.array(axes, np.int64), "axes")], rank=4)


# --------------------------------------------------------------------------- decomposed


def _rewrite_decomposed(graph: _Graph, softmax, site: AttentionSite, opset: int) -> None:
    consumed = [softmax]
    x = softmax.input[0]
    rank = graph.rank(x)
    if rank not in (3, 4):
        raise NoMatch(f"softmax input rank {rank} unknown or not 3/4")
    axis = _attrs(softmax).get("axis", -1 if opset >= 13 else 1)
    if axis not in (-1, rank - 1):
        raise NoMatch(f"softmax axis {axis} is not the last")
    dtype = graph.dtype(x)
    if dtype not in FLOAT_TYPES:
        raise NoMatch(f"dtype {dtype} (ours: {', '.join(FLOAT_TYPES)})")

    # Output side: [Where(IsNaN(p), 0, p)] -> MatMul(p, V).
    p = softmax.output[0]
    users = graph.consumers.get(p, [])
    # Shape(P) (DeBERTa's view of P back to [B*H, Sq, Skv] is built from it, dims symbolic): read
    # from Q's and K's shapes instead once the site is built.
    shape_users = [(u, False) for u in users if u.op_type == "Shape"]
    users = [u for u in users if u.op_type != "Shape"]
    empty_row = "nan"
    if p in graph.outputs:
        raise NoMatch("the probabilities are a graph output")
    if sorted(u.op_type for u in users) == ["IsNaN", "Where"]:
        isnan = next(u for u in users if u.op_type == "IsNaN")
        where = next(u for u in users if u.op_type == "Where")
        zero = graph.scalar(where.input[1])
        if not (where.input[0] == isnan.output[0] and where.input[2] == p and zero == 0.0
                and graph.only_consumer(isnan.output[0], where)):
            raise NoMatch("IsNaN guard of an unexpected form")
        consumed += [isnan, where]
        p, users, empty_row = where.output[0], graph.consumers.get(where.output[0], []), "zero_if_nan"
    if len(users) == 1 and _widening_cast(graph, users[0], narrowing=True):
        # Half models that run the softmax in float32 (HF's softmax(..., dtype=float32).to(q.dtype)):
        # P is cast back to V's type. The fused op keeps P in float32 (one rounding fewer).
        consumed.append(users[0])
        p = users[0].output[0]
        users = graph.consumers.get(p, [])
    while len(users) == 1 and _identity_cast(graph, users[0]):  # Bloom: P cast to float32, twice
        consumed.append(users[0])
        p = users[0].output[0]
        users = graph.consumers.get(p, [])
    # Bloom's form: the scores of batched [B*H, Sq, D] x [B*H, D, Skv] products viewed as
    # [B, H, Sq, Skv] for the mask and the softmax, and P viewed back as [B*H, Sq, Skv] for the
    # product with [B*H, Skv, Dv] values (with static shapes onnxscript's optimizer may have made
    # that product 4-D; the scores' view stays).
    merged_p = None
    if len(users) == 1 and users[0].op_type == "Reshape" and rank == 4 and p not in graph.outputs:
        merged_p = _dim(graph, p, 1)
        if merged_p is None or graph.rank(users[0].output[0]) != 3:
            raise NoMatch("the probabilities are reshaped before MatMul(p, V), and not from [B, H, Sq, Skv] "
                          "(H known) to [B*H, Sq, Skv]")
        consumed.append(users[0])
        p = users[0].output[0]
        users = graph.consumers.get(p, [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != p or p in graph.outputs:
        raise NoMatch("the probabilities do not feed exactly one MatMul(p, V)")
    if any(name in graph.outputs for node in consumed for name in node.output):
        raise NoMatch("a value between the softmax and MatMul(p, V) is a graph output")
    pv = users[0]
    consumed.append(pv)
    v = pv.input[1]
    # torch's SDPA export of a half model widens V to float32 too: P @ float32(V), float32 out.
    widened_v = graph.producer.get(v)
    if widened_v is not None and _widening_cast(graph, widened_v, narrowing=False) and graph.only_consumer(v, pv):
        consumed.append(widened_v)
        v = widened_v.input[0]
    else:
        widened_v = None

    # Score side, from the softmax back: [Add(bias)]* -> [Where(keep, s, fill)] -> [scale] -> MatMul.
    # A Cast of half scores to float32 may sit anywhere in that chain (the softmax in float32).
    biases, keep, fill, scale = [], None, float(-np.finfo(np.float32).max), 1.0
    s = x

    def producer(s, user):
        """s's producer when `user` is its one consumer besides Shape nodes (recorded with the
        layout of s: after a merged-heads view, the products' [B*H, Sq, Skv])."""
        node = graph.producer.get(s)
        others = [u for u in graph.consumers.get(s, []) if u is not user]
        if node is None or s in graph.outputs or any(u.op_type != "Shape" for u in others):
            return None
        shape_users.extend((u, merged_heads is not None) for u in others)
        return node

    merged_heads = None  # H of the scores' [B*H, Sq, Skv] -> [B, H, Sq, Skv] view, once passed
    node = producer(s, consumed[0])
    cast = [False]

    def uncast(node, s):
        if node is not None and not cast[0] and _widening_cast(graph, node, narrowing=False):
            cast[0] = True
            consumed.append(node)
            s = node.input[0]
            node = producer(s, node)
        return node, s

    node, s = uncast(node, s)
    window = _window_mask(graph, node, s) if node is not None and node.op_type == "Reshape" else None
    if window is not None:  # Swin's shifted-window mask, added in a per-window view of the scores
        consumed += window["nodes"]
        s = window["scores"]
        node = producer(s, window["nodes"][-1])
        node, s = uncast(node, s)
    # Adds (biases), one Where (a select mask) and one Reshape of [B*H, Sq, Skv] products to a
    # [B, H, Sq, Skv] view (BLOOM, DeBERTa: heads merged into the batch of the products), in any
    # order; a bias or mask before the view is in the merged layout.
    keep_merged = False
    while node is not None:
        if node.op_type == "Add":
            chain, other = _chain_operand(graph, node, s)
            biases.append((other, merged_heads is not None))
            s = chain
        elif node.op_type == "Where" and keep is None:
            keep, fill, s = _select_mask(graph, node)
            keep_merged = merged_heads is not None
        elif node.op_type == "Reshape" and merged_heads is None and rank == 4 and graph.rank(node.input[0]) == 3:
            merged_heads = _merged_heads(graph, node.input[0], s)
            s = node.input[0]
        else:
            break
        consumed.append(node)
        node = producer(s, node)
        node, s = uncast(node, s)
    if merged_p is not None and merged_p != merged_heads:
        raise NoMatch("the probabilities are viewed as [B*H, Sq, Skv] for MatMul(p, V), the scores are not "
                      "a view of [B*H, Sq, Skv] products with as many heads")
    softcap = _softcap(graph, node, s)
    if softcap:
        cap, tanh, divide = softcap
        consumed += [node, tanh, divide]
        s = _chain_operand(graph, divide, tanh.input[0])[0]
        node = producer(s, divide)
        node, s = uncast(node, s)
        softcap = cap
    q_factor = None  # a constant per head/query factor of the scores, moved onto Q
    if node is not None and node.op_type in ("Mul", "Div"):
        chain, other = _chain_operand(graph, node, s)
        value = graph.scalar(other)
        q_factor = _query_factor(graph, node, other) if value is None else None
        if q_factor is not None:
            value = 1.0
        elif value is None or (node.op_type == "Div" and chain != node.input[0]):
            raise NoMatch(f"{node.op_type} {node.name!r} before the softmax is not by a constant scalar "
                          "(nor by a constant that varies per head or query only)")
        scale *= value if node.op_type == "Mul" else 1.0 / value
        consumed.append(node)
        s = chain
        node = producer(s, node)
        node, s = uncast(node, s)
    if node is None or not _is_score_matmul(node):
        raise NoMatch("the softmax input is not built from MatMul(Q, K^T) [scale] [mask]")
    qk = node
    consumed.append(qk)
    fused = _attrs(qk) if qk.op_type == "FusedMatMul" else {}
    scale *= float(fused.get("alpha", 1.0))
    q, scale = _unscale(graph, qk.input[0], qk, scale)
    kt, scale = _unscale(graph, qk.input[1], qk, scale)
    k = kt if fused.get("transB", 0) else _untranspose_keys(graph, kt, qk)
    if window is not None:
        biases.append((_window_bias(graph, window, q, kt, rank), False))
    if q_factor is not None:
        if q_factor.ndim > (graph.rank(q) or 0) or graph.dtype(q) is None:
            raise NoMatch("the scores' per-head factor has more dims than Q")
        q = graph.add("Mul", [q, graph.constant(q_factor.astype(graph.dtype(q)), "q_factor")], rank=graph.rank(q))
    k_source, v_source = _unrepeat(graph, k), _unrepeat(graph, v)
    if (k_source == k) != (v_source == v):  # only one side's repeat recognised: keep both repeated
        k_source, v_source = k, v
    types = {graph.dtype(name) for name in (qk.input[0], qk.input[1], v)} - {None}
    if len(types) != 1 or not types <= set(FLOAT_TYPES):
        raise NoMatch(f"Q, K and V have types {sorted(map(str, types))} (one of {', '.join(FLOAT_TYPES)} for all)")
    if merged_heads is not None:
        if any(graph.rank(name) != 3 for name in (q, k_source)) or graph.rank(v_source) != (3 if merged_p else 4):
            raise NoMatch("the [B*H, Sq, Skv] scores are not of 3-D Q and K (or P V of 3-D V)")
        q4, k4 = (_split_heads(graph, name, merged_heads) for name in (q, k_source))
        v4 = _split_heads(graph, v_source, merged_heads) if merged_p else v_source
    else:
        q4, k4, v4 = (graph.to_rank4(name) for name in (q, k_source, v_source))
    bias = None
    for term, merged in biases:
        term = _split_heads(graph, term, merged_heads) if merged and _dim(graph, term, 0) != 1 else graph.to_rank4(term)
        bias = term if bias is None else graph.add("Add", [bias, term])
    if keep is not None:
        keep = _split_heads(graph, keep, merged_heads) if keep_merged and _dim(graph, keep, 0) != 1 else graph.to_rank4(keep)
    for shape, merged in shape_users:
        consumed.append(shape)
        _scores_shape(graph, shape, q4, k4, rank, merged)
    out = pv.output[0]
    target = graph.fresh("attention_half") if widened_v is not None else out
    y4 = target if rank == 4 and merged_p is None else graph.fresh("attention_y")
    site.nodes = [n.name for n in consumed]
    _site_node(
        graph, site, q4, k4, v4, bias, keep, None, y4,
        scale=float(scale), softcap=float(softcap or 0.0), causal=0, fill=float(fill), empty_row=empty_row,
    )
    if rank == 3:
        graph.add("Squeeze", [y4, graph.constant(np.array([0], np.int64), "axes")], [target])
    elif merged_p is not None:  # [B, H, Sq, Dv] -> [B*H, 1, Sq, Dv] -> [B*H, Sq, Dv]
        merged = graph.add("Reshape", [y4, graph.constant(np.array([-1, 1, 0, 0], np.int64), "shape")], rank=4)
        graph.add("Squeeze", [merged, graph.constant(np.array([1], np.int64), "axes")], [target])
    if widened_v is not None:
        graph.add("Cast", [target], [out], to=onnx.TensorProto.FLOAT)
    for n in consumed:
        graph.removed.add(id(n))


def _scores_shape(graph: _Graph, shape, q4: str, k4: str, rank: int, merged: bool) -> None:
    """The output of `shape`, a Shape node of the scores or probabilities ([B, H, Sq, Skv]; for a
    3-D site [B', Sq, Skv]; merged: the products' [B*H, Sq, Skv] of a merged-heads view), computed
    from the site's 4-D Q and K (Q holds the batch and every query head), with the node's
    start/end."""
    dims = [_dim_of(graph, q4, axis) for axis in range(4 - rank, 3)] + [_dim_of(graph, k4, 2)]
    if merged:
        dims, rank = [graph.add("Mul", dims[:2]), *dims[2:]], 3
    a = _attrs(shape)
    start, end = int(a.get("start", 0)), a.get("end")
    bounds = [graph.constant(np.array([x], np.int64), n)
              for x, n in ((start, "starts"), (rank if end is None else int(end), "ends"))]
    graph.add("Slice", [graph.add("Concat", dims, axis=0), *bounds], list(shape.output))


def _select_mask(graph: _Graph, node):
    """(keep, fill, scores) of ``Where(keep, scores, fill)`` or of torch's masked_fill
    ``Where(masked, fill, scores)`` (keep = Not(masked)), the fill a constant scalar."""
    condition, a, b = node.input
    if graph.dtype(condition) == "bool":
        if graph.scalar(b) is not None:
            return condition, graph.scalar(b), a
        if graph.scalar(a) is not None:
            return graph.add("Not", [condition], rank=graph.rank(condition)), graph.scalar(a), b
    raise NoMatch("Where before the softmax is not Where(bool mask, scores, constant) nor Where(bool mask, "
                  "constant, scores)")


def _merged_heads(graph: _Graph, merged: str, view: str) -> int:
    """H of a [B*H, Sq, Skv] -> [B, H, Sq, Skv] view of the scores (H known; dims that are known on
    both sides must agree)."""
    before, after = graph.dims(merged) or [None] * 3, graph.dims(view) or [None] * 4
    heads = after[1]
    if not isinstance(heads, int):
        raise NoMatch("the scores are a 4-D view of 3-D products with a head count not known")
    known = all(isinstance(d, int) for d in (before[0], after[0]))
    if known and before[0] != after[0] * heads or any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(before[1:], after[2:])):
        raise NoMatch(f"the scores' view {after} of {before} is not [B*H, Sq, Skv] -> [B, H, Sq, Skv]")
    return heads


def _split_heads(graph: _Graph, x: str, heads: int) -> str:
    """[B*H, S, D] -> [B, H, S, D] (batch-major, as the graph's own Reshape of the scores):
    Unsqueeze to [B*H, 1, S, D], then Reshape [-1, H, 0, 0] (0 copies S and D, whatever they are)."""
    unsqueezed = graph.add("Unsqueeze", [x, graph.constant(np.array([1], np.int64), "axes")], rank=4)
    return graph.add("Reshape", [unsqueezed, graph.constant(np.array([-1, heads, 0, 0], np.int64), "shape")], rank=4)


def _identity_cast(graph: _Graph, node) -> bool:
    """A Cast to the type its input already has."""
    if node.op_type != "Cast":
        return False
    source = graph.dtype(node.input[0])
    to = _attrs(node).get("to")
    return source is not None and to is not None and np.dtype(helper.tensor_dtype_to_np_dtype(to)).name == source


def _is_score_matmul(node) -> bool:
    """MatMul(Q, K^T), or onnxruntime's FusedMatMul(Q, K^T or K, transB, alpha) that its saved
    optimised models hold instead (the scale folded into alpha; transA and the batch
    transposes are other layouts, not matched)."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        return True
    if node.op_type != "FusedMatMul" or node.domain != "com.microsoft":
        return False
    a = _attrs(node)
    return not (a.get("transA", 0) or a.get("transBatchA", 0) or a.get("transBatchB", 0))


def _widening_cast(graph: _Graph, node, narrowing: bool) -> bool:
    """A Cast from a half type to float32 (narrowing: from float32 to a half type)."""
    if node.op_type != "Cast":
        return False
    half = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
    to, source = _attrs(node).get("to"), graph.dtype(node.input[0])
    if narrowing:
        return source == "float32" and to in half
    return to == onnx.TensorProto.FLOAT and source in half.values()


def _window_mask(graph: _Graph, outer, x: str):
    """Swin's shifted-window mask: ``Reshape(Add(...Add(Reshape(scores, windows), mask)...), back)``
    where the outer Reshape restores the scores' shape (both shapes known and equal). Returns the
    scores, the two shape inputs, the masks and the nodes; None if the chain is not of that form."""
    adds, masks = [], []
    a = outer.input[0]
    node = _single_producer(graph, a, outer)
    while node is not None and node.op_type == "Add":
        try:
            chain, mask = _chain_operand(graph, node, a)
        except NoMatch:
            return None
        adds.append(node)
        masks.append(mask)
        a = chain
        node = _single_producer(graph, a, node)
    if not adds or node is None or node.op_type != "Reshape":
        return None
    scores = node.input[0]
    before, after = graph.dims(scores), graph.dims(x)
    if before is None or before != after or any(d is None for d in before):
        return None
    return {"scores": scores, "windows": node.input[1], "back": outer.input[1], "masks": masks[::-1],
            "nodes": [outer, *adds, node]}


def _window_bias(graph: _Graph, window: dict, q: str, kt: str, rank: int) -> str:
    """The window masks as a bias of the scores' shape: the source graph's own Reshape/Add/Reshape
    applied to zeros of that shape (built from Q's and K^T's shapes, not from the scores)."""
    def zeros(x, axis):
        one = graph.add("Slice", [x, *(graph.constant(np.array([v], np.int64), n)
                                       for v, n in ((0, "starts"), (1, "ends"), (axis, "axes")))])
        zero = graph.constant(np.array(0, graph.dtype(q)), "zero")
        return graph.add("Where", [graph.add("IsNaN", [one]), zero, zero])

    acc = graph.add("Reshape", [graph.add("Add", [zeros(q, -1), zeros(kt, -2)]), window["windows"]])
    for mask in window["masks"]:
        acc = graph.add("Add", [acc, mask])
    return graph.add("Reshape", [acc, window["back"]], rank=rank)


def _query_factor(graph: _Graph, node, other: str):
    """The constant of ``Mul(scores, c)`` when c is a float tensor constant along the keys (its last
    dim 1: per head and/or query, e.g. Swin V2's exp(logit_scale) per head), which may multiply Q
    instead: (q c) . k = (q . k) c. None otherwise."""
    value = graph.const(other)
    if node.op_type != "Mul" or value is None or value.dtype.kind != "f" or value.ndim == 0 or value.shape[-1] != 1:
        return None
    return value


def _softcap(graph: _Graph, node, s: str):
    """(cap, Tanh, Div) where node is Gemma 2's logit soft-capping ``Mul(Tanh(Div(s, cap)), cap)``
    (or ``Mul(s, 1/cap)`` inside), with cap a positive constant; else None."""
    if node is None or node.op_type != "Mul":
        return None
    chain, other = _chain_operand(graph, node, s)
    cap, tanh = graph.scalar(other), _single_producer(graph, chain, node)
    if cap is None or not cap > 0 or tanh is None or tanh.op_type != "Tanh":
        return None
    divide = _single_producer(graph, tanh.input[0], tanh)
    if divide is None or divide.op_type not in ("Div", "Mul"):
        return None
    inner, value = _chain_operand(graph, divide, tanh.input[0])
    value = graph.scalar(value)
    if value is None:
        return None
    if divide.op_type == "Div" and inner == divide.input[0] and math.isclose(value, cap, rel_tol=1e-6):
        return cap, tanh, divide
    if divide.op_type == "Mul" and math.isclose(value * cap, 1.0, rel_tol=1e-6):
        return cap, tanh, divide
    return None


def _single_producer(graph: _Graph, name: str, user):
    node = graph.producer.get(name)
    if node is None or not graph.only_consumer(name, user):
        return None
    return node


def _chain_operand(graph: _Graph, node, current: str):
    """(the operand of a binary node that carries the scores, the other operand).

    The scores are the operand whose producers lead back to a MatMul through the chain's own
    ops (a mask or a scale does not)."""
    a, b = node.input[0], node.input[1]
    if _leads_to_matmul(graph, a):
        return a, b
    if _leads_to_matmul(graph, b):
        return b, a
    raise NoMatch(f"neither operand of {node.op_type} {node.name!r} comes from MatMul(Q, K^T)")


def _leads_to_matmul(graph: _Graph, name: str, depth: int = 6) -> bool:
    node = graph.producer.get(name)
    if node is None or depth == 0:
        return False
    if _is_score_matmul(node):
        return True
    if node.op_type == "Cast":
        return _leads_to_matmul(graph, node.input[0], depth - 1)
    if node.op_type in ("Add", "Mul", "Div", "Where", "Tanh", "Reshape"):
        operands = node.input[1:] if node.op_type == "Where" else node.input[:1] if node.op_type == "Reshape" else node.input
        return any(_leads_to_matmul(graph, i, depth - 1) for i in operands)
    return False


def _unscale(graph: _Graph, name: str, user, scale: float):
    """Q or K^T multiplied by a constant (the SDPA form's d^-1/4): fold it into the scale."""
    node = graph.producer.get(name)
    if node is not None and node.op_type in ("Mul", "Div") and graph.only_consumer(name, user):
        for i in (0, 1):
            value = graph.scalar(node.input[1 - i])
            if value is not None and (node.op_type == "Mul" or i == 0):
                return node.input[i], scale * (value if node.op_type == "Mul" else 1.0 / value)
    return name, scale


def _untranspose_keys(graph: _Graph, kt: str, user) -> str:
    """K [.., Skv, D] from K^T: read through Transpose(0,1,3,2) (BHSD keys) and (0,2,3,1) (BSHD
    keys, a transpose to BHSD is inserted); any other K^T gets an explicit transpose back."""
    rank = graph.rank(kt)
    node = graph.producer.get(kt)
    if node is not None and node.op_type == "Transpose" and graph.only_consumer(kt, user):
        perm = list(_attrs(node).get("perm", []))
        if rank == 4 and perm == [0, 1, 3, 2] or rank == 3 and perm == [0, 2, 1]:
            return node.input[0]
        if rank == 4 and perm == [0, 2, 3, 1]:
            return graph.add("Transpose", [node.input[0]], perm=[0, 2, 1, 3])
    perm = [0, 1, 3, 2] if rank == 4 else [0, 2, 1]
    return graph.add("Transpose", [kt], perm=perm)


def _unrepeat(graph: _Graph, name: str) -> str:
    """GQA: Reshape(Expand(Unsqueeze(kv, 2), [B, Hkv, rep, S, D]), [B, Hkv*rep, S, D]) -> kv."""
    reshape = graph.producer.get(name)
    if reshape is None or reshape.op_type != "Reshape":
        return name
    expand = graph.producer.get(reshape.input[0])
    if expand is None or expand.op_type != "Expand":
        return name
    unsqueeze = graph.producer.get(expand.input[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return name
    axes = graph.const(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else np.array(_attrs(unsqueeze).get("axes", []))
    source, out = unsqueeze.input[0], graph.dims(name)
    src = graph.dims(source)
    if axes is None or list(np.asarray(axes).reshape(-1)) != [2] or src is None or out is None:
        return name
    # Repeated heads are interleaved: head h reads kv head h // rep (what the kernel indexes).
    if len(src) == 4 and len(out) == 4 and src[0] == out[0] and src[2:] == out[2:]:
        if isinstance(src[1], int) and isinstance(out[1], int) and out[1] % src[1] == 0:
            return source
    return name


# --------------------------------------------------------------------------- driver


def _candidate_kind(node) -> str | None:
    """Where an attention may be: ONNX Attention, com.microsoft MultiHeadAttention and Attention,
    ONNX Softmax."""
    onnx_domain = node.domain in ("", "ai.onnx")
    if node.op_type in ("Attention", "Softmax") and onnx_domain:
        return node.op_type
    if node.op_type in ("MultiHeadAttention", "Attention", "GroupQueryAttention") and node.domain == "com.microsoft":
        return f"com.microsoft.{node.op_type}"
    return None


def rewrite_attention(model: onnx.ModelProto, strategy: str = "auto", algorithm: str = "auto"):
    """Replace every recognised attention by an AttentionSite.

    Returns (model, sites, not_attention): the sites (fused, or an Attention/MultiHeadAttention
    node that could not be, with the reason) and, for each Softmax that is not the softmax of an
    attention, why (`inspect` shows it with the softmax site).
    """
    if strategy not in STRATEGY_CHOICES:
        from ..errors import TvmSoftmaxError

        raise TvmSoftmaxError(f"unknown attention strategy {strategy!r}: expected one of {', '.join(STRATEGY_CHOICES)}")
    opset = default_opset(model)
    if not any(_candidate_kind(n) for n in model.graph.node):
        return model, [], {}
    model = copy.deepcopy(model)
    graph = _Graph(model)
    sites: list[AttentionSite] = []
    not_attention: dict[str, str] = {}
    for node in model.graph.node:
        kind = _candidate_kind(node)
        if kind is None or id(node) in graph.removed:
            continue
        form = {"Attention": f"ONNX Attention-{opset}", "Softmax": "decomposed MatMul-Softmax-MatMul"}.get(kind, kind)
        site = AttentionSite(id=f"attention{len(sites)}", node=node.name, form=form, requested=strategy)
        site.attributes["algorithm"] = algorithm
        mark = len(graph.new_nodes)
        try:
            if strategy == "none":
                raise NoMatch("attention fusion is off (--attention none)")
            if kind == "Attention":
                _rewrite_onnx_attention(graph, node, site, opset)
                graph.removed.add(id(node))
                site.nodes = [node.name]
            elif kind.startswith("com.microsoft."):
                rewrite = {"MultiHeadAttention": _rewrite_mha, "GroupQueryAttention": _rewrite_gqa}.get(
                    kind.split(".")[-1], _rewrite_ms_attention)
                rewrite(graph, node, site)
                graph.removed.add(id(node))
                site.nodes = [node.name]
            else:
                _rewrite_decomposed(graph, node, site, opset)
        except NoMatch as why:
            del graph.new_nodes[mark:]
            if kind == "Softmax":
                not_attention[node.name] = str(why)
                continue
            site.rewritten, site.reason = False, str(why)
            if kind == "Attention":
                _plan_function_body(graph, node, site, opset)
        sites.append(site)
    if not any(s.rewritten for s in sites):
        return model, sites, not_attention
    _splice(model, graph)
    return model, sites, not_attention


FUNCTION_BODY = "onnx-function-body"


def _plan_function_body(graph: _Graph, node, site: AttentionSite, opset: int) -> None:
    """An ONNX Attention we do not fuse is to become the spec's own function body (plain ops
    that TVM imports; its Softmax becomes one of our sites): slower than fused, but it compiles
    and computes what the spec defines (`function_body.expand_nodes`, before normalisation, so the
    body's shape subgraphs fold). Left as is (and refused later) if onnx has no body for it."""
    from .function_body import NoFunctionBody, expand

    try:
        body = expand(node, opset, [graph.infos[i].type if i in graph.infos else None for i in node.input])
    except NoFunctionBody as why:
        site.reason += f"; no ONNX function body to fall back to: {why}"
        return
    site.nodes = [node.name]
    site.lowered = {"strategy": FUNCTION_BODY, "nodes": len(body)}


def _splice(model: onnx.ModelProto, graph: _Graph) -> None:
    """Put the new nodes where the removed ones were (topological order), then drop dead nodes."""
    kept = [n for n in model.graph.node if id(n) not in graph.removed]
    nodes = _toposort(kept + graph.new_nodes, model)
    live = {o.name for o in model.graph.output}
    alive = []
    for node in reversed(nodes):
        if any(o in live for o in node.output if o):
            alive.append(node)
            live.update(node_reads(node))
    del model.graph.node[:]
    model.graph.node.extend(reversed(alive))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def _toposort(nodes: list, model: onnx.ModelProto) -> list:
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, order = list(nodes), []
    while pending:
        progress = []
        for node in pending:
            if all(i in ready for i in node_reads(node)):
                order.append(node)
                ready.update(node.output)
            else:
                progress.append(node)
        if len(progress) == len(pending):
            missing = sorted({i for n in progress for i in node_reads(n) if i not in ready})[:3]
            raise RuntimeError(f"attention rewrite left an unordered graph (missing {missing})")
        pending = progress
    return order
