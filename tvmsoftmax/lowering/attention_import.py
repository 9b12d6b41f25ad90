"""Relax import of ``ai.tvmsoftmax.AttentionSite``: the canonical op -> our PrimFunc(s).

* flash: one TensorIR PrimFunc (`ops.attention.flash_attention`) called with ``call_tir``; batch
  and sequence dims stay symbolic when the model's are.
* materialized: three kernels with the float32 score buffer between them: the masked scores
  (`attention_scores`), a softmax site of `ops.softmax` (any algorithm; scheduled like every
  softmax site) and P @ V with the empty-row rule (`attention_output`).

Every PrimFunc carries ``tvmsoftmax.attention`` (which kernel) and the knobs as JSON, and an opaque
op pattern so that fusion leaves it whole; `pipeline.schedule_sites` schedules them.
"""

from __future__ import annotations

import json
import re

from ..errors import ModelError
from ..ops.attention import AttentionSpec, attention_output, attention_scores, flash_attention
from ..ops.softmax import softmax
from ..schedules import choose_attention, choose_knobs
from ..schedules._tir import static_extent

ATTENTION_ATTR = "tvmsoftmax.attention"
_OPAQUE = 8


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def make_attention_converter(contexts: list):
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from .importer import ALGORITHM_ATTR, KNOBS_ATTR, SITE_ATTR

    class AttentionSiteConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            context = contexts[-1]
            site = context.sites[_text(attr["site"])]
            q, k, v = (bb.normalize(x) for x in inputs[:3])
            extras = [bb.normalize(x) if x is not None else None for x in (list(inputs[3:]) + [None] * 4)[:4]]
            bias, keep, lengths, sink = extras
            qs, ks, vs = (list(x.ty.shape.values) for x in (q, k, v))
            static = [static_extent(d) for d in (qs[1], ks[1], qs[3], vs[3])]
            if None in static:
                raise ModelError(f"attention site {site.id} (node {site.node!r}): head counts and head sizes must be static, got Q {qs}, K {ks}, V {vs}")
            hq, hkv, d, dv = static
            dtype = str(q.ty.dtype)

            for role, x in (("bias", bias), ("mask", keep)):
                if x is not None and x.ty.shape is None:
                    raise ModelError(f"attention site {site.id} (node {site.node!r}): the shape of its {role} is unknown "
                                     "to TVM's importer (computed at run time); bind the input shapes (`shapes=`)")

            def flags(x):
                dims = list(x.ty.shape.values)
                return tuple(static_extent(dd) == 1 for dd in dims)

            spec = AttentionSpec(
                q_heads=hq, kv_heads=hkv, head_size=d, v_head_size=dv, dtype=dtype,
                scale=float(attr["scale"]), softcap=float(attr.get("softcap", 0.0)),
                causal=int(attr.get("causal", 0)), empty_row=_text(attr["empty_row"]),
                bias_dtype=str(bias.ty.dtype) if bias is not None else None,
                bias_broadcast=flags(bias) if bias is not None else (False,) * 4,
                keep_broadcast=flags(keep) if keep is not None else None,
                fill=float(attr.get("fill", -3.4028234663852886e38)),
                kv_lengths=lengths is not None,
                sink_dtype=str(sink.ty.dtype) if sink is not None else None,
            )
            dims = {"batch": static_extent(qs[0]), "q_len": static_extent(qs[2]), "kv_len": static_extent(ks[2])}
            requested = site.requested
            if sink is not None and requested == "materialized":
                requested = "flash"  # a sink logit is the flash kernel's (its running state's first key)
            strategy, knobs = choose_attention(context.spec, requested, dims, spec, site.attributes.get("algorithm", "auto"))
            if sink is not None and strategy != "flash":
                raise ModelError(f"attention site {site.id} (node {site.node!r}) has a head sink, which only the flash "
                                 f"strategy computes; got {strategy!r} (from a tuning record?)")
            stem = re.sub(r"\W", "_", f"tvmsoftmax_{site.id}")
            attrs = {ATTENTION_ATTR: strategy, KNOBS_ATTR: json.dumps(knobs.to_json()), "op_pattern": _OPAQUE,
                     "tvmsoftmax.site": site.id}
            present = [x for x in (bias, keep, lengths, sink) if x is not None]
            out_ty = relax.TensorType([qs[0], qs[1], qs[2], vs[3]], dtype)
            site.lowered = {"strategy": strategy, "knobs": knobs.to_json(), "spec": spec.to_json(),
                            "dims": dict(dims)}
            if strategy == "flash":
                func = flash_attention(spec, knobs.tiling(), dims).with_attrs({**attrs, "global_symbol": f"{stem}_flash"})
                gvar = bb.add_func(func, f"{stem}_flash")
                site.lowered["primfuncs"] = [gvar.name_hint]
                return relax.call_tir(gvar, relax.Tuple([q, k, v, *present]), out_ty)

            def scores_te(q_te, k_te, *rest):
                b_te, kp_te, l_te = _split(rest, bias, keep, lengths)
                return attention_scores(q_te, k_te, b_te, kp_te, l_te, spec=spec)

            scores = bb.emit_te(scores_te, q, k, *present, primfunc_name_hint=f"{stem}_scores")
            _tag(bb, scores, {**attrs, ATTENTION_ATTR: "scores"})
            rows = [static_extent(x) for x in scores.ty.shape.values]
            algorithm, soft_knobs = choose_knobs(context.spec, knobs.softmax_algorithm, False, rows)
            probs = bb.emit_te(
                lambda x: softmax(x, algorithm=algorithm, partitioning=soft_knobs.partitioning(True), name="softmax"),
                scores, primfunc_name_hint=f"{stem}_softmax_{algorithm.replace('-', '_')}",
            )
            _tag(bb, probs, {SITE_ATTR: f"{site.id}.softmax", ALGORITHM_ATTR: algorithm,
                             KNOBS_ATTR: json.dumps(soft_knobs.to_json()), "op_pattern": _OPAQUE})

            def output_te(p_te, v_te, *rest):
                b_te, kp_te, l_te = _split(rest, bias, keep, lengths)
                return attention_output(p_te, v_te, [qs[0], hq, qs[2], d], b_te, kp_te, l_te, spec=spec)

            y = bb.emit_te(output_te, probs, v, *present, primfunc_name_hint=f"{stem}_output")
            _tag(bb, y, {**attrs, ATTENTION_ATTR: "output"})
            site.lowered["softmax"] = {"algorithm": algorithm, "knobs": soft_knobs.to_json()}
            return y

    return AttentionSiteConverter


def _split(rest, bias, keep, lengths):
    rest = list(rest)
    out = []
    for x in (bias, keep, lengths):
        out.append(rest.pop(0) if x is not None else None)
    return out


def _tag(bb, var, attrs: dict) -> None:
    gvar = bb.lookup_binding(var).args[0]
    bb.update_func(gvar, bb.get()[gvar].with_attrs(attrs))
