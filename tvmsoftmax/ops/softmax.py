"""Softmax and LogSoftmax algorithms as pure TE compute (no scheduling here).

Every function takes a 3-D view ``x[outer, length, inner]`` and normalises along ``length``
(callers reshape: ONNX opset-13 ``axis`` gives outer = prod(dims before), inner = prod(dims
after); opsets 1/11 give inner = 1). float16/bfloat16 inputs are read as float32, accumulated in
float32 and the result is cast back.

The algorithms (memory accesses per element, reads + writes):

* ``three-pass``           max; exp stored and summed; scale the stored exp (5)
* ``three-pass-recompute`` max; sum of exp; recompute exp and scale (4)
* ``two-pass``             Dukhan & Ablavatski 2020: (mantissa, exponent) pairs summed with exact
                           power-of-two rescaling, no max pass; then scale (3)
* ``online``               Milakov & Gimelshein 2018: running (max, sum) pairs merged with the
                           associative operator; then scale (3)

Partial states. TVM's ``rfactor`` refuses custom tuple reducers, so the several accumulators the
papers use (one per vector lane, and one per thread for a row split across threads) are part of
the compute: element ``k = s * chunk + j * partials + lane`` of a row goes to partial state
``q = s * partials + lane``; the ``splits * partials`` states of a row and the few elements past the
last full step are merged with the same associative operator. ``partials`` and ``splits`` come from the schedule knobs
(``tvmsoftmax.schedules``); they change the summation order, not the result beyond rounding.

Edge values follow onnxruntime: an all -inf row gives NaN; +inf or NaN anywhere gives a NaN row;
[0, -inf] gives [1, 0]; rows of -FLT_MAX or -1e9 alone give a uniform distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tvm import te, tirx

from .exp import LN2_C1, LN2_C2, LN2_C3, SPLIT_LIMIT, exp_nonpositive, exp_split, pow2

ALGORITHMS = ("three-pass", "three-pass-recompute", "two-pass", "online")

FLT_LOWEST = -3.4028234663852886e38


@dataclass(frozen=True)
class Partitioning:
    """How a row is cut into partial states (set by the schedule knobs, see module docstring)."""

    partials: int = 1
    splits: int = 1
    # Fold the row's tail (the < states elements past the last full step) into the partial
    # states, element `body + q` into state q (a masked elementwise step after the reduction),
    # instead of merging it per row with the states: for rows split across blocks, whose per-row
    # merge is one thread, so the splits need not divide the row.
    ragged: bool = False

    @property
    def states(self) -> int:
        return self.partials * self.splits


def _f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def _load(x: te.Tensor, o, k, i) -> tirx.PrimExpr:
    value = x[o, k, i]
    return value if value.dtype == "float32" else value.astype("float32")


def _not_finite_to_nan(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """0 for a finite value, NaN for +-inf or NaN (added to poison a non-finite row).

    Not `value - value` (TVM's simplifier assumes no NaN and folds it to 0) and no `isnan` (folded
    to false in vectorised reductions): |v| < inf is false exactly for NaN and +-inf.
    """
    return tirx.Select(tirx.abs(value) < _f32(math.inf), _f32(0.0), _f32(math.nan))


class _RowReduction:
    """Index bookkeeping for partial states over the ``length`` axis of ``x[outer, length, inner]``.

    The row's first ``body = states * steps`` elements are reduced into the partial states with
    no masking and contiguous lanes (``steps = length // states``); the ``tail = length - body``
    (< states) remaining elements are merged, with the partial states, by the per-row merge (or,
    with ``Partitioning.ragged``, folded into the partial states by a masked elementwise step). So
    the hot loop has no bounds select or clamped index (those made LLVM scalarise the loads).
    """

    def __init__(self, x: te.Tensor, part: Partitioning):
        self.x = x
        self.outer, self.length, self.inner = x.shape
        self.part = part
        self.states = part.states
        self.steps = self.length // self.states  # j in [0, steps): full vector steps per state
        self.chunk = self.steps * part.partials  # elements of one split
        self.body = self.chunk * part.splits  # elements covered by the partial states
        self.tail = self.length - self.body  # < states elements, merged per row

    def element_index(self, state, j):
        q = self.part.partials
        return (state // q) * self.chunk + j * q + state % q

    def reduce(self, name: str, reducer: "_Reducer", value_of: Callable):
        """Partial states [outer, (splits,) partials, inner] -> tree -> merged state [outer, inner].

        value_of(loaded float32 value, o, i) -> tuple of reduction operands for one element.
        The partial states are halved by an elementwise tree (``p[r] + p[r + half]``, each level
        vectorisable; within each split, then across splits) down to one state, which the per-row
        merge combines with the tail.
        """
        outer, inner = self.outer, self.inner
        j = te.reduce_axis((0, self.steps), name=f"{name}_j")
        splits, width = self.part.splits, self.part.partials

        def state(o, s, q, i):
            return reducer.te(_single(value_of(_load(self.x, o, self.element_index(s * width + q, j), i), o, i)), axis=j)

        # A split row's states and tree levels are [outer, splits, width, inner] (a schedule can
        # finish a split where it computed it); otherwise [outer, width, inner].
        if splits == 1:
            partial = te.compute((outer, width, inner), lambda o, q, i: state(o, 0, q, i), name=f"{name}_partial")
            at = lambda p, o, s, r, i: p[o, r, i]  # noqa: E731 - state r of split s in level p
        else:
            partial = te.compute((outer, splits, width, inner), state, name=f"{name}_partial")
            at = lambda p, o, s, r, i: p[o, s, r, i]  # noqa: E731
        level = partial if isinstance(partial, (list, tuple)) else [partial]
        tail, folded = self.tail, False
        if self.part.ragged and not (isinstance(tail, tirx.IntImm) and int(tail) == 0):
            level, folded = self._fold_tail(name, reducer, value_of, level, at), True
        # Halving within each split first (a split's levels are [outer, splits, width, inner]).
        # A split's last states are merged by one reduction block into the split's state
        # ([outer, splits, inner]: one block, a schedule's anchor for the whole split), then the
        # split states are halved across splits.
        last = 2 if splits > 1 else 1
        while width > last and width % 2 == 0:
            half = width // 2
            halve = _halver(reducer, level, half, at)
            if splits == 1:
                shape, fcompute = (outer, half, inner), _one_split(halve)
                next_at = lambda p, o, s, r, i: p[o, r, i]  # noqa: E731
            else:
                shape, fcompute = (outer, splits, half, inner), halve
                next_at = lambda p, o, s, r, i: p[o, s, r, i]  # noqa: E731
            level, at, width = _level(f"{name}_tree{half}", shape, fcompute), next_at, half
        if splits > 1:
            t = te.reduce_axis((0, width), name=f"{name}_t")
            split_state = te.compute(
                (outer, splits, inner),
                lambda o, s, i: reducer.te(_single(tuple(at(p, o, s, t, i) for p in level)), axis=t),
                name=f"{name}_split_state",
            )
            level = list(split_state) if isinstance(split_state, (list, tuple)) else [split_state]
            at, width = (lambda p, o, s, r, i: p[o, r, i]), splits
            while width > 1 and width % 2 == 0:
                half = width // 2
                level = _level(f"{name}_splittree{half}", (outer, half, inner), _one_split(_halver(reducer, level, half, at)))
                width = half
        # A reduction over zero steps never runs its init in TIR: when the row is shorter than
        # the states (steps == 0) the partial states are not read at all.
        # (A folded tail has put every state's identity or element in place: all are read.)
        used = width if folded else tirx.min(self.steps, 1) * width
        r = te.reduce_axis((0, used + (0 if folded else tail)), name=f"{name}_q")

        def merged_operand(o, i):
            # r % width (== r where it is used) lets region analysis see all `width` states.
            from_partial = tuple(at(p, o, 0, tirx.floormod(r, width), i) for p in level)
            if folded or (isinstance(tail, tirx.IntImm) and int(tail) == 0):
                return from_partial
            k = tirx.min(self.body + tirx.max(r - used, 0), self.length - 1)
            from_tail = value_of(_load(self.x, o, k, i), o, i)
            # Select, not if_then_else: TVM 0.27 vectorises if_then_else in reductions wrongly.
            return tuple(tirx.Select(r < used, a, b) for a, b in zip(from_partial, from_tail))

        merged = te.compute(
            (outer, inner),
            lambda o, i: reducer.te(_single(merged_operand(o, i)), axis=r),
            name=f"{name}_state",
        )
        return merged if isinstance(merged, (list, tuple)) else [merged]


    def _fold_tail(self, name, reducer, value_of, level, at):
        """The partial states with tail element ``body + q`` merged into state q (q < tail; the
        others unchanged): an elementwise level of the partials' shape, so the reduction loop
        stays unmasked. A row shorter than the states (steps == 0) starts from the identity."""
        splits, width = self.part.splits, self.part.partials

        def fold(o, s, r, i):
            q = s * width + r
            k = self.body + q
            loaded = value_of(_load(self.x, o, tirx.min(k, self.length - 1), i), o, i)
            current = tuple(at(p, o, s, r, i) for p in level)
            identity = reducer.identity(*[p.dtype for p in level])
            current = tuple(tirx.Select(self.steps > 0, c, e) for c, e in zip(current, identity))
            merged = reducer.combine(current, loaded)
            return _single(tuple(tirx.Select(k < self.length, m, c) for m, c in zip(merged, current)))

        if splits == 1:
            return _level(f"{name}_fold", (self.outer, width, self.inner), _one_split(fold))
        return _level(f"{name}_fold", (self.outer, splits, width, self.inner), fold)


def _level(name: str, shape, fcompute) -> list:
    level = te.compute(shape, fcompute, name=name)
    return list(level) if isinstance(level, (list, tuple)) else [level]


def _one_split(halve):
    """fcompute(o, r, i) of a 3-D level from a halver's fcompute(o, s, r, i)."""
    return lambda o, r, i: halve(o, 0, r, i)


def _halver(reducer, level, half, at):
    """fcompute(o, s, r, i) of one tree level: state r of split s merged with state r + half
    (states read through at(tensor, o, s, r, i))."""

    def halve(o, s, r, i):
        return _single(
            reducer.combine(tuple(at(p, o, s, r, i) for p in level), tuple(at(p, o, s, r + half, i) for p in level))
        )

    return halve


def _single(values: tuple):
    """TE reducers take a bare expression for one operand and a tuple for several."""
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class _Reducer:
    """An associative merge: `combine` on tuples of expressions, and the TE reducer built from it."""

    combine: Callable  # (tuple, tuple) -> tuple
    identity: Callable  # (*dtypes) -> tuple
    name: str

    @property
    def te(self):
        if len(self.identity("float32")) == 1:
            return te.comm_reducer(
                lambda a, b: self.combine((a,), (b,))[0], lambda t: self.identity(t)[0], name=self.name
            )
        return te.comm_reducer(self.combine, self.identity, name=self.name)


# The standard reducers (TVM knows them, so schedules may also rfactor these reductions).
_sum_reducer = _Reducer(lambda a, b: (a[0] + b[0],), lambda *t: (tirx.const(0, t[0]),), "sum")
_max_reducer = _Reducer(lambda a, b: (tirx.max(a[0], b[0]),), lambda *t: (tirx.min_value(t[0]),), "max")


def _online_reducer():
    """(max, sum) merge of Milakov & Gimelshein with one exp per merge.

    (ma, da) + (mb, db) = (M, d_big + d_small * e^(m_small - M)). Identity (-FLT_MAX, 0): never
    -inf, so no inf - inf appears. A NaN operand makes d NaN. An +inf maximum is caught per row by
    `_not_finite_to_nan(M)` (this form would otherwise give the other elements 0).

    big/small are chosen by the same comparison as d, not by max/min: CUDA's max/min (fmaxf)
    return the other operand for a NaN, which dropped the NaN and gave a finite row where
    onnxruntime gives NaN. With one comparison (false for NaN) the NaN lands in `small`, so
    e = e^(NaN) makes d NaN on every target.
    """

    def combine(a, b):
        a_big = a[0] >= b[0]
        big = tirx.Select(a_big, a[0], b[0])
        small = tirx.Select(a_big, b[0], a[0])
        e = tirx.Var("online_scale", "float32")  # bound once: a Let may be defined only once
        d = tirx.Select(a_big, a[1] + b[1] * e, a[1] * e + b[1])
        return big, tirx.Let(e, exp_nonpositive(small - big), d)

    def identity(t0, t1="float32"):
        return tirx.const(FLT_LOWEST, t0), tirx.const(0.0, t1)

    return _Reducer(combine, identity, "online")


# Exponents of the two-pass pairs are integer-valued floats. A term 2^-126 or more below the row's
# largest one is below float32 resolution of the sum (and an output that small is flushed to 0, as
# onnxruntime does), so exponent gaps are clamped at -126 and one exponent-bit factor suffices.
_POW2_FLOOR = -126.0


def _scale_down(value: tirx.PrimExpr, gap: tirx.PrimExpr) -> tirx.PrimExpr:
    """value * 2^gap for an integer-valued gap <= 0 (gaps below -126 flush the term to ~0)."""
    return value * pow2(tirx.max(gap, _f32(_POW2_FLOOR)))


def _two_pass_reducer():
    """(v, e) pairs of Dukhan & Ablavatski: v * 2^e, merged by exact power-of-two rescaling."""

    def combine(a, b):
        e = tirx.max(a[1], b[1])
        return _scale_down(a[0], a[1] - e) + _scale_down(b[0], b[1] - e), e

    def identity(t0, t1="float32"):
        return tirx.const(0.0, t0), tirx.const(FLT_LOWEST, t1)

    return _Reducer(combine, identity, "extexp")


def _two_pass_element(x: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(mantissa, exponent) of e^x with the guards the reference kernels lack.

    -inf and -FLT_MAX would make x*log2(e) overflow and the reduction compute inf - inf (NaN row):
    x is clamped from below to -SPLIT_LIMIT, and -inf then gets mantissa 0 (so an all -inf row is
    0/0 = NaN as in onnxruntime). +inf and NaN are not clamped: their mantissa is NaN
    (inf - inf in the reduction), which makes the row NaN, as in onnxruntime.
    """
    clamped = tirx.Select(x < _f32(-SPLIT_LIMIT), _f32(-SPLIT_LIMIT), x)
    p, n = exp_split(clamped)
    return tirx.Select(x == _f32(-math.inf), _f32(0.0), p), n


def softmax(
    x: te.Tensor,
    *,
    algorithm: str = "three-pass",
    log: bool = False,
    partitioning: Partitioning = Partitioning(),
    name: str = "softmax",
) -> te.Tensor:
    """Softmax (or LogSoftmax if ``log``) of ``x[outer, length, inner]`` along ``length``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown softmax algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    if len(x.shape) != 3:
        raise ValueError(f"softmax compute takes a 3-D [outer, length, inner] view, got {x.shape}")
    out_dtype = x.dtype
    rows = _RowReduction(x, partitioning)
    builder = {
        "three-pass": _three_pass,
        "three-pass-recompute": _three_pass_recompute,
        "two-pass": _two_pass,
        "online": _online,
    }[algorithm]
    return builder(x, rows, log, out_dtype, name)


def _cast(value: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    return value if dtype == "float32" else value.astype(dtype)


def _row_max(rows: _RowReduction) -> te.Tensor:
    (row_max,) = rows.reduce("max", _max_reducer, lambda v, o, i: (v,))
    return row_max


def _row_sum(rows: _RowReduction, name: str, value_of: Callable) -> te.Tensor:
    (total,) = rows.reduce(name, _sum_reducer, lambda v, o, i: (value_of(v, o, i),))
    return total


def _scale_output(x, shift, scale, out_dtype, name, exp_of=None):
    """y = exp(x - shift) * scale (or stored_exp * scale)."""

    def body(o, k, i):
        e = exp_of(o, k, i) if exp_of is not None else exp_nonpositive(_load(x, o, k, i) - shift[o, i])
        return _cast(e * scale[o, i], out_dtype)

    return te.compute(x.shape, body, name=name)


def _log_output(x, shift, log_sum, out_dtype, name):
    """y = (x - shift) - log_sum: as onnxruntime computes LogSoftmax (x - max - log(sum)).

    Subtracting the shift first keeps rows of -FLT_MAX alone finite (-log(n), not 0 or NaN).
    """
    return te.compute(
        x.shape,
        lambda o, k, i: _cast((_load(x, o, k, i) - shift[o, i]) - log_sum[o, i], out_dtype),
        name=name,
    )


def _row_constants(x, name, fn) -> te.Tensor:
    return te.compute((x.shape[0], x.shape[2]), fn, name=name)


def _three_pass(x, rows, log, out_dtype, name):
    row_max = _row_max(rows)
    stored = te.compute(
        x.shape, lambda o, k, i: exp_nonpositive(_load(x, o, k, i) - row_max[o, i]), name=f"{name}_exp"
    )
    total = _row_sum(_RowReduction(stored, rows.part), "sum", lambda v, o, i: v)
    return _finish(x, row_max, total, log, out_dtype, name, exp_of=lambda o, k, i: stored[o, k, i])


def _three_pass_recompute(x, rows, log, out_dtype, name):
    row_max = _row_max(rows)
    # The sum reads x again: exp(x - max) is recomputed in the output pass instead of stored.
    total = _row_sum(rows, "sum", lambda v, o, i: exp_nonpositive(v - row_max[o, i]))
    return _finish(x, row_max, total, log, out_dtype, name)


def _online(x, rows, log, out_dtype, name):
    row_max, total = rows.reduce(
        "online",
        _online_reducer(),
        lambda v, o, i: (v, _f32(1.0)),
    )
    return _finish(x, row_max, total, log, out_dtype, name)


def _finish(x, row_max, total, log, out_dtype, name, exp_of=None):
    """Output pass shared by the max-based algorithms (three-pass, recompute, online)."""
    if log:
        log_sum = _row_constants(
            x,
            f"{name}_logsum",
            lambda o, i: tirx.log(total[o, i]) + _not_finite_to_nan(row_max[o, i]),
        )
        return _log_output(x, row_max, log_sum, out_dtype, name)
    scale = _row_constants(
        x,
        f"{name}_scale",
        lambda o, i: _f32(1.0) / total[o, i] + _not_finite_to_nan(row_max[o, i]),
    )
    return _scale_output(x, row_max, scale, out_dtype, name, exp_of=exp_of)


def _two_pass(x, rows, log, out_dtype, name):
    mantissa_sum, exponent = rows.reduce(
        "extexp",
        _two_pass_reducer(),
        lambda v, o, i: _two_pass_element(v),
    )
    if log:
        # log(v * 2^e) = e*ln2 + log(v); no max is known, so the shift is e*ln2 (see limits),
        # split like the exp's reduction: e*C1 is exact, so x - e*C1 loses nothing.
        shift = _row_constants(x, f"{name}_shift", lambda o, i: exponent[o, i] * _f32(LN2_C1))
        log_sum = _row_constants(
            x,
            f"{name}_logsum",
            lambda o, i: exponent[o, i] * _f32(LN2_C2)
            + exponent[o, i] * _f32(LN2_C3)
            + tirx.log(mantissa_sum[o, i]),
        )
        return _log_output(x, shift, log_sum, out_dtype, name)
    inverse = _row_constants(x, f"{name}_scale", lambda o, i: _f32(1.0) / mantissa_sum[o, i])

    def body(o, k, i):
        p, n = _two_pass_element(_load(x, o, k, i))
        return _cast(_scale_down(p * inverse[o, i], n - exponent[o, i]), out_dtype)

    return te.compute(x.shape, body, name=name)


OUTPUT_VIEW = "softmax_output_view"


def in_shape(y: te.Tensor, dims: list, axis: int, coerce_2d: bool) -> te.Tensor:
    """The ``[outer, length, inner]`` result ``y`` as a tensor of the input's own ``dims``: an
    index map (outer = the dims before the axis, fused; length = the axis, or everything from
    it for opsets 1/11; inner = the dims after), which schedules inline into the output block
    (`schedules.inline_output_view`), so the result is written once, in the graph's shape."""
    rank = len(dims)
    axis = axis + rank if axis < 0 else axis
    end = rank if coerce_2d else axis + 1

    def fused(idx, extents):
        flat = tirx.const(0, "int64") if not idx else idx[0]
        for i, extent in zip(idx[1:], extents[1:]):
            flat = flat * extent + i
        return flat if idx else tirx.const(0, "int64")

    def body(*idx):
        return y[fused(idx[:axis], dims[:axis]), fused(idx[axis:end], dims[axis:end]), fused(idx[end:], dims[end:])]

    return te.compute(dims, body, name=OUTPUT_VIEW)
