"""Key/value cache append as onnxruntime's GroupQueryAttention writes it (pure TE compute).

``present[b, h, j] = past[b, h, j]            for j < past_length[b]
                   = new[b, h, j - past_length[b]]  for past_length[b] <= j < past_length[b] + S
                   = 0                          after``

over P + S rows or as many as asked (P: the past buffer's length, S: the new tokens): each batch
keeps its own valid past rows and appends its new ones right after them (a ragged batch
right-padded in one buffer).
One pass over the cache; `lowering.attention` builds the GroupQueryAttention site on it.
"""

from __future__ import annotations

from tvm import te, tirx


def append_kv(past: te.Tensor, new: te.Tensor, past_lengths: te.Tensor, rows=None) -> te.Tensor:
    """past [B, H, P, D], new [B, H, S, D], past_lengths [B] (int64) -> [B, H, rows, D]; rows
    (P + S when not given) may be shorter (what a batch's rows past it would hold is dropped) or
    longer (zeros)."""
    batch, heads, buffer, depth = past.shape
    tokens = new.shape[2]
    rows = buffer + tokens if rows is None else rows
    zero = tirx.const(0, past.dtype)

    def row(b, h, j, d):
        position, length = j.astype("int64"), past_lengths[b].astype("int64")
        shifted = position - length
        # if_then_else evaluates only the branch it takes, and each condition keeps its index
        # inside its tensor even for a past length out of range (longer than the buffer)
        return tirx.if_then_else(
            tirx.all(position < length, j < buffer), past[b, h, j, d],
            tirx.if_then_else(tirx.all(shifted >= 0, shifted < tokens), new[b, h, shifted, d], zero))

    return te.compute((batch, heads, rows, depth), row, name="kv_append")
