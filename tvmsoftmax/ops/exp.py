"""A vectorisable float32 exp (and tanh) for TIR, in the spirit of XNNPACK/MLAS.

`te.exp` becomes `llvm.exp.v8f32` in LLVM IR but is lowered to scalar glibc `expf` calls in the
binary (about 10x slower than a polynomial on AVX2). The functions here build the exponential from
plain arithmetic so that LLVM (and nvcc) keep it in vector registers:

    e^x = p(t) * 2^n,   n = round(x * log2(e)),   t = x - n * ln2   (|t| <= ln2/2)

* p(t) = 1 + t*(c1 + t*(c2 + t*(c3 + t*(c4 + t*c5)))): degree 5, coefficients fitted here for
  minimal relative error on [-ln2/2, ln2/2] (reweighted least squares towards minimax; they agree
  with XNNPACK's p5 to 1e-6): 1.7e-7 relative error when evaluated in float32.
* Range reduction, wide (`exp_split`, `fast_exp`): three-constant Cody-Waite. C1 = 0.6875
  (4 significant bits) and C2 = 23/4096 (5 bits), so n*C1 and n*C2 are exact for |n| < 2^17 and
  both subtractions are exact; only n*C3 rounds. Accurate for |x| < SPLIT_LIMIT = 90000 (the whole
  float16 range): the Two-Pass algorithm's (mantissa, exponent) pairs need it, it never subtracts
  the max.
* Range reduction, narrow (`exp_nonpositive`): the two constants of MLAS (ln2_hi has 15
  significant bits: exact for |n| < 2^9).

Two variants:

* `fast_exp(x)`: the whole float32 range. 2^n is built from exponent bits in two factors
  2^(n>>1) * 2^(n - (n>>1)), so subnormal results (x down to -103.97) and the overflow to +inf
  (x > 88.72) come out right. NaN propagates; -inf gives 0; +inf gives +inf.
* `exp_nonpositive(x)`: for x <= 0 (every softmax exponent is x - max <= 0). One exponent factor,
  no input clamp; results below FLT_MIN (x < -87.336) are exactly 0, as onnxruntime flushes them.
  NaN propagates; -inf gives 0. About two thirds of `fast_exp`'s instructions.

Measured (tests/test_exp.py, against float64 over the whole range): at most 2 ulp for normal
results for both; `fast_exp`'s subnormal results are within two subnormal steps.
"""

from __future__ import annotations

from tvm import tirx

LOG2E = 1.4426950408889634
# Wide reduction: ln2 = C1 + C2 + C3; C1 and C2 have 4 and 5 significant bits.
LN2_C1 = 0.6875
LN2_C2 = 23.0 / 4096.0
LN2_C3 = 0.6931471805599453 - LN2_C1 - LN2_C2
# Narrow reduction (MLAS): ln2 = LN2_HI + LN2_LO, LN2_HI with 15 significant bits.
LN2_HI = 0.693145751953125
LN2_LO = 0.6931471805599453 - LN2_HI
# p(t) - 1 = t * (c1 + t * (c2 + ...)), highest degree first.
_POLY = (
    0.008290314115583897,
    0.04189793020486832,
    0.1666763573884964,
    0.4999915063381195,
    0.9999997019767761,
)
# fast_exp clamps its input to this range before the split (exp(-104) rounds to 0, exp(88.8)
# to inf).
EXP_MIN_INPUT = -104.0
EXP_MAX_INPUT = 88.8
# exp_nonpositive: below this, e^x < FLT_MIN and the result is flushed to 0.
FLUSH_BELOW = -87.33654475055310898657
# 1.5 * 2^23 + 127: adding it rounds x*log2(e) to an integer and leaves n + 127 in the low bits.
_MAGIC_BIAS = 12582912.0 + 127.0
# Largest |x| for which `exp_split` is accurate (|n| < 2^17; 2^17 * ln2 = 90852).
SPLIT_LIMIT = 90000.0


def _f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def _dtype(x: tirx.PrimExpr) -> str:
    dtype = getattr(x, "dtype", None)  # TVM 0.27's buffer loads carry it in `.ty`
    return str(dtype if dtype is not None else x.ty)


def _like(x: tirx.PrimExpr, scalar: str) -> str:
    """`scalar` with x's lanes: ``int32`` for float32, ``int32x16`` for float32x16. The functions
    here also build vector expressions (`exp_lowering` rewrites exp after vectorisation)."""
    dtype = _dtype(x)
    return scalar + dtype[dtype.index("x"):] if "x" in dtype else scalar


def _const_like(x: tirx.PrimExpr, value: float) -> tirx.PrimExpr:
    """A float32 constant broadcast to x's lanes (arithmetic broadcasts by itself, Select not)."""
    dtype = _dtype(x)
    if "x" not in dtype:
        return _f32(value)
    return tirx.Broadcast(_f32(value), int(dtype[dtype.index("x") + 1:]))


def _let(value: tirx.PrimExpr, body, name: str) -> tirx.PrimExpr:
    """`body(var)` with `var` bound to `value` once. Without it the expression is duplicated at
    every use: LLVM undoes that, but CUDA source (and nvcc's time) grow exponentially with the
    nesting of the softmax reducers."""
    var = tirx.Var(name, _dtype(value))
    return tirx.Let(var, value, body(var))


def _horner(coefficients, t: tirx.PrimExpr) -> tirx.PrimExpr:
    """sum_k coefficients[k] t^(n-k): the polynomial with `coefficients` highest degree first."""
    value = _f32(coefficients[0])
    for coefficient in coefficients[1:]:
        value = value * t + _f32(coefficient)
    return value


def _polynomial(t: tirx.PrimExpr) -> tirx.PrimExpr:
    return _horner(_POLY, t) * t + _f32(1.0)


def _mantissa(x: tirx.PrimExpr, n: tirx.PrimExpr, constants) -> tirx.PrimExpr:
    """p(t) for t = x - n*ln2, with ln2 split into `constants` (Cody-Waite)."""
    t = x
    for constant in constants:
        t = t - n * _f32(constant)
    return _let(t, _polynomial, "exp_t")


def exp_split(x: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """Return (p, n) with e^x = p * 2^n, p in [sqrt(1/2), sqrt(2)], n an integer-valued float.

    Accurate for |x| < SPLIT_LIMIT; callers clamp (and bind `x` if it is a large expression).
    This is the (mantissa, exponent) pair of the Two-Pass algorithm (Dukhan & Ablavatski 2020).
    """
    n = tirx.round(x * _f32(LOG2E))
    return _mantissa(x, n, (LN2_C1, LN2_C2, LN2_C3)), n


def pow2(n: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^n for an integer-valued float n in [-126, 127], built from the exponent bits."""
    bits = tirx.shift_left(n.astype(_like(n, "int32")) + 127, 23)
    return tirx.reinterpret(_like(n, "float32"), bits)


def ldexp_wide(p: tirx.PrimExpr, n: tirx.PrimExpr) -> tirx.PrimExpr:
    """p * 2^n for an integer-valued float n in [-252, 254] (two factors: subnormals and inf)."""
    ni = n.astype(_like(n, "int32"))
    half = tirx.shift_right(ni, 1)
    first = tirx.reinterpret(_like(n, "float32"), tirx.shift_left(half + 127, 23))
    second = tirx.reinterpret(_like(n, "float32"), tirx.shift_left(ni - half + 127, 23))
    return p * first * second


def clamp_keep_nan(x: tirx.PrimExpr, low: float, high: float) -> tirx.PrimExpr:
    """Clamp to [low, high] with comparisons that are false for NaN, so NaN passes through.

    Not tirx.max/min (they may lower to maxnum/minnum, which drop NaN) and no `isnan` test:
    `isnan` is `x != x`, which TVM 0.27 folds to false inside vectorised reductions.
    """
    x = tirx.Select(x < _f32(low), _const_like(x, low), x)
    return tirx.Select(x > _f32(high), _const_like(x, high), x)


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x for a float32 expression over the whole range; NaN in gives NaN out.

    NaN flows through the clamp and the polynomial; its exponent bits are garbage, but NaN times
    anything is NaN.
    """

    def scaled(clamped):
        n = tirx.round(clamped * _f32(LOG2E))
        return _let(
            n, lambda nv: ldexp_wide(_mantissa(clamped, nv, (LN2_C1, LN2_C2, LN2_C3)), nv), "exp_n"
        )

    return _let(clamp_keep_nan(x, EXP_MIN_INPUT, EXP_MAX_INPUT), scaled, "exp_x")


def exp_nonpositive(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x for x <= 0 (or -inf, NaN); results below FLT_MIN are exactly 0 (onnxruntime's flush).

    XNNPACK's magic-bias form, 13 vector operations: ``biased = x*log2(e) + MAGIC`` rounds to
    nearest and leaves n + 127 in the low mantissa bits, so ``bits(biased) << 23`` is 2^n with no
    round or convert; the scale is folded into the last step, e = s + (t*s) * q(t). For
    x < FLUSH_BELOW (including -inf) the exponent bits are garbage and the final select returns 0;
    NaN fails that comparison and keeps the polynomial's NaN.
    """

    def scaled(xv):
        biased = xv * _f32(LOG2E) + _f32(_MAGIC_BIAS)

        def from_biased(b):
            n = b - _f32(_MAGIC_BIAS)
            scale = tirx.reinterpret(_like(b, "float32"), tirx.shift_left(tirx.reinterpret(_like(b, "int32"), b), 23))
            t = xv - n * _f32(LN2_HI)
            t = t - n * _f32(LN2_LO)

            def combine(tv):
                q = _horner(_POLY, tv)
                return _let(scale, lambda sv: sv + (tv * sv) * q, "exp_s")

            return _let(t, combine, "exp_t")

        value = _let(biased, from_biased, "exp_b")
        return tirx.Select(xv < _f32(FLUSH_BELOW), _const_like(xv, 0.0), value)

    return _let(x, scaled, "exp_x")


# tanh(x) = x P(x^2) / Q(x^2) on [-9, 9] (clamped outside, where float32 tanh is +-1): the rational
# approximation of Eigen's and MLAS's float32 tanh (onnxruntime's Tanh), accurate in relative terms
# near 0, where tanh from exponentials cancels.
TANH_LIMIT = 9.0
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def fast_tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """tanh(x) for a float32 expression (scalar or vector), plain arithmetic; NaN in gives NaN,
    +-inf gives +-1."""

    def rational(xv):
        def body(x2):
            return xv * _horner(_TANH_P, x2) / _horner(_TANH_Q, x2)

        return _let(xv * xv, body, "tanh_x2")

    return _let(clamp_keep_nan(x, -TANH_LIMIT, TANH_LIMIT), rational, "tanh_x")


# erf in two ranges, fitted here (Chebyshev-node least squares reweighted towards minimax, relative
# error, then checked in float32 against float64: at most 2.4 ulp, tests/test_exp.py):
# |x| < ERF_SPLIT: x * A(x^2), A of degree 6 (A(0) = 2/sqrt(pi));
# ERF_SPLIT <= |x| < ERF_ONE: 1 - e^(-x^2) * B(|x|), B ~ e^(x^2) erfc(x) of degree 12 (1 - erfc, not
# a fit of erf itself: erf's distance from 1 is what carries its information there);
# |x| >= ERF_ONE: +-1 (erfc(3.92) < 2^-25, so float32 erf is 1).
ERF_SPLIT, ERF_ONE = 0.921875, 3.92
# Highest degree first, as the tables above.
_ERF_A = (8.37009636532823e-05, -0.0008142703214885926, 0.0052010321806051606, -0.026859398206706565,
          0.11283695492645843, -0.37612633734972445, 1.128379166637399)
_ERF_B = (1.2838359048261575e-07, -4.273926060052307e-06, 6.539810233262761e-05, -0.0006108730571811081,
          0.0039041828407876994, -0.018154252023425802, 0.06384605247821028, -0.1745955723821811,
          0.3794908386963057, -0.6672389828338327, 0.9586053740506342, -1.1160320333286873,
          0.9983075907020005)


def fast_erf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """erf(x) for a float32 expression (scalar or vector), plain arithmetic (TVM's `erf` is one
    glibc call per lane). NaN in gives NaN (it fails every comparison and reaches the polynomial),
    +-inf gives +-1."""

    def signed(xv):
        def on_magnitude(a):
            def ranges(z):
                small = xv * _horner(_ERF_A, z)  # from x itself: erf(-0) = -0
                tail = _f32(1.0) - exp_nonpositive(-z) * _horner(_ERF_B, a)
                large = tirx.Select(a >= _f32(ERF_ONE), _const_like(a, 1.0), tail)
                signed_large = _let(large, lambda v: tirx.Select(xv < _f32(0.0), -v, v), "erf_l")
                return tirx.Select(a >= _f32(ERF_SPLIT), signed_large, small)

            return _let(a * a, ranges, "erf_z")

        return _let(tirx.abs(xv), on_magnitude, "erf_a")

    return _let(x, signed, "erf_x")
