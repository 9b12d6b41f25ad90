"""Relax import: TVM's ONNX importer plus our converter for the rewritten sites.

TVM 0.27's `from_onnx` has no custom-converter argument; its converters come from the module
function `_get_convert_map`, so `_our_converters()` extends that map for the duration of one import
(and restores it). The ``SoftmaxSite`` converter reshapes the input to the [outer, length, inner]
view of `ops.softmax`, emits our compute as its own PrimFunc (attributes: the site id, the
algorithm and the knobs as JSON, and an opaque op pattern so that FuseOps leaves it whole), and
reshapes back. The schedule is applied later by `pipeline.schedule_sites`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from dataclasses import dataclass

import onnx

from ..errors import ModelError, UnsupportedOperatorError
from ..ops.softmax import in_shape, softmax
from ..schedules import choose_knobs
from ..schedules._tir import static_extent
from .attention import ATTENTION_OP, INT_VECTOR_OP, KV_APPEND_OP
from .control_flow import MAX_ITERATIONS
from .rewrite import SITE_OP, Site, row_view
from .targets import TargetSpec

SITE_ATTR = "tvmsoftmax.site"
KNOBS_ATTR = "tvmsoftmax.knobs"
ALGORITHM_ATTR = "tvmsoftmax.algorithm"
_OPAQUE = 8  # relax OpPatternKind::kOpaque


@dataclass
class _ImportContext:
    spec: TargetSpec
    sites: dict  # id -> Site | AttentionSite


_CONTEXT: list[_ImportContext] = []


def _product(dims):
    from tvm import tirx

    out = tirx.const(1, "int64")
    for d in dims:
        out = out * d
    return out


def _make_site_converter():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class SoftmaxSiteConverter(OnnxOpConverter):
        """ai.tvmsoftmax.SoftmaxSite -> reshape to [outer, length, inner] -> our PrimFunc."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            context = _CONTEXT[-1]
            site = context.sites[attr["site"].decode() if isinstance(attr["site"], bytes) else attr["site"]]
            x = bb.normalize(inputs[0])
            log = bool(attr.get("log", 0))
            shape = getattr(x.ty, "shape", None)
            values = getattr(shape, "values", None)
            if values is None:
                site.rewritten = False
                site.reason = "input shape unknown at import; TVM's lowering"
                op = relax.op.nn.log_softmax if log else relax.op.nn.softmax
                return op(x, axis=int(attr["axis"]))
            values = list(values)
            view = row_view(values, int(attr["axis"]), bool(attr.get("coerce_2d", 0)), _product)
            static_view = [static_extent(v) for v in view]
            algorithm, knobs = choose_knobs(
                context.spec, site.requested, log, static_view
            )
            x3 = bb.normalize(relax.op.reshape(x, view))
            name = re.sub(r"\W", "_", f"tvmsoftmax_{site.id}_{algorithm.replace('-', '_')}")
            axis, coerce_2d = int(attr["axis"]), bool(attr.get("coerce_2d", 0))

            def compute3(x_te):
                return softmax(
                    x_te,
                    algorithm=algorithm,
                    log=log,
                    partitioning=knobs.partitioning(static_view[2] == 1),
                    name="softmax",
                )

            # The result written in the input's shape by our kernel (no reshape after it, which
            # TVM leaves as a copy kernel when it is a graph output), where TVM can inline the
            # index map into the output block.
            in_place = _writes_in_shape(compute3, view, values, axis, coerce_2d, x.ty.dtype)
            compute = (lambda x_te: in_shape(compute3(x_te), values, axis, coerce_2d)) if in_place else compute3
            y3 = bb.emit_te(compute, x3, primfunc_name_hint=name)
            gvar = bb.lookup_binding(y3).args[0]
            func = bb.get()[gvar].with_attrs(
                {
                    SITE_ATTR: site.id,
                    ALGORITHM_ATTR: algorithm,
                    KNOBS_ATTR: json.dumps(knobs.to_json()),
                    "op_pattern": _OPAQUE,
                }
            )
            bb.update_func(gvar, func)
            site.lowered = {
                "algorithm": algorithm,
                "knobs": knobs.to_json(),
                "schedule": type(knobs).__name__,
                "view": [v if v is not None else re.sub(r"T\.int64\((\d+)\)", r"\1", str(e)) for v, e in zip(static_view, view)],
                "primfunc": gvar.name_hint,
            }
            return y3 if in_place else relax.op.reshape(y3, values)

    return SoftmaxSiteConverter


def _writes_in_shape(compute3, view, dims, axis: int, coerce_2d: bool, dtype) -> bool:
    """Whether the site can write its result in the input's shape `dims` (not a 3-D view that a
    reshape then copies): the shapes differ and TVM inlines the index map (it cannot for some
    symbolic dims)."""
    from tvm import s_tir, te

    from ..schedules._tir import inline_output_view

    if len(dims) == 3 and all(int(static_extent(a) or -1) == int(static_extent(b) or -2) for a, b in zip(view, dims)):
        return False  # the view is the input's shape
    probe = te.placeholder(view, str(dtype), name="x")
    try:
        inline_output_view(te.create_prim_func([probe, in_shape(compute3(probe), dims, axis, coerce_2d)]))
    except (s_tir.ScheduleError, ValueError, RuntimeError):  # TVM's errors from the inline
        return False
    return True


def _our_table() -> dict:
    """Our converters by ONNX op type: they replace or extend TVM's for one import."""
    from .attention_import import make_attention_converter
    from .onnx_ops import converters

    return {SITE_OP: _make_site_converter(), ATTENTION_OP: make_attention_converter(_CONTEXT),
            INT_VECTOR_OP: _make_int_vector_converter(), KV_APPEND_OP: _make_kv_append_converter(), **converters()}


def _make_kv_append_converter():
    """ai.tvmsoftmax.KVAppend(past [B, H, P, D], new [B, H, S, D], past_lengths [B][, rows]) ->
    [B, H, rows, D] (rows: P + S unless given, as an int64 tensor whose value may be known only at
    run time: GroupQueryAttention's present length comes from its total_sequence_length input):
    `ops.kv_cache.append_kv`, one pass and the present written once (the ONNX-op form of it took
    several passes, and a Slice to a run-time length copied it again)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter, _tensor_to_shape_expr

    from ..ops.kv_cache import append_kv

    class KVAppendConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            past, new, lengths = (bb.normalize(x) for x in inputs[:3])
            if str(lengths.ty.dtype) != "int64":
                lengths = bb.normalize(relax.op.astype(lengths, "int64"))
            rows = inputs[3] if len(inputs) > 3 else None
            if isinstance(rows, tvm.ir.GenericConst):
                rows = int(rows.value.numpy().reshape(-1)[0])
            elif rows is not None:  # a run-time value: a symbolic dim by match_cast (see
                # `pipeline.symbols_defined_before_use`)
                rows = bb.normalize(relax.op.reshape(relax.op.astype(rows, "int64"), [1]))
                rows = _tensor_to_shape_expr(bb, rows, 1, "present_length").values[0]
            return bb.emit_te(append_kv, past, new, lengths, rows, primfunc_name_hint="tvmsoftmax_kv_append")

    return KVAppendConverter


def _make_int_vector_converter():
    """ai.tvmsoftmax.IntVector: an integer scalar or vector, whether a tensor or a shape expression
    or prim value of TVM's importer (a dim read through Shape -> Gather), as an int64 1-D tensor."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class IntVectorConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            if tvm.ir.is_prim_expr(x):  # what relax.prim_value makes in TVM 0.27
                dtype = str(getattr(x, "dtype", None) or x.ty)
                value = x if dtype == "int64" else tirx.Cast("int64", x)
                return bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([value])))
            x = bb.normalize(x)
            if isinstance(x.ty, relax.ShapeType):
                return bb.normalize(relax.op.shape_to_tensor(x))
            x = x if str(x.ty.dtype) == "int64" else bb.normalize(relax.op.astype(x, "int64"))
            return relax.op.reshape(x, [-1])

    return IntVectorConverter


@contextlib.contextmanager
def _our_converters():
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    ours = _our_table()

    def extended():
        return {**original(), **ours}

    onnx_frontend._get_convert_map = extended
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def _symbolic_dims(value) -> list[str]:
    shape = value.type.tensor_type.shape
    return [d.dim_param or "?" for d in shape.dim if not d.HasField("dim_value")]


def check_supported(model: onnx.ModelProto) -> None:
    """Raise UnsupportedOperatorError naming the first node whose op nobody can lower."""
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map()) | set(_our_table()) | {"If", "Constant"}
    for node in model.graph.node:
        if node.op_type in ("Scan", "Loop") and node.domain in ("", "ai.onnx"):
            # not unrolled (`control_flow`): a ModelError, not an unsupported op, so that a model
            # whose trip count or lengths come from its inputs is compiled per input value/shape
            raise ModelError(
                f"node {node.name!r}: {node.op_type} is unrolled only with a known number of "
                "iterations (constant trip count and condition, static sequence length, opset >= 9 "
                f"for Scan, at most {MAX_ITERATIONS}); this one's is not known when compiling"
            )
        if node.op_type not in known:
            domain = node.domain or "ai.onnx"
            raise UnsupportedOperatorError(
                f"node {node.name!r}: operator {domain}.{node.op_type} is not supported "
                "(neither by tvmsoftmax nor by TVM's ONNX importer)"
            )


def import_model(model: onnx.ModelProto, sites: list[Site], spec: TargetSpec):
    """ONNX (with rewritten sites) -> Relax IRModule."""
    from tvm.relax.frontend.onnx import from_onnx

    check_supported(model)
    _CONTEXT.append(_ImportContext(spec, {s.id: s for s in sites}))
    printed = io.StringIO()  # TVM's importer prints "Error converting operator X, with inputs: <IR>"
    try:
        with _our_converters(), warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")
            return from_onnx(model, keep_params_in_input=False, sanitize_input_names=False)
    except (UnsupportedOperatorError, ModelError):
        raise
    except Exception as err:  # noqa: BLE001 - TVM raises many kinds; report one clear line
        message = str(err).strip().splitlines()
        text = message[-1] if message else type(err).__name__
        failed = re.search(r"Error converting operator (\w+)", printed.getvalue())
        where = f" (its {failed.group(1)} converter failed)" if failed else ""
        hint = ""
        symbolic = sorted({d for v in model.graph.input for d in (_symbolic_dims(v))})
        if symbolic:
            hint = (f" (the model keeps symbolic dims {', '.join(symbolic)}: bind them with "
                    "shapes={...} / --shape NAME=D1,D2 so its shape computations fold)")
        raise ModelError(f"TVM could not import the model{where}: {type(err).__name__}: {text}{hint}") from err
    finally:
        _CONTEXT.pop()
