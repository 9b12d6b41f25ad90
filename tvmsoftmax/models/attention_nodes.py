"""Single attention nodes with a KV cache, as exporters emit them: onnxruntime's com.microsoft
GroupQueryAttention and ONNX Attention-23 (for the tests against onnxruntime, the decode
benchmark and the GPU bundle)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def group_query_attention(b, s, past, heads, kv_heads, d, *, packed=False, rotary=None, attrs=None,
                          dtype=TensorProto.FLOAT, symbolic=False, max_positions=64):
    """A GroupQueryAttention node as onnxruntime's LLM exporters emit it (3-D Q/K/V or packed QKV,
    BNSH past/present, seqlens_k, total_sequence_length, optional cos/sin caches of
    `max_positions` rows). b, s, past: batch, new tokens, past buffer length (None: no past
    inputs); symbolic: those as named dims; rotary: (half of the rotated width, interleaved)."""
    bd, sd, pd = ("batch", "sequence", "past") if symbolic else (b, s, past)
    width = (heads + 2 * kv_heads) * d if packed else heads * d
    inputs = [helper.make_tensor_value_info("query", dtype, [bd, sd, width])]
    names = ["query", "", ""]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, dtype, [bd, sd, kv_heads * d]) for n in ("key", "value")]
        names[1:] = ["key", "value"]
    if past is not None:
        inputs += [helper.make_tensor_value_info(n, dtype, [bd, kv_heads, pd, d]) for n in ("past_key", "past_value")]
    names += ["past_key", "past_value"] if past is not None else ["", ""]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [bd]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    names += ["seqlens_k", "total_sequence_length"]
    initializers, attrs = [], dict(attrs or {})
    if rotary:
        half, interleaved = rotary
        np_type = helper.tensor_dtype_to_np_dtype(dtype)
        angles = np.arange(max_positions)[:, None] * 10000.0 ** (-np.arange(half) / half)[None]
        initializers = [numpy_helper.from_array(np.cos(angles).astype(np_type), "cos_cache"),
                        numpy_helper.from_array(np.sin(angles).astype(np_type), "sin_cache")]
        names += ["cos_cache", "sin_cache"]
        attrs.update(do_rotary=1, rotary_interleaved=int(interleaved))
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, **attrs)
    outputs = [helper.make_tensor_value_info("output", dtype, [bd, sd, heads * d])] + [
        helper.make_tensor_value_info(n, dtype, [bd, kv_heads, "present", d]) for n in ("present_key", "present_value")]
    graph = helper.make_graph([node], "gqa", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def gqa_feeds(rng, b, s, past, heads, kv_heads, d, seqlens, total, packed=False, dtype="float32"):
    """Random inputs of `group_query_attention` (seqlens_k: each batch's valid length - 1)."""
    feeds = {}
    if packed:
        feeds["query"] = rng.standard_normal((b, s, (heads + 2 * kv_heads) * d))
    else:
        feeds.update(query=rng.standard_normal((b, s, heads * d)), key=rng.standard_normal((b, s, kv_heads * d)),
                     value=rng.standard_normal((b, s, kv_heads * d)))
    if past is not None:
        feeds.update(past_key=rng.standard_normal((b, kv_heads, past, d)), past_value=rng.standard_normal((b, kv_heads, past, d)))
    feeds = {k: v.astype(dtype) for k, v in feeds.items()}
    feeds.update(seqlens_k=np.array(seqlens, np.int32), total_sequence_length=np.array(total, np.int32))
    return feeds


def attention23_with_cache(b, s, past, heads, kv_heads, d, *, symbolic=False, dtype=TensorProto.FLOAT):
    """ONNX Attention-23, causal, 4-D Q [B, heads, S, D] and K/V [B, kv_heads, S, D] with
    past_key/past_value [B, kv_heads, past, D] -> Y and present_key/present_value (the cache
    concatenated with the new keys). symbolic: S and past as named dims."""
    sd, pd = ("sequence", "past") if symbolic else (s, past)
    inputs = [helper.make_tensor_value_info("Q", dtype, [b, heads, sd, d])]
    inputs += [helper.make_tensor_value_info(n, dtype, [b, kv_heads, sd, d]) for n in ("K", "V")]
    inputs += [helper.make_tensor_value_info(n, dtype, [b, kv_heads, pd, d]) for n in ("past_key", "past_value")]
    outputs = [helper.make_tensor_value_info("Y", dtype, [b, heads, sd, d])] + [
        helper.make_tensor_value_info(n, dtype, [b, kv_heads, "present", d]) for n in ("present_key", "present_value")]
    node = helper.make_node("Attention", ["Q", "K", "V", "", "past_key", "past_value"], ["Y", "present_key", "present_value"],
                            is_causal=1)
    graph = helper.make_graph([node], "attention23_with_cache", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def attention23_feeds(rng, b, s, past, heads, kv_heads, d, dtype="float32"):
    """Random inputs of `attention23_with_cache`."""
    shapes = {"Q": (b, heads, s, d), "K": (b, kv_heads, s, d), "V": (b, kv_heads, s, d),
              "past_key": (b, kv_heads, past, d), "past_value": (b, kv_heads, past, d)}
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}
