"""Reductions over a set of axes as pure TE compute, with IEEE identities for max and min.

TVM's `relax.max` / `relax.min` legalize with reducers that start from the lowest / highest
*finite* value, so the max of a row of -inf is -FLT_MAX; ONNX (and onnxruntime) give -inf. The
max and min here are IEEE's: from -inf / +inf, NaN propagating. They reduce order-preserving
integer keys of the floats (`order_key`) with TVM's own integer max/min, which its rfactor knows:
the schedules can then sum a row in vector lanes (a float max from -inf is a reducer rfactor does
not know, and stayed one serial chain: ReduceMax over [197, 3072] 8x onnxruntime's time).
"""

from __future__ import annotations

import tvm
from tvm import te

from .classify import LAYOUT, is_nan


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


def order_key(bits: tvm.tirx.PrimExpr, dtype: str) -> tvm.tirx.PrimExpr:
    """The `dtype` float whose bits (as the same-width integer) are `bits`, as an integer in the
    floats' order (-inf < ... < -0 < +0 < ... < +inf): negative floats have their magnitude bits
    (classify's mask) flipped, the sign shifted across them. Its own inverse."""
    integer, magnitude, _ = LAYOUT[dtype]
    sign = tvm.tirx.shift_right(bits, int(integer[3:]) - 1)  # all ones for a negative float
    return tvm.tirx.bitwise_xor(bits, tvm.tirx.bitwise_and(sign, tvm.tirx.const(magnitude, integer)))


def _keyed_extreme(x: te.Tensor, axes, keepdims: bool, largest: bool, name: str) -> te.Tensor:
    """Max (largest) or min over `axes` from the floats' keys: NaN keyed past every number (it
    propagates, whatever its sign and payload), the integer reduction's identity (an empty axis)
    read back as -inf (max) / +inf (min)."""
    dtype = str(x.dtype)
    integer = LAYOUT[dtype][0]
    # NaN's key wins the reduction; the identity's key is no float's (it would be a NaN's)
    nan_key = (tvm.tirx.max_value if largest else tvm.tirx.min_value)(integer)
    identity = (tvm.tirx.min_value if largest else tvm.tirx.max_value)(integer)
    combine = te.max if largest else te.min

    def key(*index):
        value = x(*index)
        return tvm.tirx.Select(is_nan(value), nan_key, order_key(tvm.tirx.reinterpret(integer, value), dtype))

    keys = reduce(x, axes, keepdims, lambda idx, k: combine(key(*idx), axis=k), name=f"{name}_key")
    empty = tvm.tirx.const(float("-inf") if largest else float("inf"), dtype)

    def value(*index):
        found = keys(*index)
        back = tvm.tirx.reinterpret(dtype, order_key(found, dtype))
        return tvm.tirx.Select(found == identity, empty, back)

    return te.compute(keys.shape, value, name=name)


def reduce_max(x: te.Tensor, axes, keepdims: bool) -> te.Tensor:
    """Max over `axes` from -inf (a row of -inf gives -inf; NaN anywhere gives NaN)."""
    if str(x.dtype) in LAYOUT:
        return _keyed_extreme(x, axes, keepdims, True, "reduce_max")
    return reduce(x, axes, keepdims, lambda idx, k: IEEE_MAX(x(*idx), axis=k), name="reduce_max")


def reduce_min(x: te.Tensor, axes, keepdims: bool) -> te.Tensor:
    """Min over `axes` from +inf (NaN anywhere gives NaN)."""
    if str(x.dtype) in LAYOUT:
        return _keyed_extreme(x, axes, keepdims, False, "reduce_min")
    return reduce(x, axes, keepdims, lambda idx, k: IEEE_MIN(x(*idx), axis=k), name="reduce_min")
