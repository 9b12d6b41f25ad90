"""Small, seeded ONNX transformers that reproduce the graph shapes torch exporters emit.

Families: BERT-style encoder (padding mask), GPT-2-style decoder (causal), Llama-style decoder
(GQA, rotary, RMSNorm), ViT encoder (no mask). ``exporter`` picks the form:

* ``"torchscript"`` (``torch.onnx.export(dynamo=False)``, opset 17): BERT and Llama use the SDPA
  form (Q and K^T each multiplied by d^-1/4 before the MatMul, additive mask, Softmax, then the
  ``Where(IsNaN(p), 0, p)`` guard); GPT-2 uses the eager form (MatMul, Div by sqrt(d)).
* ``"dynamo"`` (``dynamo=True``, opset 18): eager form (MatMul then Mul by 1/sqrt(d)); the mask is
  expanded to [batch, 1, S, S].

In both, sizes are computed at run time from Shape/Gather/Concat/Range/Expand subgraphs, causal
masks come from Range + LessOrEqual + Where with the dtype's lowest value, GQA repeats key/value
heads with Unsqueeze/Expand/Reshape, and input dims are symbolic (``batch``, ``sequence``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LOWEST = float(np.finfo(np.float32).min)
EXPORTERS = ("torchscript", "dynamo")


class _Graph:
    """A tiny graph builder: unique names, initializers from numpy, seeded weights."""

    def __init__(self, seed: int, opset: int):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype=np.float32, hint="const") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, *shape, scale=0.05, hint="w") -> str:
        return self.const(self.rng.standard_normal(shape) * scale, hint=hint)

    def op(self, op_type: str, inputs, n_out: int = 1, hint: str | None = None, **attrs):
        base = self.name(hint or op_type)
        outs = [f"{base}_out{i}" if n_out > 1 else base for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, **attrs))
        return outs if n_out > 1 else outs[0]

    # -- shape helpers, the way exporters write them ---------------------------------------------
    def dim(self, x: str, index: int) -> str:
        """Shape(x)[index] as a 1-D int64 tensor."""
        shape = self.op("Shape", [x])
        return self.op("Gather", [shape, self.const([index], np.int64)], axis=0)

    def linear(self, x: str, fan_in: int, fan_out: int, bias: bool = True) -> str:
        y = self.op("MatMul", [x, self.weight(fan_in, fan_out)])
        return self.op("Add", [y, self.weight(fan_out, scale=0.02)]) if bias else y

    def layer_norm(self, x: str, width: int) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.const(1 + 0.1 * self.rng.standard_normal(width)), self.weight(width, scale=0.02)],
            axis=-1,
            epsilon=1e-5,
        )

    def rms_norm(self, x: str, width: int) -> str:
        squared = self.op("Pow", [x, self.const(2.0)])
        if self.opset >= 18:  # axes became an input in opset 18
            mean = self.op("ReduceMean", [squared, self.const([-1], np.int64)], keepdims=1)
        else:
            mean = self.op("ReduceMean", [squared], axes=[-1], keepdims=1)
        root = self.op("Sqrt", [self.op("Add", [mean, self.const(1e-6)])])
        normed = self.op("Mul", [x, self.op("Reciprocal", [root])])
        return self.op("Mul", [normed, self.const(1 + 0.1 * self.rng.standard_normal(width))])

    def gelu(self, x: str) -> str:
        erf = self.op("Erf", [self.op("Div", [x, self.const(np.sqrt(2.0))])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, self.const(1.0)])]), self.const(0.5)])

    def split_heads(self, x: str, batch: str, seq: str, heads: int, head_dim: int) -> str:
        """[B, S, H*D] -> [B, H, S, D] with a run-time Reshape target (Concat of Shape pieces)."""
        target = self.op(
            "Concat", [batch, seq, self.const([heads], np.int64), self.const([head_dim], np.int64)], axis=0
        )
        return self.op("Transpose", [self.op("Reshape", [x, target])], perm=[0, 2, 1, 3])

    def merge_heads(self, x: str, batch: str, seq: str, width: int) -> str:
        merged = self.op("Transpose", [x], perm=[0, 2, 1, 3])
        target = self.op("Concat", [batch, seq, self.const([width], np.int64)], axis=0)
        return self.op("Reshape", [merged, target])

    def repeat_kv(self, x: str, batch: str, seq: str, kv_heads: int, groups: int, head_dim: int) -> str:
        """GQA: [B, Hkv, S, D] -> [B, Hkv*groups, S, D] via Unsqueeze/Expand/Reshape."""
        if groups == 1:
            return x
        unsq = self.op("Unsqueeze", [x, self.const([2], np.int64)])
        shape5 = self.op(
            "Concat",
            [batch, self.const([kv_heads, groups], np.int64), seq, self.const([head_dim], np.int64)],
            axis=0,
        )
        expanded = self.op("Expand", [unsq, shape5])
        shape4 = self.op(
            "Concat", [batch, self.const([kv_heads * groups], np.int64), seq, self.const([head_dim], np.int64)],
            axis=0,
        )
        return self.op("Reshape", [expanded, shape4])

    def attention(self, q, k, v, mask, head_dim: int, form: str) -> str:
        """Scores -> Softmax -> P@V in the exporter's form; `mask` is additive or None."""
        if form == "sdpa":
            quarter = self.const(head_dim ** -0.25)
            kt = self.op("Transpose", [k], perm=[0, 1, 3, 2])
            scores = self.op("MatMul", [self.op("Mul", [q, quarter]), self.op("Mul", [kt, quarter])])
        else:
            kt = self.op("Transpose", [k], perm=[0, 1, 3, 2])
            scores = self.op("MatMul", [q, kt])
            if form == "eager-div":
                scores = self.op("Div", [scores, self.const(np.sqrt(head_dim))])
            else:
                scores = self.op("Mul", [scores, self.const(1.0 / np.sqrt(head_dim))])
        if mask is not None:
            scores = self.op("Add", [scores, mask])
        probs = self.op("Softmax", [scores], axis=-1)
        if form == "sdpa":
            probs = self.op("Where", [self.op("IsNaN", [probs]), self.const(0.0), probs])
        return self.op("MatMul", [probs, v])

    # -- masks ------------------------------------------------------------------------------------
    def padding_mask(self, attention_mask: str, batch: str, seq: str, expand: bool) -> str:
        """(1 - mask) * lowest as [B, 1, 1, S] (or expanded to [B, 1, S, S])."""
        m = self.op("Cast", [self.op("Unsqueeze", [attention_mask, self.const([1, 2], np.int64)])], to=TensorProto.FLOAT)
        additive = self.op("Mul", [self.op("Sub", [self.const(1.0), m]), self.const(LOWEST)])
        if expand:
            target = self.op("Concat", [batch, self.const([1], np.int64), seq, seq], axis=0)
            additive = self.op("Expand", [additive, target])
        return additive

    def causal_mask(self, seq: str) -> str:
        """[1, 1, S, S]: 0 where j <= i, lowest elsewhere (Range + LessOrEqual + Where)."""
        length = self.op("Squeeze", [seq, self.const([0], np.int64)])
        steps = self.op("Range", [self.const(0, np.int64), length, self.const(1, np.int64)])
        rows = self.op("Unsqueeze", [steps, self.const([1], np.int64)])
        cols = self.op("Unsqueeze", [steps, self.const([0], np.int64)])
        allowed = self.op("LessOrEqual", [cols, rows])
        mask = self.op("Where", [allowed, self.const(0.0), self.const(LOWEST)])
        return self.op("Unsqueeze", [mask, self.const([0, 1], np.int64)])

    def model(self, inputs, outputs, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="tvmsoftmax.models")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")


def _opset(exporter: str) -> int:
    return 18 if exporter == "dynamo" else 17


def _ids_inputs(with_mask: bool = True):
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
    return inputs


def bert(layers=2, hidden=64, heads=4, vocab=100, max_positions=64, seed=0, exporter="torchscript"):
    """BERT-style encoder with a padding mask; output last_hidden_state [batch, sequence, hidden]."""
    _check_exporter(exporter)
    g, head_dim = _Graph(seed, _opset(exporter)), hidden // heads
    batch, seq = g.dim("input_ids", 0), g.dim("input_ids", 1)
    words = g.op("Gather", [g.weight(vocab, hidden, scale=0.5), "input_ids"], axis=0)
    positions = g.op("Slice", [g.const(np.arange(max_positions)[None], np.int64), g.const([0], np.int64), seq, g.const([1], np.int64)])
    x = g.op("Add", [words, g.op("Gather", [g.weight(max_positions, hidden, scale=0.5), positions], axis=0)])
    x = g.layer_norm(x, hidden)
    mask = g.padding_mask("attention_mask", batch, seq, expand=exporter == "dynamo")
    form = "sdpa" if exporter == "torchscript" else "eager-mul"
    for _ in range(layers):
        q, k, v = (g.split_heads(g.linear(x, hidden, hidden), batch, seq, heads, head_dim) for _ in range(3))
        context = g.merge_heads(g.attention(q, k, v, mask, head_dim, form), batch, seq, hidden)
        x = g.layer_norm(g.op("Add", [x, g.linear(context, hidden, hidden)]), hidden)
        ffn = g.linear(g.gelu(g.linear(x, hidden, 4 * hidden)), 4 * hidden, hidden)
        x = g.layer_norm(g.op("Add", [x, ffn]), hidden)
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    return g.model(_ids_inputs(), [out], "bert")


def gpt2(layers=2, hidden=64, heads=4, vocab=100, max_positions=64, seed=0, exporter="torchscript"):
    """GPT-2-style causal decoder (fused QKV, causal + padding mask); output logits."""
    _check_exporter(exporter)
    g, head_dim = _Graph(seed, _opset(exporter)), hidden // heads
    batch, seq = g.dim("input_ids", 0), g.dim("input_ids", 1)
    words = g.op("Gather", [g.weight(vocab, hidden, scale=0.5), "input_ids"], axis=0)
    length = g.op("Squeeze", [seq, g.const([0], np.int64)])
    positions = g.op("Range", [g.const(0, np.int64), length, g.const(1, np.int64)])
    x = g.op("Add", [words, g.op("Gather", [g.weight(max_positions, hidden, scale=0.5), positions], axis=0)])
    mask = g.op("Add", [g.causal_mask(seq), g.padding_mask("attention_mask", batch, seq, expand=False)])
    # lowest + lowest = -inf on padded causal positions, as in real exports; rows keep one 0.
    form = "eager-div" if exporter == "torchscript" else "eager-mul"
    for _ in range(layers):
        qkv = g.linear(g.layer_norm(x, hidden), hidden, 3 * hidden)
        parts = g.op("Split", [qkv, g.const([hidden] * 3, np.int64)], n_out=3, axis=-1)
        q, k, v = (g.split_heads(p, batch, seq, heads, head_dim) for p in parts)
        context = g.merge_heads(g.attention(q, k, v, mask, head_dim, form), batch, seq, hidden)
        x = g.op("Add", [x, g.linear(context, hidden, hidden)])
        x = g.op("Add", [x, g.linear(g.gelu(g.linear(g.layer_norm(x, hidden), hidden, 4 * hidden)), 4 * hidden, hidden)])
    logits = g.op("MatMul", [g.layer_norm(x, hidden), g.weight(hidden, vocab)])
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])
    return g.model(_ids_inputs(), [out], "gpt2")


def llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=100, max_positions=64, seed=0, exporter="torchscript"):
    """Llama-style decoder: RMSNorm, rotary embeddings, GQA (Unsqueeze/Expand/Reshape), SiLU MLP."""
    _check_exporter(exporter)
    g, head_dim = _Graph(seed, _opset(exporter)), hidden // heads
    groups = heads // kv_heads
    batch, seq = g.dim("input_ids", 0), g.dim("input_ids", 1)
    x = g.op("Gather", [g.weight(vocab, hidden, scale=0.5), "input_ids"], axis=0)
    length = g.op("Squeeze", [seq, g.const([0], np.int64)])
    positions = g.op("Range", [g.const(0, np.int64), length, g.const(1, np.int64)])
    inv_freq = 1.0 / (10000 ** (np.arange(0, head_dim, 2) / head_dim))
    angles = np.outer(np.arange(max_positions), inv_freq)
    table = np.concatenate([angles, angles], axis=-1)
    cos = g.op("Unsqueeze", [g.op("Gather", [g.const(np.cos(table)), positions], axis=0), g.const([0, 1], np.int64)])
    sin = g.op("Unsqueeze", [g.op("Gather", [g.const(np.sin(table)), positions], axis=0), g.const([0, 1], np.int64)])
    half = head_dim // 2

    def rotary(t):
        first = g.op("Slice", [t, g.const([0], np.int64), g.const([half], np.int64), g.const([-1], np.int64)])
        second = g.op("Slice", [t, g.const([half], np.int64), g.const([head_dim], np.int64), g.const([-1], np.int64)])
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rotated, sin])])

    mask = g.op("Add", [g.causal_mask(seq), g.padding_mask("attention_mask", batch, seq, expand=exporter == "dynamo")])
    form = "sdpa" if exporter == "torchscript" else "eager-mul"
    for _ in range(layers):
        normed = g.rms_norm(x, hidden)
        q = rotary(g.split_heads(g.linear(normed, hidden, hidden, bias=False), batch, seq, heads, head_dim))
        k = rotary(g.split_heads(g.linear(normed, hidden, kv_heads * head_dim, bias=False), batch, seq, kv_heads, head_dim))
        v = g.split_heads(g.linear(normed, hidden, kv_heads * head_dim, bias=False), batch, seq, kv_heads, head_dim)
        k = g.repeat_kv(k, batch, seq, kv_heads, groups, head_dim)
        v = g.repeat_kv(v, batch, seq, kv_heads, groups, head_dim)
        context = g.merge_heads(g.attention(q, k, v, mask, head_dim, form), batch, seq, hidden)
        x = g.op("Add", [x, g.linear(context, hidden, hidden, bias=False)])
        normed = g.rms_norm(x, hidden)
        gate = g.linear(normed, hidden, 2 * hidden, bias=False)
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        up = g.linear(normed, hidden, 2 * hidden, bias=False)
        x = g.op("Add", [x, g.linear(g.op("Mul", [silu, up]), 2 * hidden, hidden, bias=False)])
    logits = g.op("MatMul", [g.rms_norm(x, hidden), g.weight(hidden, vocab)])
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])
    return g.model(_ids_inputs(), [out], "llama")


def vit(layers=2, hidden=64, heads=4, image=32, patch=8, channels=3, classes=10, seed=0, exporter="torchscript"):
    """ViT encoder: Conv patch embedding, class token, no mask (MatMul -> Mul -> Softmax)."""
    _check_exporter(exporter)
    g, head_dim = _Graph(seed, _opset(exporter)), hidden // heads
    patches = (image // patch) ** 2
    conv = g.op("Conv", ["pixel_values", g.weight(hidden, channels, patch, patch), g.weight(hidden, scale=0.02)],
                kernel_shape=[patch, patch], strides=[patch, patch])
    batch = g.dim("pixel_values", 0)
    flat = g.op("Reshape", [conv, g.op("Concat", [batch, g.const([hidden, patches], np.int64)], axis=0)])
    tokens = g.op("Transpose", [flat], perm=[0, 2, 1])
    cls = g.op("Expand", [g.weight(1, 1, hidden, scale=0.5), g.op("Concat", [batch, g.const([1, hidden], np.int64)], axis=0)])
    x = g.op("Add", [g.op("Concat", [cls, tokens], axis=1), g.weight(1, patches + 1, hidden, scale=0.5)])
    seq = g.const([patches + 1], np.int64)
    for _ in range(layers):
        normed = g.layer_norm(x, hidden)
        q, k, v = (g.split_heads(g.linear(normed, hidden, hidden), batch, seq, heads, head_dim) for _ in range(3))
        context = g.merge_heads(g.attention(q, k, v, None, head_dim, "eager-mul"), batch, seq, hidden)
        x = g.op("Add", [x, g.linear(context, hidden, hidden)])
        x = g.op("Add", [x, g.linear(g.gelu(g.linear(g.layer_norm(x, hidden), hidden, 4 * hidden)), 4 * hidden, hidden)])
    first = g.op("Gather", [g.layer_norm(x, hidden), g.const(0, np.int64)], axis=1)
    logits = g.linear(first, hidden, classes)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", channels, image, image])]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    return g.model(inputs, [out], "vit")


FAMILIES = {"bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit}


def build(family: str, **kwargs) -> onnx.ModelProto:
    """Build a family by name ("bert", "gpt2", "llama", "vit")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family](**kwargs)
