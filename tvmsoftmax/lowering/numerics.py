"""Relax rewrites that give the rest of the model (the part TVM lowers) onnxruntime's numerics
where TVM 0.27's default legalization differs. Run on the imported module, before legalization.

- Float ReduceMax / ReduceMin: TVM's reducers start from the lowest / highest *finite* value, so
  the max of a row of -inf is -FLT_MAX. ONNX's own Attention function body (and exporters' masks)
  test `ReduceMax(bias) == -inf` to find fully masked rows: with TVM's identity the test is never
  true and a row that must be zeros comes out NaN. Here the identities are -inf / +inf.
- Relu, Clip (HardSigmoid's too) and Sign of NaN are NaN, as in onnxruntime: TVM lowers them
  through max/min/comparisons that return the other operand (Relu(NaN) was 0, Sign(NaN) 0). A
  NaN reaching them is not exotic: a decomposed attention without its IsNaN guard gives NaN for
  a fully masked row, and onnxruntime carries it on through the layers after it.
- IsNaN and IsInf from the bits (`ops.classify`): TVM's isnan/isinf intrinsics scalarised every
  kernel they were fused into (gathers and scatters; 8x slower).
- Half-precision MatMul: TVM's legalization accumulates in the half type (one rounding per term);
  onnxruntime (MLAS) and NumPy accumulate in float32 and round once. Here a float16 / bfloat16
  MatMul accumulates in float32 and casts the result, as onnxruntime does.
- Likewise every other half-precision op that sums many terms (`WIDENED`: convolutions, sums and
  means, normalisations, average pools, cumulative sums) and every transcendental one (exp, log,
  tanh, erf, Gelu, trigonometric...): computed in float32 from the half inputs and rounded once. In a float16 ViT, TVM's half-type Conv was 12x further from the float32
  result than onnxruntime, ReduceMean 5x, LayerNormalization 2x.
- LayerNormalization in two passes (mean, then squared deviations: `ops.normalization.layer_norm`)
  summed in float64, not TVM's float32 sums and E[x^2] - E[x]^2, which lost digits whenever the mean was
  large against the spread (a 12-layer GPT-2 came out twice as far from float64 as onnxruntime,
  and outside the check's tolerance).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..ops.classify import LAYOUT, isinf, isnan
from ..ops.normalization import layer_norm
from ..ops.reduction import reduce_max, reduce_min

HALF_DTYPES = ("float16", "bfloat16")

# Elementwise ops that TVM lowers through max/min/comparisons that drop NaN (relu(NaN) = 0,
# clip(NaN) = its low bound, sign(NaN) = 0); onnxruntime returns NaN (module doc).
NAN_PASSES = {"relax.nn.relu", "relax.clip", "relax.sign"}

# Relax ops that accumulate: with half inputs they run in float32 and round once (module doc).
WIDENED = {
    "relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d", "relax.nn.conv1d_transpose",
    "relax.nn.conv2d_transpose", "relax.sum", "relax.mean", "relax.variance", "relax.cumsum",
    "relax.nn.layer_norm", "relax.nn.group_norm", "relax.nn.instance_norm", "relax.nn.rms_norm",
    "relax.nn.avg_pool1d", "relax.nn.avg_pool2d", "relax.nn.avg_pool3d", "relax.nn.adaptive_avg_pool1d",
    "relax.nn.adaptive_avg_pool2d", "relax.nn.adaptive_avg_pool3d",
    # transcendental elementwise ops (one rounding, as onnxruntime's float16 kernels): TVM's half
    # versions lost digits (float16 Gelu(-2.5) 17 ulps off, tanh of 1.2e-7 was 0) or did not
    # build at all (asin, acos, atan, asinh, acosh: no LLVM lowering of the half intrinsic)
    "relax.exp", "relax.log", "relax.sqrt", "relax.rsqrt", "relax.tanh", "relax.sigmoid", "relax.erf",
    "relax.sin", "relax.cos", "relax.tan", "relax.asin", "relax.acos", "relax.atan", "relax.sinh",
    "relax.cosh", "relax.asinh", "relax.acosh", "relax.atanh", "relax.power", "relax.nn.gelu",
    "relax.nn.gelu_tanh", "relax.nn.silu",
}


def _reduces(axis) -> bool:
    """Relax: axis None reduces every dim; an empty axis list reduces none (an identity)."""
    return axis is None or len(axis) > 0


@mutator
class _OnnxNumerics(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.ops = {
            "relax.max": reduce_max,
            "relax.min": reduce_min,
        }

    def run(self) -> tvm.IRModule:
        for gvar, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        dtype = str(call.ty.dtype) if isinstance(call.ty, relax.TensorType) else ""
        if call.op.name in self.ops and dtype.startswith(("float", "bfloat")) and _reduces(call.attrs.axis):
            return self.builder_.call_te(
                self.ops[call.op.name], call.args[0], call.attrs.axis, bool(call.attrs.keepdims),
                primfunc_name_hint=call.op.name.split(".")[1],
            )
        if call.op.name in ("relax.isnan", "relax.isinf") and _float_tensor(call.args[0]):
            return self._classify(call.op.name, call.args[0])
        if call.op.name in NAN_PASSES and dtype.startswith(("float", "bfloat")):
            x = call.args[0]
            return relax.op.where(self._classify("relax.isnan", x), x, self.builder_.emit(call))
        if call.op.name == "relax.nn.layer_norm" and dtype == "float32":
            return self._layer_norm(call)
        if call.op.name == "relax.matmul" and dtype in HALF_DTYPES and call.attrs.out_dtype is None:
            wide = self.builder_.emit(relax.op.matmul(call.args[0], call.args[1], out_dtype="float32"))
            return relax.op.astype(wide, dtype)
        if call.op.name in WIDENED and dtype in HALF_DTYPES and _no_set_out_dtype(call.attrs):
            args = [self.builder_.emit(relax.op.astype(a, "float32")) if _half_tensor(a) else a for a in call.args]
            wide = self.builder_.normalize(relax.Call(call.op, args, call.attrs, call.ty_args))
            if isinstance(wide.ty, relax.TensorType) and str(wide.ty.dtype) == "float32":
                if call.op.name == "relax.nn.layer_norm":
                    wide = self._layer_norm(wide)
                return relax.op.astype(self.builder_.emit(wide), dtype)
        return call

    def _classify(self, op_name: str, x):
        """isnan/isinf from the bits (`ops.classify`): TVM's intrinsics scalarise the kernel."""
        compute = {"relax.isnan": isnan, "relax.isinf": isinf}[op_name]
        return self.builder_.call_te(compute, x, primfunc_name_hint=op_name.split(".")[1])

    def _layer_norm(self, call):
        attrs = call.attrs
        return self.builder_.call_te(
            layer_norm, *call.args, [int(a) for a in attrs.axes], float(attrs.epsilon),
            bool(attrs.center), bool(attrs.scale), primfunc_name_hint="layer_norm",
        )


def _float_tensor(expr) -> bool:
    """A tensor of a float type `ops.classify` knows."""
    return isinstance(expr.ty, relax.TensorType) and str(expr.ty.dtype) in LAYOUT


def _half_tensor(expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and str(expr.ty.dtype) in HALF_DTYPES


def _no_set_out_dtype(attrs) -> bool:
    """The op's result type follows its inputs (an explicit out_dtype / dtype would pin it)."""
    for name in ("out_dtype", "dtype"):
        if attrs is not None and name in dir(attrs):
            value = getattr(attrs, name)
            if value is not None and str(value) not in ("", "void"):
                return False
    return True


def onnx_numerics(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with float max/min reductions and half-precision accumulating ops as onnxruntime
    computes them."""
    return _OnnxNumerics(mod).run()
