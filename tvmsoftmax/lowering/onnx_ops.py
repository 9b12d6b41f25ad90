"""Converters for ONNX ops that TVM 0.27's importer lacks or computes differently from
onnxruntime (each says what TVM did): they replace or extend TVM's for one import
(`importer._our_converters`). Semantics are onnxruntime's; a case TVM would get silently wrong
and we cannot express is refused by name (a ValueError the importer reports as a ModelError
naming the converter)."""

from __future__ import annotations

import math

import numpy as np


def converters() -> dict:
    """Our converters by ONNX op type."""
    return {
        "IsInf": _make_isinf_converter(),
        "Mish": _make_mish_converter(),
        "Softplus": _make_softplus_converter(),
        "NonMaxSuppression": _make_nms_converter(),
        "Resize": _make_resize_converter(),
        "Upsample": _make_upsample_converter(),
        "PRelu": _make_prelu_converter(),
        **_make_integer_converters(),
        "CumProd": _make_cumprod_converter(),
        "BitCast": _make_bitcast_converter(),
        "ReverseSequence": _make_reverse_sequence_converter(),
        "Col2Im": _make_col2im_converter(),
        "DFT": _make_dft_converter(),
        "STFT": _make_stft_converter(),
        "DeformConv": _make_deform_conv_converter(),
        **_make_inference_only_converters(),
        **_make_dtype_exact_converters(),
        **_make_math_converters(),
        **_make_fused_norm_converters(),
        **_make_edge_converters(),
        "TensorScatter": _make_tensor_scatter_converter(),
        **_make_ort_fused_converters(),
        "MaxPool": _make_maxpool_converter(),
        **_make_ml_converters(),
        **_make_nan_propagating_converters(),
    }


BFLOAT16_MAX = 3.3895313892515355e38  # (2 - 2^-7) 2^127


def _nan_passes(x, result):
    """`result` where `x` is a number, `x` (NaN) where it is NaN; x broadcasts to result's shape."""
    from tvm import relax

    return relax.op.where(relax.op.isnan(x), x, result)


def _floating(x) -> bool:
    from tvm import relax

    return isinstance(getattr(x, "ty", None), relax.TensorType) and str(x.ty.dtype).startswith(("float", "bfloat"))


def _make_nan_propagating_converters() -> dict:
    """Max, Min and Clip with NaN in, NaN out, as onnxruntime and NumPy compute them. TVM 0.27
    lowers them to max/min that return the other operand when one is NaN: Max(NaN, 0) was 0,
    Clip(NaN, -1, 1) was -1. (Relu, Sign and the clip of HardSigmoid are fixed on the imported
    module, whatever emitted them: `numerics.py`.)

    * Max, Min: TVM's converter builds the result (constant inputs are folded by NumPy, which
      propagates NaN already); where an input is NaN, the output is NaN.
    * Clip: ours. A bound that is absent is the dtype's lowest / highest finite value (ONNX's
      default, onnxruntime's: Clip(+inf, min=-1) is FLT_MAX; TVM's converter used +-inf), so
      +-inf are clamped to the finite range of float types; integers are not clamped there.
    """
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def propagating(base):
        class NanPropagating(OnnxOpConverter):
            @classmethod
            def get_converter(cls, opset):
                convert = base.get_converter(opset)

                def converter(bb, inputs, attr, params):
                    result = convert(bb, inputs, attr, params)
                    if isinstance(result, tvm.ir.expr.Constant):
                        return result
                    sources = [x for x in inputs if x is not None and _floating(x)]
                    if not sources:
                        return result
                    result = bb.normalize(result)
                    for x in sources:
                        result = bb.normalize(_nan_passes(x, result))
                    return result

                return converter

        NanPropagating.__name__ = f"NanPropagating{base.__name__}"
        return NanPropagating

    def clip(x, low, high):
        """min(max(x, low), high); low/high: relax tensors, Python numbers or None (absent)."""
        dtype = str(x.ty.dtype)
        floating = dtype.startswith(("float", "bfloat"))
        if floating:
            largest = BFLOAT16_MAX if dtype == "bfloat16" else float(np.finfo(dtype).max)
            low = -largest if low is None else low
            high = largest if high is None else high
        bound = lambda v: relax.const(v, dtype) if isinstance(v, (int, float)) else v  # noqa: E731
        constants = [v for v in (x, low, high) if v is not None]
        if all(isinstance(v, (tvm.ir.expr.Constant, int, float)) for v in constants):
            values = [v.data.numpy() if isinstance(v, tvm.ir.expr.Constant) else v for v in (x, low, high)]
            folded = values[0]
            if values[1] is not None:
                folded = np.maximum(folded, values[1])
            if values[2] is not None:
                folded = np.minimum(folded, values[2])
            return relax.const(np.asarray(folded, values[0].dtype), dtype)
        result = x
        if low is not None:
            result = relax.op.maximum(result, bound(low))
        if high is not None:
            result = relax.op.minimum(result, bound(high))
        return _nan_passes(x, result) if floating else result

    class ClipConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):  # opsets 1-10: the bounds are attributes
            return clip(inputs[0], attr.get("min"), attr.get("max"))

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):  # opset 11+: optional inputs
            x, low, high = (list(inputs) + [None, None])[:3]
            if not isinstance(getattr(x, "ty", None), relax.TensorType):
                return onnx_frontend.Clip.get_converter(11)(bb, inputs, attr, params)
            return clip(x, low, high)

    return {"Max": propagating(onnx_frontend.Max), "Min": propagating(onnx_frontend.Min), "Clip": ClipConverter}


def _make_isinf_converter():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class IsInfConverter(OnnxOpConverter):
        """IsInf with its detect_negative / detect_positive attributes (TVM 0.27's converter
        ignores them and flags both infinities)."""

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            x = inputs[0]
            flags = relax.op.isinf(x)
            zero = relax.const(0, x.ty.dtype)
            if not attr.get("detect_negative", 1):
                flags = relax.op.logical_and(flags, relax.op.greater(x, zero))
            if not attr.get("detect_positive", 1):
                flags = relax.op.logical_and(flags, relax.op.less(x, zero))
            return flags

    return IsInfConverter


def _widened(x, body):
    """body(x, dtype) computed in float32 for half types (float16/bfloat16), in x's own type for
    float32/float64, and cast back to x's type."""
    from tvm import relax

    dtype = str(x.ty.dtype)
    work = dtype if dtype in ("float32", "float64") else "float32"
    y = body(x if work == dtype else relax.op.astype(x, work), work)
    return y if work == dtype else relax.op.astype(y, dtype)


def _make_mish_converter():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class MishConverter(OnnxOpConverter):
        """Mish without cancellation. TVM 0.27 computes x * tanh(log(1 + e^x)), whose 1 + e^x
        rounds away e^x for negative x (1e-3 relative error at x = -10, worse below). Here
        tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2), exact in form for every x; for
        x > 20 (where that ratio is 1 in float32, and before n overflows) the result is x.
        float16/bfloat16 are computed in float32 (e^x overflows float16 at x = 11)."""

        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            def mish(x, dtype):
                t = relax.op.exp(x)
                n = relax.op.multiply(t, relax.op.add(t, relax.const(2.0, dtype)))
                ratio = relax.op.divide(n, relax.op.add(n, relax.const(2.0, dtype)))
                return relax.op.where(relax.op.greater(x, relax.const(20.0, dtype)), x,
                                      relax.op.multiply(x, ratio))

            return _widened(inputs[0], mish)

    return MishConverter


def _log1p(u, dtype: str):
    """log(1 + u) for u >= 0 without losing u where 1 + u rounds (Goldberg: with w = 1 + u
    rounded, log(w) * u / (w - 1) is accurate to a few ulps; w == 1 means log1p(u) = u)."""
    from tvm import relax

    one = relax.const(1.0, dtype)
    w = relax.op.add(one, u)
    scaled = relax.op.divide(relax.op.multiply(relax.op.log(w), u), relax.op.subtract(w, one))
    return relax.op.where(relax.op.equal(w, one), u, scaled)


def _make_softplus_converter():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class SoftplusConverter(OnnxOpConverter):
        """Softplus = max(x, 0) + log1p(e^-|x|), with a log1p that keeps small terms (TVM 0.27's
        log(1 + e^-|x|) is 1e-3 relative off at x = -10 and 0 below x = -17, where the result
        is e^x). float16/bfloat16 in float32."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            def softplus(x, dtype):
                tail = _log1p(relax.op.exp(relax.op.negative(relax.op.abs(x))), dtype)
                return relax.op.add(relax.op.maximum(x, relax.const(0.0, dtype)), tail)

            return _widened(inputs[0], softplus)

    return SoftplusConverter


def _make_dtype_exact_converters() -> dict:
    """Elu, Selu and ThresholdedRelu in the input's own float type (TVM 0.27 builds them with
    float32 constants or a float32 cast, which fails to import for float16/bfloat16, and so does
    every function body using them, Celu's). Formulas as onnxruntime computes them."""
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def converter(name: str, formula, default_attrs: dict):
        def impl(cls, bb, inputs, attr, params):
            x = inputs[0]
            dtype = str(x.ty.dtype)

            def const(value):
                return relax.const(float(value), dtype)

            values = {key: float(attr.get(key, default)) for key, default in default_attrs.items()}
            return formula(x, const, **values)

        return type(f"{name}Converter", (OnnxOpConverter,), {"_impl_v1": classmethod(impl)})

    def elu(x, const, alpha):
        negative = relax.op.multiply(const(alpha), relax.op.subtract(relax.op.exp(x), const(1.0)))
        return relax.op.where(relax.op.greater(x, const(0.0)), x, negative)

    def selu(x, const, alpha, gamma):
        negative = relax.op.subtract(relax.op.multiply(const(alpha), relax.op.exp(x)), const(alpha))
        return relax.op.multiply(const(gamma), relax.op.where(relax.op.greater(x, const(0.0)), x, negative))

    def thresholded_relu(x, const, alpha):
        return relax.op.where(relax.op.greater(x, const(alpha)), x, const(0.0))

    return {
        "Elu": converter("Elu", elu, {"alpha": 1.0}),
        "Selu": converter("Selu", selu, {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875}),
        "ThresholdedRelu": converter("ThresholdedRelu", thresholded_relu, {"alpha": 1.0}),
    }


def _make_math_converters() -> dict:
    """Ops TVM 0.27 lacks or lowers wrongly, as onnxruntime computes them:

    * LpNormalization (absent): x / ||x||_p along `axis` (p = 1 or 2), 0 where the norm is 0;
    * Sinh, Cosh (TVM's tirx.sinh/cosh have no LLVM lowering): from e^x and e^-x, and for
      |x| < 0.5 sinh by its Taylor series (e^x - e^-x cancels there), to x^9 for float32 (error
      below 3e-11 relative) and x^17 for float64 (below 1e-22);
    * Pow with operands of different types, or integer ones (TVM requires one float type):
      ONNX's result has the base's type; an integer base is computed in float64 and truncated.
    """
    import math

    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def const(value, dtype):
        return relax.const(value, dtype)

    class LpNormalizationConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            dtype = str(x.ty.dtype)
            axis, p = int(attr.get("axis", -1)), int(attr.get("p", 2))
            if p not in (1, 2):
                raise ValueError(f"LpNormalization: p must be 1 or 2, got {p}")
            if p == 2:
                norm = relax.op.sqrt(relax.op.sum(relax.op.multiply(x, x), axis=[axis], keepdims=True))
            else:
                norm = relax.op.sum(relax.op.abs(x), axis=[axis], keepdims=True)
            zero = const(0.0, dtype)
            return relax.op.where(relax.op.equal(norm, zero), zero, relax.op.divide(x, norm))

        _impl_v22 = _impl_v1

    def exps(x):
        return relax.op.exp(x), relax.op.exp(relax.op.negative(x))

    class CoshConverter(OnnxOpConverter):
        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            x = inputs[0]
            up, down = exps(x)
            return relax.op.multiply(const(0.5, str(x.ty.dtype)), relax.op.add(up, down))

    class SinhConverter(OnnxOpConverter):
        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            x = inputs[0]
            dtype = str(x.ty.dtype)
            up, down = exps(x)
            wide = relax.op.multiply(const(0.5, dtype), relax.op.subtract(up, down))
            square = relax.op.multiply(x, x)
            terms = 9 if dtype == "float64" else 5  # x^17 / 17! or x^9 / 9!
            series = const(1.0 / math.factorial(2 * terms - 1), dtype)
            for k in range(terms - 2, -1, -1):
                series = relax.op.add(relax.op.multiply(series, square), const(1.0 / math.factorial(2 * k + 1), dtype))
            small = relax.op.less(relax.op.abs(x), const(0.5, dtype))
            return relax.op.where(small, relax.op.multiply(x, series), wide)

    class PowConverter(OnnxOpConverter):
        @classmethod
        def _impl_v7(cls, bb, inputs, attr, params):
            base, exponent = inputs
            base_type, exponent_type = str(base.ty.dtype), str(exponent.ty.dtype)
            if base_type.startswith("float"):
                if exponent_type != base_type:
                    exponent = relax.op.astype(exponent, base_type)
                return relax.op.power(base, exponent)
            result = relax.op.power(relax.op.astype(base, "float64"), relax.op.astype(exponent, "float64"))
            return relax.op.astype(result, base_type)

    return {"LpNormalization": LpNormalizationConverter, "Cosh": CoshConverter, "Sinh": SinhConverter,
            "Pow": PowConverter, "Det": _make_det_converter()}


def _make_det_converter():
    import tvm
    from tvm import te, tirx, topi
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def determinant(x, n: int):
        """LU with partial pivoting, one TE stage per column (n is static): the row of the
        largest |a_ik| (i >= k, the first on ties) is swapped up, the rows below are eliminated;
        det = the product of the pivots, negated per swap. A zero pivot column makes det 0 (its
        elimination is skipped: no 0/0). NaN propagates through the products."""
        batch, dtype = list(x.shape[:-2]), x.dtype
        zero, one = tirx.const(0.0, dtype), tirx.const(1.0, dtype)

        def step(a, det, k):
            def candidate(*index):  # |a_ik| for i >= k, else below any magnitude
                *rows, i = index
                return tirx.Select(i >= k, tirx.abs(a(*rows, i, k)), tirx.const(-1.0, dtype))

            pivot = topi.argmax(te.compute(batch + [n], candidate, name=f"det_column{k}"), axis=-1)

            def swap(*index):
                *rows, i, j = index
                index_type = str(i.ty)  # TVM 0.27: a Var's dtype is its `ty`
                p = pivot(*rows).astype(index_type)
                return a(*rows, tirx.Select(i == k, p, tirx.Select(i == p, tirx.const(k, index_type), i)), j)

            swapped = te.compute(a.shape, swap, name=f"det_swap{k}")

            def eliminate(*index):
                *rows, i, j = index
                head = swapped(*rows, k, k)
                factor = tirx.Select(head == zero, zero, swapped(*rows, i, k) / head)
                value = swapped(*rows, i, j)
                return tirx.Select(i > k, value - factor * swapped(*rows, k, j), value)

            def product(*rows):
                sign = tirx.Select(pivot(*rows).astype("int64") == k, one, -one)
                return det(*rows) * swapped(*rows, k, k) * sign

            return (te.compute(a.shape, eliminate, name=f"det_eliminate{k}"),
                    te.compute(batch, product, name=f"det_step{k}"))

        a, det = x, te.compute(batch, lambda *rows: one, name="det_init")
        for k in range(n):
            a, det = step(a, det, k)
        return det

    class DetConverter(OnnxOpConverter):
        """Det (absent in TVM 0.27): [..., M, M] -> [...], by `determinant` (M must be static)."""

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            shape = inputs[0].ty.shape
            n = shape[-1] if len(shape) >= 2 else None
            if not isinstance(n, tvm.tirx.IntImm) or not isinstance(shape[-2], tvm.tirx.IntImm) or int(shape[-2]) != int(n):
                raise ValueError(f"Det: the last two dims must be static and equal, got {list(shape)}")
            return bb.emit_te(determinant, inputs[0], int(n))

        _impl_v22 = _impl_v11

    return DetConverter


def _make_nms_converter():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    base = onnx_frontend._get_convert_map()["NonMaxSuppression"]
    lowest = -3.4028234663852886e38

    class NonMaxSuppressionConverter(base):
        """TVM 0.27 reads max_output_boxes_per_class, iou_threshold and score_threshold at import
        time and silently substitutes 0 / 0.5 / 0.0 for any it cannot read. Here a run-time value
        is refused by name; an absent score_threshold means no threshold (ONNX) and becomes the
        lowest float; an absent or non-positive iou_threshold (ONNX's default is 0) is refused,
        since TVM's NMS then returns no boxes at all; a box whose IoU equals the threshold is kept
        (ONNX suppresses above it; TVM at it: its threshold is moved up one float32 ulp)."""

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            names = ("max_output_boxes_per_class", "iou_threshold", "score_threshold")
            defaults = (relax.const(0, "int64"), None, relax.const(lowest, "float32"))
            fixed = list(inputs[:2])
            for index, (name, default) in enumerate(zip(names, defaults), start=2):
                value = inputs[index] if len(inputs) > index else None
                if value is None:
                    value = default
                elif isinstance(value, relax.Var) and value.name in params[1]:
                    value = relax.const(params[1][value.name][1].numpy())
                elif not isinstance(value, tvm.ir.GenericConst):
                    raise ValueError(
                        f"NonMaxSuppression input {name!r} is computed at run time; TVM's "
                        "NonMaxSuppression needs it as a constant (an initializer)")
                if name == "iou_threshold" and (value is None or float(value.value.numpy().max()) <= 0):
                    raise ValueError(
                        "NonMaxSuppression with an iou_threshold of 0 (or none: ONNX's default is 0) "
                        "is not supported: TVM's NonMaxSuppression returns no boxes for it")
                if name == "iou_threshold":  # ONNX suppresses iou > threshold, TVM iou >= threshold
                    threshold = value.value.numpy().astype("float32")
                    value = relax.const(np.nextafter(threshold, np.float32(np.inf)))
                fixed.append(value)
            return super()._impl_v10(bb, fixed, attr, params)

    return NonMaxSuppressionConverter


def _make_upsample_converter():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    resize = _make_resize_converter()

    class UpsampleConverter(OnnxOpConverter):
        """Upsample (opsets 7-9, deprecated since 10 but in older exports, e.g. YOLOv3's) as the
        Resize it is: asymmetric coordinates (x_in = x_out / scale), nearest rounding down
        (onnxruntime's rule for scales >= 1) or N-linear. TVM 0.27's converter read the scales
        attribute of opset 7 only (it failed on opset 9's input) and handled 4-D NCHW only."""

        @classmethod
        def _resize(cls, bb, x, scales, attr, params):
            mode = attr.get("mode", b"nearest")
            attrs = {"mode": mode if isinstance(mode, bytes) else mode.encode("ascii"),
                     "coordinate_transformation_mode": b"asymmetric", "nearest_mode": b"floor"}  # as the importer gives them
            inputs = [x, None, scales, None]
            values = resize._constant(inputs, 2, params)
            if len(x.ty.shape) != 4 or (isinstance(values, np.ndarray) and (values[:2] != 1).any()):
                # TVM's Resize scales the spatial dims of 4-D input only: exact per-axis weights
                dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in x.ty.shape]
                separable = resize._separable(bb, inputs, attrs, params, dims)
                if separable is None:
                    raise ValueError("Upsample of a batch/channel axis or of a non-4-D input needs static "
                                     "dims and constant scales")
                return separable
            return resize._impl_v18(bb, inputs, attrs, params)

        @classmethod
        def _impl_v7(cls, bb, inputs, attr, params):
            scales = relax.const(np.array(attr["scales"], np.float32))
            return cls._resize(bb, inputs[0], scales, attr, params)

        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            return cls._resize(bb, inputs[0], inputs[1], attr, params)

    return UpsampleConverter


def _make_resize_converter():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    base = onnx_frontend._get_convert_map()["Resize"]

    class ResizeConverter(base):
        """TVM 0.27's Resize ignores `antialias` and derives its coordinate transform from the
        output size (in / out), where ONNX uses the given scale: they differ when in x scale is not
        an integer (e.g. 4 x 0.6 -> 2 pixels sampled as if by 0.5). Both gave wrong pixels
        silently; now refused by name (align_corners and tf_crop_and_resize do not use the
        scale, so they stay)."""

        @classmethod
        def _constant(cls, inputs, index, params):
            value = onnx_frontend.get_constant(inputs[index], params) if len(inputs) > index \
                and inputs[index] is not None else None
            return value.value.numpy() if isinstance(value, tvm.ir.GenericConst) else value

        @classmethod
        def _full_rank(cls, bb, inputs, attr, params):
            """`axes` and `keep_aspect_ratio_policy` (TVM ignores both: wrong shapes or failures)
            rewritten as full-rank constant roi / scales / sizes, as ONNX defines them."""
            attr = dict(attr)
            dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in inputs[0].ty.shape]
            rank = len(dims)
            axes = [a % rank for a in attr.pop("axes", range(rank))]
            policy = attr.pop("keep_aspect_ratio_policy", b"stretch")
            policy = policy.decode("ascii") if isinstance(policy, bytes) else policy
            inputs = list(inputs) + [None] * (4 - len(inputs))
            roi, scales, sizes = (cls._constant(inputs, i, params) for i in (1, 2, 3))
            for value, name in ((roi, "roi"), (scales, "scales"), (sizes, "sizes")):
                if value is not None and not isinstance(value, np.ndarray):
                    raise ValueError(f"Resize with axes or keep_aspect_ratio_policy needs {name} as a constant")
            if isinstance(roi, np.ndarray) and roi.size:
                full = np.array([0.0] * rank + [1.0] * rank, roi.dtype)
                for i, axis in enumerate(axes):
                    full[axis], full[rank + axis] = roi[i], roi[len(axes) + i]
                inputs[1] = relax.const(full)
            if isinstance(scales, np.ndarray) and scales.size:
                full = np.ones(rank, scales.dtype)
                full[axes] = scales
                inputs[2] = relax.const(full)
            if isinstance(sizes, np.ndarray) and sizes.size:
                if None in dims:
                    raise ValueError("Resize with axes or keep_aspect_ratio_policy needs static input dims")
                wanted = sizes.astype(np.float64)
                if policy in ("not_larger", "not_smaller"):
                    ratios = wanted / np.array([dims[a] for a in axes], np.float64)
                    scale = ratios.min() if policy == "not_larger" else ratios.max()
                    wanted = np.floor(scale * np.array([dims[a] for a in axes], np.float64) + 0.5)
                full = np.array(dims, sizes.dtype)
                full[axes] = wanted.astype(sizes.dtype)
                inputs[3] = relax.const(full)
            return inputs, attr

        @classmethod
        def _weights(cls, attr, size: int, roi, scale, out):
            """(W [out_size, size], b [out_size]) of one axis, Resize along it being W x + b
            (b: extrapolation outside tf_crop_and_resize's roi), from the onnx reference
            implementation applied to the identity (Resize is linear along an axis) and to zeros."""
            import onnx
            from onnx import helper as onnx_helper
            from onnx import numpy_helper
            from onnx.reference import ReferenceEvaluator

            names = ["X", "roi", "scales" if scale is not None else "", "sizes" if out is not None else ""]
            while not names[-1]:
                names.pop()
            keep = {k: (v.decode("ascii") if isinstance(v, bytes) else v) for k, v in attr.items()
                    if k in ("antialias", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside",
                             "extrapolation_value", "mode", "nearest_mode")}
            inits = [numpy_helper.from_array(np.array(roi if roi is not None else [], np.float64), "roi")]
            if scale is not None:
                inits.append(numpy_helper.from_array(np.array([scale, 1.0], np.float32), "scales"))
            if out is not None:
                inits.append(numpy_helper.from_array(np.array([out, size], np.int64), "sizes"))
            graph = onnx_helper.make_graph(
                [onnx_helper.make_node("Resize", names, ["Y"], **keep)], "axis",
                [onnx_helper.make_tensor_value_info("X", onnx.TensorProto.DOUBLE, [size, None])],
                [onnx_helper.make_tensor_value_info("Y", onnx.TensorProto.DOUBLE, None)], inits)
            evaluator = ReferenceEvaluator(onnx_helper.make_model(graph, opset_imports=[onnx_helper.make_opsetid("", 19)]))
            bias = evaluator.run(None, {"X": np.zeros((size, 1))})[0][:, 0]
            weights = evaluator.run(None, {"X": np.eye(size)})[0] - bias[:, None]
            return weights, bias

        @classmethod
        def _separable(cls, bb, inputs, attr, params, dims):
            """Resize as one dense matrix product per resized axis (`_weights`): exact ONNX
            semantics (antialias, any scale, cubic downsampling) for static dims and constant
            roi / scales / sizes, where TVM's Resize samples wrongly."""
            roi, scales, sizes = (cls._constant(inputs, i, params) for i in (1, 2, 3))
            if None in dims or any(v is not None and not isinstance(v, np.ndarray) for v in (roi, scales, sizes)):
                return None
            rank = len(dims)
            roi = roi if isinstance(roi, np.ndarray) and roi.size == 2 * rank else None
            scales = scales if isinstance(scales, np.ndarray) and scales.size == rank else None
            sizes = sizes if isinstance(sizes, np.ndarray) and sizes.size == rank else None
            if scales is None and sizes is None:
                return None
            x = inputs[0]
            dtype = str(x.ty.dtype)
            work = dtype if dtype in ("float32", "float64") else "float32"
            y = relax.op.astype(x, work) if work != dtype else x
            for axis in range(rank):
                scale = None if scales is None else float(scales[axis])
                out = None if sizes is None else int(sizes[axis])
                axis_roi = None if roi is None else [float(roi[axis]), 0.0, float(roi[rank + axis]), 1.0]
                weights, bias = cls._weights(attr, dims[axis], axis_roi, scale, out)
                if weights.shape == (dims[axis], dims[axis]) and np.array_equal(weights, np.eye(dims[axis])) \
                        and not bias.any():
                    continue
                perm = [a for a in range(rank) if a != axis] + [axis]
                moved = relax.op.permute_dims(y, perm)
                product = relax.op.matmul(moved, relax.const(weights.T.astype(work)))
                if bias.any():
                    product = relax.op.add(product, relax.const(bias.astype(work)))
                back = [perm.index(a) for a in range(rank)]
                y = bb.normalize(relax.op.permute_dims(product, back))
            return relax.op.astype(y, dtype) if work != dtype else y

        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            if "axes" in attr or attr.get("keep_aspect_ratio_policy", b"stretch") not in (b"stretch", "stretch"):
                inputs, attr = cls._full_rank(bb, inputs, attr, params)
            scales = onnx_frontend.get_constant(inputs[2], params) if len(inputs) > 2 and inputs[2] is not None \
                else None
            values = scales.value.numpy() if isinstance(scales, tvm.ir.GenericConst) else None
            dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in inputs[0].ty.shape]
            mode = attr.get("coordinate_transformation_mode", b"half_pixel")
            mode = mode.decode("ascii") if isinstance(mode, bytes) else mode
            sampling = attr.get("mode", b"nearest")
            sampling = sampling.decode("ascii") if isinstance(sampling, bytes) else sampling
            fractional = values is not None and values.size and mode not in ("align_corners", "tf_crop_and_resize") \
                and any(d is not None and not float(d * v).is_integer() for d, v in zip(dims, values.tolist()))
            sizes = cls._constant(inputs, 3, params)
            shrinks = (values is not None and values.size and (values < 1).any()) or (
                isinstance(sizes, np.ndarray) and sizes.size == len(dims)
                and any(d is not None and int(o) < d for d, o in zip(dims, sizes)))
            outs = [int(o) for o in sizes] if isinstance(sizes, np.ndarray) and sizes.size == len(dims) else [
                None if d is None or values is None or not values.size else int(np.floor(d * float(v)))
                for d, v in zip(dims, values.tolist() if values is not None and values.size else dims)]
            single = mode == "align_corners" and 1 in outs
            if attr.get("antialias", 0) or fractional or (sampling == "cubic" and shrinks) or single:
                # TVM's Resize ignores antialias, samples by out/in instead of the scale, its cubic
                # downsampling differs from ONNX's, and align_corners to one pixel divides by
                # zero (out - 1) in it: exact per-axis weights instead.
                separable = cls._separable(bb, inputs, {**attr, "coordinate_transformation_mode": mode,
                                                        "mode": sampling}, params, dims)
                if separable is not None:
                    return separable
            if attr.get("antialias", 0) and (values is None or (values < 1).any()):
                raise ValueError("Resize with antialias=1 is not supported: TVM's Resize ignores antialias")
            if values is not None and values.size and mode not in ("align_corners", "tf_crop_and_resize"):
                for dim, scale in zip(dims, values.tolist()):
                    if dim is None or float(dim * scale).is_integer():
                        continue
                    raise ValueError(
                        f"Resize by scales {values.tolist()} of dims {dims} is not supported: {dim} x {scale} "
                        "is not a whole number of pixels and TVM's Resize then samples with out/in "
                        "instead of the scale (ONNX); give sizes, or scales that divide evenly")
            if sampling == "nearest" and mode in ("half_pixel", "pytorch_half_pixel"):
                try:
                    cls._refuse_inexact_ties(dims, sizes, values)
                except ValueError:
                    separable = cls._separable(bb, inputs, {**attr, "coordinate_transformation_mode": mode,
                                                            "mode": sampling}, params, dims)
                    if separable is None:
                        raise
                    return separable
            return super()._impl_v18(bb, inputs, attr, params)

        @classmethod
        def _refuse_inexact_ties(cls, dims, sizes, scales):
            """Nearest with half-pixel coordinates lands exactly between two pixels when in / gcd is
            even and out / gcd odd (e.g. 2 -> 7: (x + 0.5) / 3.5 - 0.5 = 0.5); ONNX rounds that exact
            tie by nearest_mode, TVM (through in / out, inexact: 2/7) picked the other pixel on
            ONNX's upsampling cases. Refused for upsampling where in / out is not exact in float32;
            downsampling with such ties (4 -> 3) matched ONNX's cases and stays."""
            if isinstance(sizes, np.ndarray) and sizes.size == len(dims):
                outs = [int(v) for v in sizes]
            elif isinstance(scales, np.ndarray) and scales.size == len(dims):
                outs = [None if d is None else int(np.floor(d * float(v))) for d, v in zip(dims, scales)]
            else:
                return
            for size, out in zip(dims, outs):
                if size is None or out is None or out <= size:
                    continue
                g = math.gcd(size, out)
                exact = float(np.float32(size / out)) * out == size
                if (size // g) % 2 == 0 and (out // g) % 2 == 1 and not exact:
                    raise ValueError(
                        f"nearest Resize of {size} to {out} pixels is not supported: some output pixels "
                        "fall exactly between two inputs, where TVM's rounded in/out picks the other one")

    return ResizeConverter


def _make_prelu_converter():
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    base = onnx_frontend._get_convert_map()["PRelu"]

    class PReluConverter(base):
        """PRelu before opset 7 applies a 1-D slope of C values along the channel axis (axis 1;
        PyTorch's multi-parameter PReLU exports so); TVM applied every 1-D slope along the last
        axis and failed on them. Opset 7+ (numpy broadcasting) is TVM's."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, slope = inputs[0], inputs[1]
            shape, slope_shape = list(x.ty.shape), list(slope.ty.shape)
            if len(shape) > 2 and len(slope_shape) == 1 and int(slope_shape[0]) != 1:
                return relax.op.nn.prelu(x, slope, 1)
            return base._impl_v1(bb, inputs, attr, params)

        @classmethod
        def _impl_v7(cls, bb, inputs, attr, params):
            return base._impl_v1(bb, inputs, attr, params)

    return PReluConverter


def _make_integer_converters() -> dict:
    """ConvInteger, QLinearConv and QLinearMatMul (absent in TVM 0.27), as onnxruntime computes
    them: int32 accumulation of (x - x_zero_point) (w - w_zero_point) (exact), then for the QLinear
    ops the real-valued result acc * (x_scale * w_scale / y_scale) (per-channel / per-row /
    per-column scales and zero points broadcast) rounded half to even, plus y_zero_point,
    saturated (TVM's own quantize, which passes ONNX's QuantizeLinear cases). Padding is zero in
    the (x - x_zero_point) domain, i.e. the zero point, as onnxruntime pads."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    conv = onnx_frontend._get_convert_map()["Conv"]

    def present(inputs, index):
        return inputs[index] if len(inputs) > index and inputs[index] is not None else None

    def along(t, source, axis, ndim):
        """`t` (computed from the input `source`): when `source` is 1-D (per axis), shaped to
        broadcast along `axis` of an `ndim`-D result."""
        if axis is None or len(source.ty.shape) != 1 or ndim < 2:
            return t
        shape = [1] * ndim
        shape[axis] = int(source.ty.shape[0])
        return relax.op.reshape(t, shape)

    def centred(x, zero_point, axis=None, ndim=None):
        wide = relax.op.astype(x, "int32")
        if zero_point is None:
            return wide
        return relax.op.subtract(wide, along(relax.op.astype(zero_point, "int32"), zero_point, axis, ndim))

    def f32(t, axis=None, ndim=None):
        return along(relax.op.astype(t, "float32"), t, axis, ndim)

    def requantize(acc, multiplier, y_zero_point):
        scaled = relax.op.multiply(relax.op.astype(acc, "float32"), multiplier)
        zero = y_zero_point if y_zero_point is not None else relax.const(0, "uint8")
        dtype = str(zero.ty.dtype)
        if len(zero.ty.shape):
            zero = relax.op.reshape(zero, ())
        return relax.op.quantize(scaled, relax.const(1.0, "float32"), zero, axis=-1, out_dtype=dtype)

    def convolve(bb, x, w, attr, params):
        return bb.normalize(conv._impl_v11(bb, [bb.normalize(x), bb.normalize(w), None], dict(attr), params))

    class ConvIntegerConverter(OnnxOpConverter):
        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            ndim = len(inputs[1].ty.shape)
            x = centred(inputs[0], present(inputs, 2))
            w = centred(inputs[1], present(inputs, 3), 0, ndim)  # per output channel
            return convolve(bb, x, w, attr, params)

    class QLinearConvConverter(OnnxOpConverter):
        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            ndim = len(inputs[3].ty.shape)
            x = centred(inputs[0], present(inputs, 2))
            w = centred(inputs[3], present(inputs, 5), 0, ndim)
            acc = convolve(bb, x, w, attr, params)
            bias = present(inputs, 8)
            if bias is not None:
                acc = relax.op.add(acc, along(relax.op.astype(bias, "int32"), bias, 1, ndim))
            multiplier = relax.op.divide(relax.op.multiply(f32(inputs[1]), f32(inputs[4], 1, ndim)), f32(inputs[6]))
            return requantize(acc, multiplier, present(inputs, 7))

    class QLinearMatMulConverter(OnnxOpConverter):
        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            a, b = inputs[0], inputs[3]
            rank = len(a.ty.shape)
            a32 = centred(a, present(inputs, 2), rank - 2, rank)  # per row of a
            b32 = centred(b, present(inputs, 5))  # per column of b: broadcasts along the last axis
            acc = relax.op.matmul(a32, b32, out_dtype="int32")
            out_rank = max(rank, len(b.ty.shape))
            multiplier = relax.op.divide(
                relax.op.multiply(f32(inputs[1], out_rank - 2, out_rank), f32(inputs[4])), f32(inputs[6]))
            return requantize(acc, multiplier, present(inputs, 7))

    return {"ConvInteger": ConvIntegerConverter, "QLinearConv": QLinearConvConverter,
            "QLinearMatMul": QLinearMatMulConverter}


def _constant_ints(value, params, op: str, what: str) -> list[int]:
    """The integers of a constant input (a graph input feeding it is specialised per value at
    run, `frontend.VALUE_INPUTS`); a ValueError naming `op` and `what` otherwise."""
    import tvm
    from tvm.relax.frontend.onnx.onnx_frontend import get_constant

    constant = get_constant(value, params)
    if not isinstance(constant, tvm.ir.GenericConst):
        raise ValueError(f"{op} needs its {what} as a constant")
    return [int(v) for v in constant.value.numpy().reshape(-1)]


def _constant_int(value, params, op: str, what: str) -> int:
    values = _constant_ints(value, params, op, what)
    if len(values) != 1:
        raise ValueError(f"{op} needs its {what} as a constant scalar")
    return values[0]


def _make_cumprod_converter():
    from tvm import relax, topi
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class CumProdConverter(OnnxOpConverter):
        """CumProd (opset 26, absent in TVM 0.27): TVM's CumSum converter with cumprod; the axis
        must be a constant (a graph input is specialised per value at run)."""

        @classmethod
        def _impl_v26(cls, bb, inputs, attr, params):
            axis = _constant_int(inputs[1], params, "CumProd", "axis")
            data, reverse = inputs[0], attr.get("reverse", 0) != 0
            if reverse:
                data = bb.emit_te(topi.flip, data, axis=axis)
            data = bb.normalize(relax.op.cumprod(data, axis, exclusive=attr.get("exclusive", 0) != 0))
            return bb.emit_te(topi.flip, data, axis=axis) if reverse else data

    return CumProdConverter


def _make_bitcast_converter():
    import onnx
    from tvm import relax, topi
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class BitCastConverter(OnnxOpConverter):
        """BitCast (opset 26, absent in TVM 0.27): the same bits as another type of equal width."""

        @classmethod
        def _impl_v26(cls, bb, inputs, attr, params):
            target = onnx.helper.tensor_dtype_to_np_dtype(attr["to"])
            dtype = "bfloat16" if target.name == "bfloat16" else str(target)
            source = str(inputs[0].ty.dtype)
            if "bool" in (dtype, source):  # TVM's bool is not a byte: the byte's value, as a cast
                return relax.op.astype(inputs[0], dtype)
            return bb.emit_te(topi.reinterpret, inputs[0], dtype)

    return BitCastConverter


def _make_reverse_sequence_converter():
    from tvm import te, tirx
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def reverse(x, lengths, time_axis: int, batch_axis: int):
        def element(*index):
            t = index[time_axis].astype("int64")
            steps = tirx.Cast("int64", x.shape[time_axis])
            # onnxruntime refuses lengths outside [0, steps]; clamped here (no run-time error).
            length = tirx.max(tirx.min(lengths[index[batch_axis]].astype("int64"), steps), tirx.const(0, "int64"))
            source = list(index)
            source[time_axis] = tirx.Select(t < length, length - 1 - t, t)
            return x(*source)

        return te.compute(x.shape, element, name="reverse_sequence")

    class ReverseSequenceConverter(OnnxOpConverter):
        """ReverseSequence (absent in TVM 0.27's importer): per batch entry b, its first
        sequence_lens[b] steps along time_axis reversed, the rest copied."""

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            time_axis, batch_axis = attr.get("time_axis", 0), attr.get("batch_axis", 1)
            if sorted((time_axis, batch_axis)) != [0, 1]:
                raise ValueError(f"ReverseSequence: time_axis {time_axis} and batch_axis {batch_axis} must be 0 and 1")
            return bb.emit_te(reverse, inputs[0], inputs[1], time_axis, batch_axis)

    return ReverseSequenceConverter


def _make_col2im_converter():
    from tvm import te, tirx
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def col2im(x, image, block, dilations, pads, strides):
        rank, per_channel = len(image), math.prod(block)
        blocks = [(image[i] + pads[i] + pads[i + rank] - (dilations[i] * (block[i] - 1) + 1)) // strides[i] + 1
                  for i in range(rank)]
        columns = math.prod(blocks)
        offsets = [te.reduce_axis((0, block[i]), name=f"k{i}") for i in range(rank)]

        def element(n, c, *position):
            valid, kernel, column = tirx.const(True, "bool"), 0, 0
            for i in range(rank):  # row-major positions of the kernel offset and of the block
                p = position[i] + pads[i] - offsets[i] * dilations[i]
                q = tirx.floordiv(p, strides[i])
                valid = tirx.all(valid, p >= 0, tirx.floormod(p, strides[i]) == 0, q < blocks[i])
                kernel = kernel * block[i] + offsets[i]
                column = column * blocks[i] + tirx.max(q, 0)
            value = x[n, c * per_channel + kernel, tirx.min(column, columns - 1)]
            return te.sum(tirx.Select(valid, value, tirx.const(0, x.dtype)), axis=offsets)

        shape = [x.shape[0], x.shape[1] // per_channel, *image]
        return te.compute(shape, element, name="col2im")

    class Col2ImConverter(OnnxOpConverter):
        """Col2Im (absent in TVM 0.27): each output pixel sums the columns whose blocks cover it;
        image_shape and block_shape must be constants (graph inputs are specialised per value)."""

        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            image = _constant_ints(inputs[1], params, "Col2Im", "image_shape")
            block = _constant_ints(inputs[2], params, "Col2Im", "block_shape")
            rank = len(image)
            dilations = list(attr.get("dilations", [1] * rank))
            pads = list(attr.get("pads", [0] * 2 * rank))
            strides = list(attr.get("strides", [1] * rank))
            if len(block) != rank or len(dilations) != rank or len(strides) != rank or len(pads) != 2 * rank:
                raise ValueError(f"Col2Im: image_shape {image}, block_shape {block}, dilations {dilations}, "
                                 f"strides {strides} and pads {pads} disagree on the number of spatial dims")
            return bb.emit_te(col2im, inputs[0], image, block, dilations, pads, strides)

    return Col2ImConverter


def _dft_rotation(k, n, length: int):
    """(cos, sin) of 2 pi k n / length in float64, the angle reduced as an integer k n mod length
    first (exact for any k, n)."""
    from tvm import tirx

    turn = tirx.floormod(k.astype("int64") * n.astype("int64"), length).astype("float64")
    angle = turn * tirx.const(2.0 * math.pi / length, "float64")
    return tirx.cos(angle), tirx.sin(angle)


def _dft_term(real, imag, cos, sin, part, inverse: bool = False):
    """Part 0 (real) or 1 (imaginary) of (real + i imag) e^(-+i angle) (+ for the inverse)."""
    from tvm import tirx

    if inverse:
        return tirx.Select(part == 0, real * cos - imag * sin, imag * cos + real * sin)
    return tirx.Select(part == 0, real * cos + imag * sin, imag * cos - real * sin)


def _make_dft_converter():
    from tvm import te, tirx
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def dft(x, axis: int, length: int, inverse: bool, onesided: bool):
        """numpy's fft / ifft / (onesided) rfft / (onesided inverse) irfft along `axis` of
        x [..., 1 or 2] (real, or (real, imaginary) pairs), as a direct sum in float64 (an
        O(n^2) transform: exact to float32 rounding; the angle is reduced as an integer k*n mod
        n first). Output [..., 2], or [..., 1] for irfft."""
        complex_input = int(x.shape[-1]) == 2
        given = int(x.shape[axis])
        irfft = inverse and onesided
        if irfft:
            out_len, terms = length, min(given, length // 2 + 1)
        else:
            out_len, terms = (length // 2 + 1 if onesided else length), min(given, length)
        r = te.reduce_axis((0, terms), name="n")

        def element(*index):
            k, part = index[axis], index[-1]

            def at(n, which):
                source = list(index)
                source[axis], source[-1] = n, which
                return x(*source).astype("float64")

            cos, sin = _dft_rotation(k, r.var, length)
            real = at(r.var, 0)
            imag = at(r.var, 1) if complex_input else tirx.const(0.0, "float64")
            if irfft:  # x[k] = 1/N sum_n w_n Re(X[n] e^(i 2 pi k n / N)), Hermitian weights
                weight = tirx.Select(tirx.any(r.var == 0, r.var * 2 == length), tirx.const(1.0, "float64"),
                                     tirx.const(2.0, "float64"))
                term = weight * (real * cos - imag * sin) / length
            else:
                term = _dft_term(real, imag, cos, sin, part, inverse)
                term = term / length if inverse else term
            return te.sum(term, axis=r)

        shape = list(x.shape)
        shape[axis], shape[-1] = out_len, 1 if irfft else 2
        wide = te.compute(shape, element, name="dft")
        return te.compute(shape, lambda *i: wide(*i).astype(x.dtype), name="dft_cast")

    class DFTConverter(OnnxOpConverter):
        """DFT (absent in TVM 0.27) with numpy's (and onnxruntime's) semantics; dft_length and
        (opset 20) axis must be constants (graph inputs are specialised per value)."""

        @classmethod
        def _convert(cls, bb, inputs, attr, params, axis):
            x = inputs[0]
            rank = len(x.ty.shape)
            if int(x.ty.shape[-1]) not in (1, 2):
                raise ValueError(f"DFT: the input's last dim must be 1 (real) or 2 (complex), got {x.ty.shape[-1]}")
            axis = axis + rank if axis < 0 else axis
            if not 0 < axis < rank - 1 and not (axis == 0 and rank > 1):
                raise ValueError(f"DFT: axis {axis} is outside the signal dims of a rank-{rank} input")
            inverse, onesided = bool(attr.get("inverse", 0)), bool(attr.get("onesided", 0))
            given = int(x.ty.shape[axis])
            if len(inputs) > 1 and inputs[1] is not None:
                length = _constant_int(inputs[1], params, "DFT", "dft_length")
            else:
                length = 2 * (given - 1) if inverse and onesided else given
            if length < 1:
                raise ValueError(f"DFT: dft_length must be positive, got {length}")
            return bb.emit_te(dft, x, axis, length, inverse, onesided)

        @classmethod
        def _impl_v17(cls, bb, inputs, attr, params):
            return cls._convert(bb, inputs, attr, params, int(attr.get("axis", 1)))

        @classmethod
        def _impl_v20(cls, bb, inputs, attr, params):
            axis = _constant_int(inputs[2], params, "DFT", "axis") if len(inputs) > 2 and inputs[2] is not None else -2
            return cls._convert(bb, inputs, attr, params, axis)

    return DFTConverter


def _make_stft_converter():
    from tvm import te, tirx
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def stft(x, window, step: int, length: int, onesided: bool):
        """Frames of `window`'s size every `step` samples (zeros past the signal's end), weighted by
        the window, each a DFT of `length` points (as the DFT converter: a direct float64 sum):
        [batch, frames, bins, 2], as the onnx reference and onnxruntime compute it."""
        samples = int(x.shape[1])
        size = int(window.shape[0]) if window is not None else length
        frames = 1 + (samples - length) // step
        bins = length // 2 + 1 if onesided else length
        complex_input = int(x.shape[-1]) == 2
        r = te.reduce_axis((0, min(size, length)), name="n")

        def element(b, f, k, part):
            t = f * step + r.var
            inside = t < samples
            t = tirx.min(t, samples - 1)
            weight = window[r.var].astype("float64") if window is not None else tirx.const(1.0, "float64")
            zero = tirx.const(0.0, "float64")
            real = tirx.Select(inside, x[b, t, 0].astype("float64") * weight, zero)
            imag = tirx.Select(inside, x[b, t, 1].astype("float64") * weight, zero) if complex_input else zero
            cos, sin = _dft_rotation(k, r.var, length)
            return te.sum(_dft_term(real, imag, cos, sin, part), axis=r)

        shape = [x.shape[0], frames, bins, 2]
        wide = te.compute(shape, element, name="stft")
        return te.compute(shape, lambda *i: wide(*i).astype(x.dtype), name="stft_cast")

    class STFTConverter(OnnxOpConverter):
        """STFT (absent in TVM 0.27): frame_step and frame_length must be constants (graph inputs
        are specialised per value); the window may be a run-time input."""

        @classmethod
        def _impl_v17(cls, bb, inputs, attr, params):
            x = inputs[0]
            if len(x.ty.shape) != 3 or int(x.ty.shape[-1]) not in (1, 2):
                raise ValueError(f"STFT: the signal must be [batch, samples, 1 or 2], got {list(x.ty.shape)}")
            window = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
            step = _constant_int(inputs[1], params, "STFT", "frame_step")
            if len(inputs) > 3 and inputs[3] is not None:
                length = _constant_int(inputs[3], params, "STFT", "frame_length")
            else:
                length = int(window.ty.shape[0]) if window is not None else int(x.ty.shape[1])
            if step < 1 or length < 1 or length > int(x.ty.shape[1]):
                raise ValueError(f"STFT: frame_step {step} and frame_length {length} must be positive, "
                                 f"the frame no longer than the signal ({x.ty.shape[1]})")
            onesided = bool(attr.get("onesided", 1))
            if window is None:
                return bb.emit_te(lambda signal: stft(signal, None, step, length, onesided), x)
            return bb.emit_te(stft, x, window, step, length, onesided)

    return STFTConverter


def _make_deform_conv_converter():
    from tvm import te, tirx
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def deform_conv(x, w, offset, bias, mask, strides, pads, dilations, group: int, offset_group: int):
        """2-D deformable convolution (torchvision's and onnxruntime's): each kernel tap samples x
        bilinearly at its grid position plus its learned offset (zero outside the image), times
        the tap's mask, in float32 sums."""
        n_, channels, height, width = (int(d) for d in x.shape)
        out_channels, per_group, kh_, kw_ = (int(d) for d in w.shape)
        out_h = (height + pads[0] + pads[2] - (dilations[0] * (kh_ - 1) + 1)) // strides[0] + 1
        out_w = (width + pads[1] + pads[3] - (dilations[1] * (kw_ - 1) + 1)) // strides[1] + 1
        taps = kh_ * kw_
        per_offset_group = channels // offset_group
        rc = te.reduce_axis((0, per_group), name="c")
        rh = te.reduce_axis((0, kh_), name="kh")
        rw = te.reduce_axis((0, kw_), name="kw")

        def f32(value):
            return value.astype("float32") if value.dtype != "float32" else value

        def element(n, oc, oh, ow):
            c = oc // (out_channels // group) * per_group + rc
            tap = rh * kw_ + rw
            g = c // per_offset_group
            y = f32(offset[n, g * 2 * taps + 2 * tap, oh, ow]) + (oh * strides[0] - pads[0] + rh * dilations[0]).astype("float32")
            xx = f32(offset[n, g * 2 * taps + 2 * tap + 1, oh, ow]) + (ow * strides[1] - pads[1] + rw * dilations[1]).astype("float32")
            y0, x0 = tirx.floor(y), tirx.floor(xx)
            dy, dx = y - y0, xx - x0
            iy, ix = y0.astype("int32"), x0.astype("int32")

            def corner(cy, cx, weight):
                inside = tirx.all(cy >= 0, cy < height, cx >= 0, cx < width)
                value = f32(x[n, c, tirx.max(tirx.min(cy, height - 1), 0), tirx.max(tirx.min(cx, width - 1), 0)])
                return tirx.Select(inside, value * weight, tirx.const(0.0, "float32"))

            one = tirx.const(1.0, "float32")
            sample = (corner(iy, ix, (one - dy) * (one - dx)) + corner(iy, ix + 1, (one - dy) * dx)
                      + corner(iy + 1, ix, dy * (one - dx)) + corner(iy + 1, ix + 1, dy * dx))
            # Positions at or beyond one pixel outside the image sample 0 (torchvision's rule).
            sample = tirx.Select(tirx.all(y > -1.0, y < float(height), xx > -1.0, xx < float(width)), sample,
                                 tirx.const(0.0, "float32"))
            if mask is not None:
                sample = sample * f32(mask[n, g * taps + tap, oh, ow])
            return te.sum(f32(w[oc, rc, rh, rw]) * sample, axis=[rc, rh, rw])

        acc = te.compute((n_, out_channels, out_h, out_w), element, name="deform_conv")
        if bias is not None:
            return te.compute(acc.shape, lambda n, o, i, j: (acc[n, o, i, j] + f32(bias[o])).astype(x.dtype),
                              name="deform_conv_bias")
        return te.compute(acc.shape, lambda *i: acc(*i).astype(x.dtype), name="deform_conv_cast")

    class DeformConvConverter(OnnxOpConverter):
        """DeformConv (absent in TVM 0.27), 2-D, static shapes."""

        @classmethod
        def _impl_v19(cls, bb, inputs, attr, params):
            x, w, offset = inputs[0], inputs[1], inputs[2]
            bias = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
            mask = inputs[4] if len(inputs) > 4 and inputs[4] is not None else None
            if len(x.ty.shape) != 4 or not all(isinstance(d, tirx.IntImm) for v in (x, w, offset) for d in v.ty.shape):
                raise ValueError("DeformConv: only 2-D deformable convolution with static shapes is supported")
            strides = list(attr.get("strides", [1, 1]))
            pads = list(attr.get("pads", [0, 0, 0, 0]))
            dilations = list(attr.get("dilations", [1, 1]))
            group, offset_group = int(attr.get("group", 1)), int(attr.get("offset_group", 1))

            def call(*args):
                values = list(args[:3])
                rest = list(args[3:])
                b = rest.pop(0) if bias is not None else None
                m = rest.pop(0) if mask is not None else None
                return deform_conv(*values, b, m, strides, pads, dilations, group, offset_group)

            operands = [x, w, offset] + [v for v in (bias, mask) if v is not None]
            return bb.emit_te(call, *operands)

    return DeformConvConverter


def _make_inference_only_converters() -> dict:
    """Converters TVM 0.27 gets wrong, refused or fixed by name: SpaceToDepth's CRD mode (opset 28;
    TVM always used DCR's order), BatchNormalization with training_mode=1 and Dropout in training
    mode (TVM computed the inference forms: wrong statistics, no dropping), OneHot with a float
    depth (TVM failed), float Mod with fmod=0, ConvTranspose's output_shape, RoiAlign's max mode."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    table = onnx_frontend._get_convert_map()

    class SpaceToDepthConverter(table["SpaceToDepth"]):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if attr.get("mode", b"DCR").decode("ascii") != "CRD":
                return super()._impl_v1(bb, inputs, attr, params)
            block = int(attr["blocksize"])
            b, c, h, w = inputs[0].ty.shape
            x = relax.op.reshape(inputs[0], (b, c, h // block, block, w // block, block))
            x = relax.op.permute_dims(x, [0, 1, 3, 5, 2, 4])  # channel-major: c, then the block offsets
            return relax.op.reshape(x, (b, c * block * block, h // block, w // block))

    class BatchNormalizationConverter(table["BatchNormalization"]):
        @classmethod
        def _impl_v15(cls, bb, inputs, attr, params):
            if attr.get("training_mode", 0):
                raise ValueError("BatchNormalization with training_mode=1 is not supported (inference only: "
                                 "TVM would normalise with the running statistics)")
            return super()._impl_v15(bb, inputs, attr, params)

    class DropoutConverter(table["Dropout"]):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            training = inputs[2] if len(inputs) > 2 else None
            ratio = onnx_frontend.get_constant(inputs[1], params) if len(inputs) > 1 and inputs[1] is not None \
                else None
            keeps_all = isinstance(ratio, tvm.ir.GenericConst) and not ratio.value.numpy().any()
            if training is not None and not keeps_all:
                value = onnx_frontend.get_constant(training, params)
                if not isinstance(value, tvm.ir.GenericConst) or bool(value.value.numpy().any()):
                    raise ValueError("Dropout in training mode (or with a run-time training_mode) is not "
                                     "supported (inference only: TVM would not drop anything)")
            return super()._impl_v12(bb, inputs, attr, params)

    class OneHotConverter(table["OneHot"]):
        """Depth of any numeric type, scalar or [1] (ONNX casts it to int64; TVM failed on a
        float one), and on/off values of the values input's own type."""

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            depth = onnx_frontend.get_constant(inputs[1], params)
            values = onnx_frontend.get_constant(inputs[2], params)
            if not isinstance(depth, tvm.ir.GenericConst) or not isinstance(values, tvm.ir.GenericConst):
                raise ValueError("OneHot needs its depth and values as constants")
            depth = int(depth.value.numpy().reshape(-1)[0])
            array = values.value.numpy().reshape(-1)
            dtype = str(array.dtype)
            off, on = (relax.prim_value(tvm.tirx.const(v.item(), dtype)) for v in array[:2])
            indices = inputs[0]
            if not str(indices.ty.dtype).startswith(("int", "uint")):  # ONNX: cast to int64 first
                indices = bb.normalize(relax.op.astype(indices, "int64"))
            extent = relax.const(depth, str(indices.ty.dtype))
            indices = onnx_frontend._normalize_negative_indices(bb, indices, extent)
            axis = attr.get("axis", -1)
            if axis < 0:  # of the output, one rank more than the indices
                axis += len(indices.ty.shape) + 1
            return relax.op.one_hot(indices, on, off, depth, axis)

    class ModConverter(table["Mod"]):
        """Float Mod with fmod=0 (the result takes the divisor's sign, as Python's %): from the
        truncated remainder, plus the divisor where the signs differ, a zero signed as the
        divisor. TVM's x - floor(x / y) * y gave NaN for x mod +-inf (ONNX: x, or +-inf) and lost
        the sign of zero results."""

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            x, y = inputs[0], inputs[1]
            dtype = str(x.ty.dtype)
            if attr.get("fmod", 0) != 0 or not dtype.startswith(("float", "bfloat")):
                return super()._impl_v10(bb, inputs, attr, params)
            # Comparisons straight into where (no boolean arithmetic: TVM 0.27's LLVM codegen
            # fails on vectors of booleans combined).
            zero = relax.const(0.0, dtype)
            r = bb.normalize(relax.op.mod(x, y))  # truncated: fmod
            shifted = relax.op.add(r, y)
            signed_zero = relax.op.where(relax.op.less(y, zero), relax.const(-0.0, dtype), zero)
            return relax.op.where(
                relax.op.less(r, zero), relax.op.where(relax.op.greater(y, zero), shifted, r),
                relax.op.where(relax.op.greater(r, zero), relax.op.where(relax.op.less(y, zero), shifted, r),
                               relax.op.where(relax.op.equal(r, zero), signed_zero, r)))

    class ConvTransposeConverter(table["ConvTranspose"]):
        """`output_shape` sets the pads (ONNX's formula; TVM ignored it and returned the shape of
        the given pads)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if "output_shape" not in attr:
                return super()._impl_v1(bb, inputs, attr, params)
            attr = dict(attr)
            sizes = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in list(inputs[0].ty.shape)[2:]]
            spatial = len(sizes)
            wanted = list(attr.pop("output_shape"))[-spatial:]
            if None in sizes:
                raise ValueError("ConvTranspose with output_shape needs static spatial input dims")
            strides = attr.get("strides", [1] * spatial)
            dilations = attr.get("dilations", [1] * spatial)
            output_padding = attr.get("output_padding", [0] * spatial)
            kernel = list(attr.get("kernel_shape", [int(k) for k in inputs[1].ty.shape.values[2:]]))
            mode = attr.pop("auto_pad", b"NOTSET")
            mode = mode.decode("utf-8") if isinstance(mode, bytes) else mode
            begin, end = [], []
            for i in range(spatial):
                total = strides[i] * (sizes[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 - wanted[i]
                first = total // 2 if mode == "SAME_UPPER" else total - total // 2
                first = first if total >= 0 else 0  # beyond the inputs: every extra row at the end (onnxruntime)
                begin.append(first)
                end.append(total - first)
            if min(begin + end) >= 0:
                attr["pads"] = begin + end
                return super()._impl_v1(bb, inputs, attr, params)
            # An output larger than the inputs reach: negative pads, i.e. rows no input touches
            # (0, then the bias), as onnxruntime and the reference give them.
            attr["pads"] = [max(p, 0) for p in begin + end]
            y = bb.normalize(super()._impl_v1(bb, [inputs[0], inputs[1], None], attr, params))
            width = [0, 0, 0, 0] + [w for b, e in zip(begin, end) for w in (max(-b, 0), max(-e, 0))]
            y = relax.op.nn.pad(y, width)
            bias = inputs[2] if len(inputs) > 2 else None
            if bias is not None:
                y = relax.op.add(y, relax.op.reshape(bias, [1, -1] + [1] * spatial))
            return y

    class RoiAlignConverter(table["RoiAlign"]):
        """mode=max refused by name: TVM's max pooling of the samples differs from onnxruntime's
        (which takes the max of the bilinear terms; 0.4 off on ONNX's own case)."""

        @classmethod
        def _refuse_max(cls, attr):
            mode = attr.get("mode", b"avg")
            if (mode.decode("ascii") if isinstance(mode, bytes) else mode) == "max":
                raise ValueError("RoiAlign with mode=max is not supported: TVM computes it differently "
                                 "from onnxruntime")

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            cls._refuse_max(attr)
            return super()._impl_v10(bb, inputs, attr, params)

        @classmethod
        def _impl_v16(cls, bb, inputs, attr, params):
            cls._refuse_max(attr)
            return super()._impl_v16(bb, inputs, attr, params)

    return {"SpaceToDepth": SpaceToDepthConverter, "BatchNormalization": BatchNormalizationConverter,
            "Dropout": DropoutConverter, "OneHot": OneHotConverter, "Mod": ModConverter,
            "ConvTranspose": ConvTransposeConverter, "RoiAlign": RoiAlignConverter}


def _make_fused_norm_converters() -> dict:
    """onnxruntime's fused normalisations, which its transformer optimizer writes into a model
    (com.microsoft SkipLayerNormalization / SkipSimplifiedLayerNormalization; ONNX-domain
    SimplifiedLayerNormalization, RMSNorm before opset 23). TVM 0.27 has only the first, and it
    refused it without beta and bias (the optimizer leaves them out) and returned constant 0 for the
    mean, inverse std and residual-sum outputs the next layer reads. Every output here is
    computed, in float32 for float16/bfloat16 inputs (as onnxruntime), over the last axis:

        sum = input + skip (+ bias)                  (output 3, input_skip_bias_sum)
        LayerNorm: y = (sum - mean) * inv_std * gamma (+ beta), inv_std = 1 / sqrt(var + eps)
        RMSNorm:   y = sum * inv_std * gamma,                   inv_std = 1 / sqrt(mean(sum^2) + eps)

    mean and inv_std keep the normalised axis as 1 (onnxruntime's shapes); SkipSimplified's mean
    output is 0 there (onnxruntime 1.32 writes zeros: RMSNorm has no mean)."""
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def work_dtype(x) -> str:
        dtype = str(x.ty.dtype)
        return dtype if dtype in ("float32", "float64") else "float32"

    def widen(x, work):
        return x if str(x.ty.dtype) == work else relax.op.astype(x, work)

    def statistics(x, work, axes, eps, simplified):
        if simplified:
            mean = relax.op.zeros_like(relax.op.sum(x, axes, keepdims=True))
            square = relax.op.mean(relax.op.multiply(x, x), axes, keepdims=True)
            centred = x
        else:
            mean = relax.op.mean(x, axes, keepdims=True)
            centred = relax.op.subtract(x, mean)
            square = relax.op.mean(relax.op.multiply(centred, centred), axes, keepdims=True)
        inv_std = relax.op.divide(relax.const(1.0, work), relax.op.sqrt(relax.op.add(square, relax.const(eps, work))))
        return centred, mean, inv_std

    def skip_norm(inputs, attr, simplified):
        data, skip, gamma = inputs[0], inputs[1], inputs[2]
        beta = None if simplified else (inputs[3] if len(inputs) > 3 else None)
        bias = inputs[3 if simplified else 4] if len(inputs) > (3 if simplified else 4) else None
        dtype, work = str(data.ty.dtype), work_dtype(data)
        total = relax.op.add(widen(data, work), widen(skip, work))
        if bias is not None:
            total = relax.op.add(total, widen(bias, work))
        centred, mean, inv_std = statistics(total, work, [-1], float(attr.get("epsilon", 1e-12)), simplified)
        y = relax.op.multiply(relax.op.multiply(centred, inv_std), widen(gamma, work))
        if beta is not None:
            y = relax.op.add(y, widen(beta, work))
        narrow = (lambda v: v) if dtype == work else (lambda v: relax.op.astype(v, dtype))
        return relax.Tuple([narrow(y), mean, inv_std, narrow(total)])

    class SkipLayerNormalizationConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            return skip_norm(inputs, attr, simplified=False)

    class SkipSimplifiedLayerNormalizationConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            return skip_norm(inputs, attr, simplified=True)

    class SimplifiedLayerNormalizationConverter(OnnxOpConverter):
        """Inputs X, scale; axis (default -1: the axes from it to the last), epsilon (1e-5);
        outputs Y and inv_std_var."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, scale = inputs[0], inputs[1]
            rank = len(x.ty.shape)
            axis = int(attr.get("axis", -1))
            axes = list(range(axis % rank, rank))
            dtype, work = str(x.ty.dtype), work_dtype(x)
            wide = widen(x, work)
            _centred, _mean, inv_std = statistics(wide, work, axes, float(attr.get("epsilon", 1e-5)), True)
            y = relax.op.multiply(relax.op.multiply(wide, inv_std), widen(scale, work))
            return relax.Tuple([y if dtype == work else relax.op.astype(y, dtype), inv_std])

    return {
        "SkipLayerNormalization": SkipLayerNormalizationConverter,
        "SkipSimplifiedLayerNormalization": SkipSimplifiedLayerNormalizationConverter,
        "SimplifiedLayerNormalization": SimplifiedLayerNormalizationConverter,
    }


def _make_edge_converters() -> dict:
    """Cases TVM 0.27's converters fail on or get wrong: EyeLike with a `dtype` other than its
    input's (TVM refused it), ReduceMax/ReduceMin of bool (opset 20: any/all; TVM had no identity
    for bool), Split into pieces of size 0 (TVM's split needs increasing indices), SequenceInsert at
    a negative position (one place off), SequenceLength of a computed sequence (failed), Slice
    before opset 10 (attributes; failed), and ConstantOfShape of an empty shape (a scalar: TVM
    broadcast its 1-element value to rank 0 and failed; torch's encoder-decoder exports have it)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    table = onnx_frontend._get_convert_map()

    class EyeLikeConverter(table["EyeLike"]):
        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            dtype = onnx_frontend.get_type(attr["dtype"]) if "dtype" in attr else inputs[0].ty.dtype
            return relax.op.eye_like(inputs[0], attr.get("k", 0), dtype)

    def bool_as_uint8(base):
        class BoolReduce(base):
            @classmethod
            def _on_bool(cls, impl, bb, inputs, attr, params):
                if str(inputs[0].ty.dtype) != "bool":
                    return impl(bb, inputs, attr, params)
                inputs = [relax.op.astype(inputs[0], "uint8"), *inputs[1:]]
                return relax.op.astype(impl(bb, inputs, attr, params), "bool")

            @classmethod
            def _impl_v11(cls, bb, inputs, attr, params):
                return cls._on_bool(super()._impl_v11, bb, inputs, attr, params)

            @classmethod
            def _impl_v18(cls, bb, inputs, attr, params):
                return cls._on_bool(super()._impl_v18, bb, inputs, attr, params)

        return BoolReduce

    class SplitConverter(table["Split"]):
        @classmethod
        def _pieces(cls, x, sizes, axis):
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            return relax.Tuple([
                relax.op.strided_slice(x, axes=[axis], begin=[int(b)], end=[int(b + n)])
                for b, n in zip(starts, sizes)
            ])

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            sizes = attr.get("split")
            if sizes is not None and 0 in list(sizes):
                return cls._pieces(inputs[0], list(sizes), attr.get("axis", 0))
            return super()._impl_v1(bb, inputs, attr, params)

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            sizes = onnx_frontend.get_constant(inputs[1], params) if len(inputs) > 1 and inputs[1] is not None \
                else None
            if isinstance(sizes, tvm.ir.GenericConst):
                values = sizes.value.numpy().reshape(-1).tolist()
                if 0 in values:
                    return cls._pieces(inputs[0], values, attr.get("axis", 0))
            return super()._impl_v13(bb, inputs, attr, params)

    class SequenceInsertConverter(table["SequenceInsert"]):
        """A given negative position counts from the back (-1: before the last tensor); TVM added
        1 to it as for the absent position (append), inserting one place too far."""

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            if len(inputs) == 3 and isinstance(inputs[2], tvm.ir.GenericConst):
                position = int(inputs[2].value.numpy())
                if position < 0:
                    inputs = [inputs[0], inputs[1], relax.const(len(inputs[0]) + position, "int64")]
            return super()._impl_v11(bb, inputs, attr, params)

    class SequenceLengthConverter(table["SequenceLength"]):
        """The length of any sequence whose length is known at import (TVM's took len() of its
        input and failed on a sequence computed by an op, e.g. SplitToSequence)."""

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            sequence = inputs[0] if isinstance(inputs[0], relax.Tuple) else bb.normalize(inputs[0])
            if isinstance(sequence, relax.Tuple):
                return relax.const(len(sequence), "int64")
            if isinstance(sequence.ty, relax.TupleType):
                return relax.const(len(sequence.ty.fields), "int64")
            raise ValueError("SequenceLength of a sequence whose length is not known at import")

    class SliceConverter(table["Slice"]):
        """Slice before opset 10 takes starts/ends/axes as attributes (TVM's converter has the
        input form only, and failed on them)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            starts, ends = attr["starts"], attr["ends"]
            axes = attr.get("axes", list(range(len(starts))))
            constants = [relax.const(np.array(v, np.int64)) for v in (starts, ends, axes)]
            return super()._impl_v13(bb, [inputs[0], *constants, None], {}, params)

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            return super()._impl_v13(bb, inputs, attr, params)

    class ConstantOfShapeConverter(table["ConstantOfShape"]):
        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            shape = onnx_frontend.get_constant(inputs[0], params)
            if isinstance(shape, tvm.ir.GenericConst):
                dims = [int(d) for d in shape.value.numpy().reshape(-1)]
                value = attr.get("value")
                value = onnx_frontend.get_numpy(value) if value is not None else np.zeros(1, np.float32)
                scalar = np.array(value.reshape(-1)[0], value.dtype)
                if int(np.prod(dims)) <= 1 << 16:  # small: a constant later folds see through
                    return relax.const(np.full(dims, scalar, value.dtype), str(value.dtype))
                return relax.op.broadcast_to(relax.const(scalar, str(value.dtype)), relax.ShapeExpr(dims))
            return super()._impl_v9(bb, inputs, attr, params)

    return {"EyeLike": EyeLikeConverter, "ReduceMax": bool_as_uint8(table["ReduceMax"]), "Slice": SliceConverter,
            "ConstantOfShape": ConstantOfShapeConverter,
            "ReduceMin": bool_as_uint8(table["ReduceMin"]), "Split": SplitConverter,
            "SequenceInsert": SequenceInsertConverter, "SequenceLength": SequenceLengthConverter}


def _make_tensor_scatter_converter():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class TensorScatterConverter(OnnxOpConverter):
        """TensorScatter (opset 24, KV-cache updates; absent in TVM): present = past with the
        update's `L` rows written at write_indices[b] along `axis` ("circular": modulo the cache
        length). As a gather: cache row s of batch b takes update row j = s - w[b] (mod the
        length when circular) where 0 <= j < L, else keeps the past row."""

        @classmethod
        def _impl_v24(cls, bb, inputs, attr, params):
            past, update = inputs[0], inputs[1]
            writes = inputs[2] if len(inputs) > 2 else None
            rank = len(past.ty.shape)
            axis = int(attr.get("axis", -2)) % rank
            if axis == 0:
                raise ValueError("TensorScatter along the batch axis (axis 0) is not defined")
            mode = attr.get("mode", b"linear")
            mode = mode.decode("ascii") if isinstance(mode, bytes) else mode

            n = bb.normalize  # relax's op constructors need typed arguments

            def dim(x, i):  # a dim as an int64 scalar tensor (symbolic dims included)
                shape = n(relax.op.shape_to_tensor(n(relax.op.shape_of(x))))
                return n(relax.op.take(shape, relax.const(i, "int64"), axis=0))

            length, rows = dim(past, axis), dim(update, axis)
            positions = n(relax.op.reshape(n(relax.op.arange(0, past.ty.shape[axis], 1, "int64")), (1, -1)))
            starts = n(relax.op.reshape(n(relax.op.astype(writes, "int64")), (-1, 1))) if writes is not None \
                else relax.const(np.zeros((1, 1), np.int64), "int64")
            source = n(relax.op.subtract(positions, starts))  # [B or 1, length]: update row per cache row
            if mode == "circular":
                source = n(relax.op.floor_mod(source, length))
            zero, one = relax.const(0, "int64"), relax.const(1, "int64")
            valid = n(relax.op.logical_and(n(relax.op.greater_equal(source, zero)), n(relax.op.less(source, rows))))
            source = n(relax.op.minimum(n(relax.op.maximum(source, zero)), n(relax.op.subtract(rows, one))))
            view = [source.ty.shape[0]] + [-1 if i == axis else 1 for i in range(1, rank)]
            shape = past.ty.shape
            index = n(relax.op.broadcast_to(n(relax.op.reshape(source, view)), shape))
            keep = n(relax.op.broadcast_to(n(relax.op.reshape(valid, view)), shape))
            return relax.op.where(keep, n(relax.op.gather_elements(update, index, axis)), past)

    return TensorScatterConverter


def _make_ort_fused_converters() -> dict:
    """com.microsoft ops that onnxruntime's graph optimizations write into the models it saves
    (``optimized_model_filepath``; TVM 0.27 has none of them), as onnxruntime computes them:

    * FusedMatMul: alpha * op(A) @ op(B), transA / transB swapping the last two axes
      (transBatchA / transBatchB, which move the batch axes, are refused by name);
    * FusedConv / FusedGemm: Conv (plus an optional summand Z) / Gemm, then ``activation``
      (Relu, Tanh, Sigmoid, LeakyRelu, Clip, HardSigmoid with ``activation_params``, FusedGemm's
      ``activation_alpha`` / ``activation_beta``);
    * QuickGelu: x * sigmoid(alpha * x), alpha 1.702 by default;
    * RotaryEmbedding (its LLM fusions): 3-D [B, S, hidden] or 4-D [B, heads, S, d] input rotated
      over its first 2 * cos_cache-width dims, half-split or interleaved, at position_ids [B, S] or
      offset [1] + 0..S-1.
    """
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    table = onnx_frontend._get_convert_map()

    def swap_last(x):
        rank = len(x.ty.shape)
        if rank < 2:
            return x
        return relax.op.permute_dims(x, list(range(rank - 2)) + [rank - 1, rank - 2])

    class FusedMatMulConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if attr.get("transBatchA", 0) or attr.get("transBatchB", 0):
                raise ValueError("FusedMatMul with transBatchA/transBatchB is not supported")
            a, b = inputs[0], inputs[1]
            a = swap_last(a) if attr.get("transA", 0) else a
            b = swap_last(b) if attr.get("transB", 0) else b
            y = relax.op.matmul(a, b)
            alpha = float(attr.get("alpha", 1.0))
            return y if alpha == 1.0 else relax.op.multiply(y, relax.const(alpha, str(inputs[0].ty.dtype)))

    def activate(y, attr, dtype):
        name = attr.get("activation", b"")
        name = name.decode("ascii") if isinstance(name, bytes) else name
        args = list(attr.get("activation_params", []))  # FusedConv; FusedGemm names them:
        args = args or [attr[k] for k in ("activation_alpha", "activation_beta") if k in attr]
        const = lambda v: relax.const(v, dtype)  # noqa: E731
        if not name:
            return y
        if name == "Relu":
            return relax.op.nn.relu(y)
        if name == "Tanh":
            return relax.op.tanh(y)
        if name == "Sigmoid":
            return relax.op.sigmoid(y)
        if name == "LeakyRelu":
            return relax.op.nn.leakyrelu(y, args[0] if args else 0.01)
        if name == "Clip":
            low, high = (args + [-3.4028234663852886e38, 3.4028234663852886e38][len(args):])[:2]
            return relax.op.clip(y, low, high)
        if name == "HardSigmoid":
            alpha, beta = (args + [0.2, 0.5][len(args):])[:2]
            return relax.op.clip(relax.op.add(relax.op.multiply(y, const(alpha)), const(beta)), 0.0, 1.0)
        raise ValueError(f"fused activation {name!r} is not supported")

    class FusedConvConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            conv_attr = {k: v for k, v in attr.items() if k not in ("activation", "activation_params")}
            y = table["Conv"].get_converter(11)(bb, list(inputs[:3]) + [None] * (3 - len(inputs[:3])), conv_attr, params)
            if len(inputs) > 3 and inputs[3] is not None:
                y = relax.op.add(bb.normalize(y), inputs[3])
            return activate(bb.normalize(y), attr, str(inputs[0].ty.dtype))

    class FusedGemmConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            gemm_attr = {k: v for k, v in attr.items() if not k.startswith("activation")}
            y = table["Gemm"].get_converter(13)(bb, list(inputs[:3]) + [None] * (3 - len(inputs[:3])), gemm_attr, params)
            return activate(bb.normalize(y), attr, str(inputs[0].ty.dtype))

    class QuickGeluConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            alpha = relax.const(float(attr.get("alpha", 1.702)), str(x.ty.dtype))
            return relax.op.multiply(x, relax.op.sigmoid(relax.op.multiply(x, alpha)))

    class RotaryEmbeddingConverter(OnnxOpConverter):
        """com.microsoft RotaryEmbedding(input, position_ids, cos_cache, sin_cache) (onnxruntime's
        LLM optimizer writes it; ONNX's own RotaryEmbedding-23, inputs in another order, is
        expanded to its function body before import and never reaches this converter)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, positions, cos, sin = (bb.normalize(v) for v in inputs[:4])
            if str(positions.ty.dtype).startswith("float"):
                raise ValueError("RotaryEmbedding with a float second input: ONNX's op (cos_cache second), "
                                 "not com.microsoft's (position_ids second)")
            if attr.get("is_packed_batching", 0):
                raise ValueError("RotaryEmbedding with is_packed_batching is not supported")
            if float(attr.get("scale", 1.0)) != 1.0:
                raise ValueError("RotaryEmbedding with a scale other than 1 is not supported")
            half = int(cos.ty.shape[1])
            rotary = int(attr.get("rotary_embedding_dim", 0)) or 2 * half
            if rotary != 2 * half:
                raise ValueError(f"rotary_embedding_dim {rotary} is not twice cos_cache's width {half}")
            shape = list(x.ty.shape.values)
            if len(shape) == 3:  # [B, S, heads * d] -> [B, S, heads, d]
                heads = int(attr.get("num_heads", 0))
                if not heads:
                    heads = int(shape[2]) // rotary  # head size = rotary width when num_heads is absent
                x4 = bb.normalize(relax.op.reshape(x, [shape[0], shape[1], heads, int(shape[2]) // heads]))
                seq_axis = 1
            elif len(shape) == 4:  # [B, heads, S, d]
                x4, seq_axis = x, 2
            else:
                raise ValueError(f"RotaryEmbedding input of rank {len(shape)} (3 or 4 expected)")
            head_size = int(x4.ty.shape[3])
            seq = x4.ty.shape[seq_axis]
            if len(positions.ty.shape) == 1:  # a start offset: positions offset + 0..S-1
                steps = bb.normalize(relax.op.arange(0, seq, 1, str(positions.ty.dtype)))
                positions = relax.op.add(relax.op.expand_dims(steps, 0), positions)
            angle_shape = (lambda t: relax.op.expand_dims(t, 2 if seq_axis == 1 else 1))
            c, s = (bb.normalize(angle_shape(relax.op.take(t, positions, axis=0))) for t in (cos, sin))

            def part(begin, end, step=1):
                return relax.op.strided_slice(x4, axes=[3], begin=[begin], end=[end], strides=[step])

            interleaved = bool(attr.get("interleaved", 0))
            x1, x2 = (part(0, rotary, 2), part(1, rotary, 2)) if interleaved else (part(0, half), part(half, rotary))
            dtype = str(x.ty.dtype)
            if dtype != "float32":  # half types: computed in float32, rounded once (as onnxruntime)
                x1, x2, c, s = (relax.op.astype(t, "float32") for t in (x1, x2, c, s))
            out1 = relax.op.subtract(relax.op.multiply(x1, c), relax.op.multiply(x2, s))
            out2 = relax.op.add(relax.op.multiply(x2, c), relax.op.multiply(x1, s))
            if dtype != "float32":
                out1, out2 = relax.op.astype(out1, dtype), relax.op.astype(out2, dtype)
            if interleaved:
                pairs = bb.normalize(relax.op.stack([out1, out2], axis=4))
                dims = list(pairs.ty.shape.values)
                rotated = relax.op.reshape(pairs, dims[:3] + [rotary])
            else:
                rotated = relax.op.concat([out1, out2], axis=3)
            y = rotated if rotary == head_size else relax.op.concat([rotated, part(rotary, head_size)], axis=3)
            return relax.op.reshape(y, shape) if len(shape) == 3 else y

    class MatMulNBitsConverter(OnnxOpConverter):
        """com.microsoft MatMulNBits: Y = A @ W^T (+ bias), W [N, K] block-quantized along K.
        The weights must be constants: they are dequantized at import (float weights in A's
        type, so the artifact holds them unpacked)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            inputs = list(inputs) + [None] * (6 - len(inputs))
            a, packed, scales, zero_points, g_idx, bias = inputs[:6]

            def constant(x, what):
                if x is None:
                    return None
                x = onnx_frontend.get_constant(x, params)
                if not isinstance(x, tvm.ir.GenericConst):
                    raise ValueError(f"MatMulNBits with a run-time {what} is not supported (constants only)")
                return x.value.numpy()

            k, n, bits, block = int(attr["K"]), int(attr["N"]), int(attr.get("bits", 4)), int(attr["block_size"])
            dtype = str(a.ty.dtype)
            weights = _dequantize_nbits(constant(packed, "B"), constant(scales, "scales"),
                                        constant(zero_points, "zero_points"), constant(g_idx, "g_idx"),
                                        k, n, bits, block)
            transposed = relax.const(np.ascontiguousarray(weights.T).astype(dtype))  # [K, N], rounded to A's type
            if dtype == "float32":
                y = relax.op.matmul(a, transposed)
                return relax.op.add(y, bias) if bias is not None else y
            # half types: float32 products and sums, rounded once
            y = relax.op.matmul(relax.op.astype(a, "float32"), relax.op.astype(transposed, "float32"))
            if bias is not None:
                y = relax.op.add(y, relax.op.astype(bias, "float32"))
            return relax.op.astype(y, dtype)

    return {"FusedMatMul": FusedMatMulConverter, "FusedConv": FusedConvConverter,
            "FusedGemm": FusedGemmConverter, "QuickGelu": QuickGeluConverter,
            "RotaryEmbedding": RotaryEmbeddingConverter, "MatMulNBits": MatMulNBitsConverter}


def _unpack_codes(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` unsigned `bits`-bit codes packed low-first in each row of uint8 `data`."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    codes = (data[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*data.shape[:-1], -1)[..., :count]


def _dequantize_nbits(packed, scales, zero_points, g_idx, k: int, n: int, bits: int, block: int) -> np.ndarray:
    """MatMulNBits' weights [N, K] as onnxruntime defines them: (code - zero_point) * scale per
    block of K; codes packed low-first; zero points packed the same way (uint8) or unpacked in
    the scales' type, 2^(bits - 1) when absent; g_idx (deprecated) gives each k its block."""
    if bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits with bits={bits} is not supported (2, 4 or 8)")
    blocks = -(-k // block)
    codes = _unpack_codes(packed.reshape(n, -1), bits, blocks * block)[:, :k].astype(np.float32)
    scale = scales.reshape(n, blocks).astype(np.float32)
    if zero_points is None:
        zero = np.full((n, blocks), float(1 << (bits - 1)), np.float32)
    elif zero_points.dtype == np.uint8:
        zero = _unpack_codes(zero_points.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = zero_points.reshape(n, blocks).astype(np.float32)
    index = np.arange(k) // block if g_idx is None or g_idx.size == 0 else g_idx.astype(np.int64).reshape(-1)[:k]
    return (codes - zero[:, index]) * scale[:, index]


def _make_maxpool_converter():
    import itertools

    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    base = onnx_frontend._get_convert_map()["MaxPool"]

    class MaxPoolConverter(base):
        """MaxPool's second output, Indices (TVM's converter gave none and the import failed):
        each window's first maximum in row-major window order (onnxruntime's), as a flat index
        into the unpadded input, row-major or, with storage_order=1, column-major per image.
        Built from one strided slice per kernel offset (static spatial dims); nodes without
        Indices keep TVM's pooling."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            custom = attr.get("tvm_custom", {})
            if custom.get("num_outputs", 1) < 2:
                return super()._impl_v1(bb, inputs, attr, params)
            return cls._with_indices(bb, inputs[0], attr)

        @classmethod
        def _with_indices(cls, bb, x, attr):
            shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in x.ty.shape]
            if None in shape:
                raise ValueError("MaxPool with Indices needs static input dims")
            batch, channels, sizes = shape[0], shape[1], shape[2:]
            n = len(sizes)
            kernel = list(attr["kernel_shape"])
            strides = list(attr.get("strides", [1] * n))
            dilations = list(attr.get("dilations", [1] * n))
            pads = list(attr.get("pads", [0] * 2 * n))
            mode = attr.get("auto_pad", b"NOTSET")
            mode = mode.decode("ascii") if isinstance(mode, bytes) else mode
            span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
            if mode in ("SAME_UPPER", "SAME_LOWER"):
                outs = [-(-size // st) for size, st in zip(sizes, strides)]
                total = [max((o - 1) * st + sp - size, 0) for o, st, sp, size in zip(outs, strides, span, sizes)]
                begin = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in total]
                pads = begin + [t - b for t, b in zip(total, begin)]
            elif mode == "VALID":
                pads = [0] * 2 * n
            outs = []
            for i in range(n):
                room = sizes[i] + pads[i] + pads[n + i] - span[i]
                out = (-(-room // strides[i]) if attr.get("ceil_mode", 0) else room // strides[i]) + 1
                if attr.get("ceil_mode", 0) and (out - 1) * strides[i] >= sizes[i] + pads[i]:
                    out -= 1  # a last window starting in the end padding is dropped
                outs.append(out)
            # padded with the lowest value, far enough for every window (ceil_mode included)
            ends = [max(pads[n + i], (outs[i] - 1) * strides[i] + span[i] - sizes[i] - pads[i]) for i in range(n)]
            dtype = str(x.ty.dtype)
            lowest = float("-inf") if "float" in dtype else float(np.iinfo(np.dtype(dtype)).min)
            padded = bb.normalize(relax.op.nn.pad(x, [0, 0, 0, 0] + [w for i in range(n) for w in (pads[i], ends[i])],
                                                  pad_value=lowest))
            windows = []
            for offset in itertools.product(*[range(k) for k in kernel]):
                begin = [o * d for o, d in zip(offset, dilations)]
                end = [b + (o - 1) * st + 1 for b, o, st in zip(begin, outs, strides)]
                window = relax.op.strided_slice(padded, axes=list(range(2, 2 + n)), begin=begin, end=end, strides=strides)
                windows.append(relax.op.expand_dims(bb.normalize(window), 0))
            stacked = bb.normalize(relax.op.concat(windows, axis=0))  # [K, N, C, *outs]
            values = relax.op.max(stacked, axis=0)
            chosen = bb.normalize(relax.op.astype(relax.op.argmax(stacked, axis=0), "int64"))  # first maximum
            column = bool(attr.get("storage_order", 0))
            index = None
            for i in range(n):
                inner = int(np.prod(kernel[i + 1:]))
                offset = relax.op.floor_mod(relax.op.floor_divide(chosen, relax.const(inner, "int64")),
                                            relax.const(kernel[i], "int64"))
                grid = np.arange(outs[i], dtype=np.int64).reshape([outs[i]] + [1] * (n - 1 - i)) * strides[i] - pads[i]
                position = relax.op.add(relax.op.multiply(offset, relax.const(dilations[i], "int64")), relax.const(grid, "int64"))
                weight = int(np.prod(sizes[:i])) if column else int(np.prod(sizes[i + 1:]))
                term = relax.op.multiply(position, relax.const(weight, "int64"))
                index = term if index is None else relax.op.add(index, term)
            image = np.arange(batch * channels, dtype=np.int64).reshape([batch, channels] + [1] * n) * int(np.prod(sizes))
            return relax.Tuple([values, bb.normalize(relax.op.add(index, relax.const(image, "int64")))])

    return MaxPoolConverter


def _make_ml_converters() -> dict:
    """ai.onnx.ml's elementwise/indexing ops (TVM 0.27 has no ai.onnx.ml op):
    Binarizer (1 where x > threshold, else 0, in x's type) and ArrayFeatureExtractor (the
    elements at `indices` along the last axis; a 1-D input gives a [1, k] row, as onnxruntime)."""
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class BinarizerConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            dtype = str(x.ty.dtype)
            above = relax.op.greater(x, relax.const(float(attr.get("threshold", 0.0)), dtype))
            return relax.op.astype(above, dtype)

    class ArrayFeatureExtractorConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, indices = inputs[0], inputs[1]
            taken = relax.op.take(x, bb.normalize(relax.op.reshape(indices, [-1])), axis=len(x.ty.shape) - 1)
            return relax.op.expand_dims(taken, 0) if len(x.ty.shape) == 1 else taken

    return {"Binarizer": BinarizerConverter, "ArrayFeatureExtractor": ArrayFeatureExtractorConverter}
