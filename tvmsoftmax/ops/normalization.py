"""Normalisations as pure TE compute."""

from __future__ import annotations

import tvm
from tvm import te

from .reduction import reduce


def layer_norm(x: te.Tensor, gamma: te.Tensor, beta: te.Tensor, axes, epsilon: float, center: bool,
               scale: bool) -> te.Tensor:
    """Layer normalisation in two passes: the mean, then the mean of squared deviations from it,
    y = (x - mean) / sqrt(var + epsilon) * gamma + beta (onnxruntime's order of operations), both
    sums accumulated in float64. TVM's legalization sums in the input type and takes
    var = E[x^2] - E[x]^2: a row of 768 values around 1000 came out 1e-3 off (the float32 sum's
    rounding errors, then the cancellation), around 10 1e-5, where onnxruntime is 3e-5 / 8e-7 off."""
    ndim = len(x.shape)
    axes = sorted({int(a) % ndim for a in axes})
    count = 1
    for d in axes:
        count = count * x.shape[d]
    wide = "float64"  # the sums: one rounding error per term in float32 is what remained (above)
    count = tvm.tirx.Cast(wide, count)
    total = reduce(x, axes, True, lambda idx, k: te.sum(x(*idx).astype(wide), axis=k), name="sum")
    mean = te.compute(total.shape, lambda *i: (total(*i) / count).astype(x.dtype), name="mean")

    def kept(idx):
        return [0 if d in axes else idx[d] for d in range(ndim)]

    def deviation(idx):
        return (x(*idx) - mean(*kept(idx))).astype(wide)

    squares = reduce(x, axes, True, lambda idx, k: te.sum(deviation(idx) * deviation(idx), axis=k), name="squares")
    std = te.compute(
        squares.shape,
        lambda *i: tvm.tirx.sqrt((squares(*i) / count).astype(x.dtype) + tvm.tirx.const(epsilon, x.dtype)),
        name="std",
    )

    def normalized(*idx):
        value = (x(*idx) - mean(*kept(idx))) / std(*kept(idx))
        inner = [idx[d] for d in axes]
        if scale:
            value = value * gamma(*inner)
        if center:
            value = value + beta(*inner)
        return value

    return te.compute(x.shape, normalized, name="layer_norm")
