"""Reductions over a set of axes as pure TE compute, with IEEE identities for max and min.

TVM's `relax.max` / `relax.min` legalize with reducers that start from the lowest / highest
*finite* value, so the max of a row of -inf is -FLT_MAX; ONNX (and onnxruntime) give -inf. These
reducers start from -inf / +inf.
"""

from __future__ import annotations

import tvm
from tvm import te


def reduce(x: te.Tensor, axes, keepdims: bool, reducer, name: str = "reduce") -> te.Tensor:
    """x reduced over `axes` (None: all) by `reducer(index, reduce_axes)`, which returns the
    reduction of one output element (e.g. ``te.sum(x(*index), axis=reduce_axes)``); size-1 dims
    kept if asked."""
    ndim = len(x.shape)
    axes = sorted({int(a) % ndim for a in axes} if axes is not None else range(ndim))
    kept = [d for d in range(ndim) if d not in axes]
    out_shape = [1 if d in axes else x.shape[d] for d in range(ndim)] if keepdims else [x.shape[d] for d in kept]

    def compute(*index):
        reduce_axes = [te.reduce_axis((0, x.shape[d]), name=f"k{d}") for d in axes]
        by_dim = dict(zip(axes, reduce_axes))
        outer = iter(index[d] for d in kept) if keepdims else iter(index)
        return reducer([by_dim[d] if d in by_dim else next(outer) for d in range(ndim)], reduce_axes)

    return te.compute(out_shape, compute, name=name)


def _ieee_reducer(name: str, combine, identity: float):
    return te.comm_reducer(combine, lambda dtype: tvm.tirx.const(identity, dtype), name=name)


IEEE_MAX = _ieee_reducer("ieee_max", lambda a, b: tvm.tirx.max(a, b), float("-inf"))
IEEE_MIN = _ieee_reducer("ieee_min", lambda a, b: tvm.tirx.min(a, b), float("inf"))


def reduce_max(x: te.Tensor, axes, keepdims: bool) -> te.Tensor:
    """Max over `axes` from -inf (a row of -inf gives -inf; NaN as `tirx.max` propagates it)."""
    return reduce(x, axes, keepdims, lambda idx, k: IEEE_MAX(x(*idx), axis=k), name="reduce_max")


def reduce_min(x: te.Tensor, axes, keepdims: bool) -> te.Tensor:
    """Min over `axes` from +inf."""
    return reduce(x, axes, keepdims, lambda idx, k: IEEE_MIN(x(*idx), axis=k), name="reduce_min")
