"""float64 NumPy reference of the canonical attention op (see tvmsoftmax.ops.attention)."""
import numpy as np
def reference(q, k, v, spec, bias=None, keep=None, kv_lengths=None, sink=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, H, Sq, D = q.shape; Skv = k.shape[2]; g = spec.group
    k = np.repeat(k, g, axis=1); v = np.repeat(v, g, axis=1)
    s = q @ k.transpose(0,1,3,2) * spec.scale
    if spec.softcap > 0: s = spec.softcap*np.tanh(s/spec.softcap)
    if keep is not None: s = np.where(keep, s, spec.fill)
    if bias is not None:  # added in float32, as the graphs do (-1e9 + score rounds to -1e9)
        s = (s.astype(np.float32) + bias.astype(np.float32)).astype(np.float64)
    kvl = np.full(B, Skv) if kv_lengths is None else np.minimum(kv_lengths, Skv)
    j = np.arange(Skv)[None, None, None, :]; i = np.arange(Sq)[None, None, :, None]
    allowed = j < kvl[:, None, None, None]
    if spec.causal:  # 1: top-left (offset 0), 2: bottom-right (offset kv_length - Sq)
        offset = kvl[:, None, None, None] - Sq if spec.causal == 2 else 0
        allowed = allowed & (j <= i + offset)
    s = np.where(allowed, s, -np.inf)
    if sink is not None:  # a last column per head that joins the softmax and has no value
        column = np.broadcast_to(np.asarray(sink, np.float64)[None, :, None, None], (B, H, Sq, 1))
        s = np.concatenate([s, column], -1)
        v = np.concatenate([v, np.zeros_like(v[:, :, :1])], 2)
    with np.errstate(all="ignore"):
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m); l = p.sum(-1, keepdims=True)
        y = (p / l) @ v
    if spec.empty_row == "zero_if_nan":
        y = np.where(np.isnan(p/l).any(-1, keepdims=True), 0, (np.where(np.isnan(p/l), 0, p/l)) @ v)
    if spec.empty_row == "zero_if_masked":
        mb = np.where(allowed, 0 if bias is None else bias.astype(np.float64), -np.inf).max(-1, keepdims=True)
        y = np.where(np.isneginf(mb), 0, y)
    return y
