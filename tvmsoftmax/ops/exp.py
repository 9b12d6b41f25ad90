"""A vectorisable float32 exp for TIR, in the spirit of XNNPACK/MLAS.

`te.exp` becomes `llvm.exp.v8f32` in LLVM IR but is lowered to scalar glibc `expf` calls in the
binary (about 10x slower than a polynomial on AVX2). The functions here build the exponential from
plain arithmetic so that LLVM (and nvcc) keep it in vector registers:

    e^x = p(t) * 2^n,   n = round(x * log2(e)),   t = x - n * ln2   (|t| <= ln2/2)

* Range reduction: three-constant Cody-Waite. C1 = 0.6875 (4 significant bits) and
  C2 = 23/4096 (5 bits), so n*C1 and n*C2 are exact for |n| < 2^17 and both subtractions are
  exact (the operands share a grid fine enough for the small difference); only n*C3 rounds. The
  reduction is accurate for |x| < SPLIT_LIMIT = 90000 (the whole float16 range), which is what
  two-pass needs (it never subtracts the max).
* p(t): the degree-7 polynomial of Cephes' expf (1 + t + t^2 * P5(t)), relative error about 1 ulp
  on the reduced interval.
* 2^n is built from exponent bits in two factors 2^(n>>1) * 2^(n - (n>>1)), so results in the
  subnormal range (x down to -103.97) and the overflow to +inf (x > 88.72) come out right without
  a special case per element.
* NaN propagates; -inf gives exactly 0; +inf gives +inf.

Measured bound (tests/test_exp.py, against float64 over the whole float32 range): at most 2 ulp
for normal results; subnormal results are within 1 ulp of the subnormal grid.
"""

from __future__ import annotations

from tvm import tirx

LOG2E = 1.4426950408889634
# ln2 = C1 + C2 + C3; C1 and C2 have 4 and 5 significant bits (exact products for |n| < 2^17).
LN2_C1 = 0.6875
LN2_C2 = 23.0 / 4096.0
LN2_C3 = 0.6931471805599453 - LN2_C1 - LN2_C2
# Cephes expf: e^t = 1 + t + t^2 * (((((P0 t + P1) t + P2) t + P3) t + P4) t + P5)
_CEPHES = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
# Inputs are clamped to this range before the split (exp(-104) rounds to 0, exp(88.8) to inf).
EXP_MIN_INPUT = -104.0
EXP_MAX_INPUT = 88.8
# Largest |x| for which `exp_split` is accurate (|n| < 2^17; 2^17 * ln2 = 90852).
SPLIT_LIMIT = 90000.0


def _f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def _let(value: tirx.PrimExpr, body, name: str) -> tirx.PrimExpr:
    """`body(var)` with `var` bound to `value` once. Without it the expression is duplicated at
    every use: LLVM undoes that, but CUDA source (and nvcc's time) grow exponentially with the
    nesting of the softmax reducers."""
    var = tirx.Var(name, "float32")
    return tirx.Let(var, value, body(var))


def _mantissa(x: tirx.PrimExpr, n: tirx.PrimExpr) -> tirx.PrimExpr:
    """p(t) for t = x - n*ln2 (three-constant reduction, then the Cephes polynomial)."""

    def polynomial(t):
        poly = _f32(_CEPHES[0])
        for coefficient in _CEPHES[1:]:
            poly = poly * t + _f32(coefficient)
        return poly * (t * t) + t + _f32(1.0)

    t = x - n * _f32(LN2_C1)
    t = t - n * _f32(LN2_C2)
    t = t - n * _f32(LN2_C3)
    return _let(t, polynomial, "exp_t")


def exp_split(x: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """Return (p, n) with e^x = p * 2^n, p in [sqrt(1/2), sqrt(2)], n an integer-valued float.

    Accurate for |x| < SPLIT_LIMIT; callers clamp (and bind `x` if it is a large expression).
    This is the (mantissa, exponent) pair of the Two-Pass algorithm (Dukhan & Ablavatski 2020).
    """
    n = tirx.round(x * _f32(LOG2E))
    return _mantissa(x, n), n


def pow2(n: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^n for an integer-valued float n in [-126, 127], built from the exponent bits."""
    bits = tirx.shift_left(n.astype("int32") + 127, 23)
    return tirx.reinterpret("float32", bits)


def ldexp_wide(p: tirx.PrimExpr, n: tirx.PrimExpr) -> tirx.PrimExpr:
    """p * 2^n for an integer-valued float n in [-252, 254] (two factors: subnormals and inf)."""
    ni = n.astype("int32")
    half = tirx.shift_right(ni, 1)
    first = tirx.reinterpret("float32", tirx.shift_left(half + 127, 23))
    second = tirx.reinterpret("float32", tirx.shift_left(ni - half + 127, 23))
    return p * first * second


def clamp_keep_nan(x: tirx.PrimExpr, low: float, high: float) -> tirx.PrimExpr:
    """Clamp to [low, high] with comparisons that are false for NaN, so NaN passes through.

    Not tirx.max/min (they may lower to maxnum/minnum, which drop NaN) and no `isnan` test:
    `isnan` is `x != x`, which TVM 0.27 folds to false inside vectorised reductions.
    """
    x = tirx.Select(x < _f32(low), _f32(low), x)
    return tirx.Select(x > _f32(high), _f32(high), x)


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x for a float32 expression, from vectorisable arithmetic; NaN in gives NaN out.

    NaN flows through the clamp and the polynomial; its exponent bits are garbage, but NaN times
    anything is NaN.
    """

    def scaled(clamped):
        n = tirx.round(clamped * _f32(LOG2E))
        return _let(n, lambda nv: ldexp_wide(_mantissa(clamped, nv), nv), "exp_n")

    return _let(clamp_keep_nan(x, EXP_MIN_INPUT, EXP_MAX_INPUT), scaled, "exp_x")
