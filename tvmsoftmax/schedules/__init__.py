"""Per-target schedule rules: take a PrimFunc from `tvmsoftmax.ops`, return it scheduled.

Knobs are frozen dataclasses so that tuning can enumerate and record them; `choose_knobs` is the
`auto` rule (algorithm and knobs per target and row shape).
"""

from __future__ import annotations

from . import cuda, cuda_attention, tuning, x86, x86_attention
from ._tir import inline_output_view
from .cuda import CudaSoftmaxKnobs
from .cuda_attention import CudaAttentionKnobs
from .x86 import X86SoftmaxKnobs
from .x86_attention import X86AttentionKnobs

KNOB_TYPES = {
    "X86SoftmaxKnobs": X86SoftmaxKnobs,
    "CudaSoftmaxKnobs": CudaSoftmaxKnobs,
    "X86AttentionKnobs": X86AttentionKnobs,
    "CudaAttentionKnobs": CudaAttentionKnobs,
}


def choose_knobs(spec, requested: str, log: bool, view: list[int | None]):
    """(algorithm, knobs) for a site with the [outer, length, inner] view (None: symbolic): a
    tuning record in effect for it (`tuning.using`), else the `auto` rule of the target."""
    key = tuning.softmax_key(spec, requested, log, view)
    found = tuning.lookup(key, CudaSoftmaxKnobs if spec.name == "cuda" else X86SoftmaxKnobs)
    if found is not None:
        return found
    if spec.name == "cuda":
        chosen = cuda.choose(requested, log, view)
    else:
        chosen = x86.choose(requested, log, view, spec.vector_lanes, spec.num_cores)
    tuning.asked(key, *chosen, {"kind": "softmax", "requested": requested, "log": log, "view": list(view)})
    return chosen


def choose_attention(spec, requested: str, dims: dict, attention, algorithm: str = "auto"):
    """(strategy, knobs) for an attention site (`ops.attention.AttentionSpec`): a tuning record
    in effect for it, else the `auto` rule of the target."""
    key = tuning.attention_key(spec, requested, dims, attention, algorithm)
    found = tuning.lookup(key, CudaAttentionKnobs if spec.name == "cuda" else X86AttentionKnobs)
    if found is not None:
        return found
    if spec.name == "cuda":
        chosen = cuda_attention.choose(requested, dims, attention, algorithm)
    else:
        chosen = x86_attention.choose(requested, dims, attention, spec.vector_lanes, algorithm)
    tuning.asked(key, *chosen, {"kind": "attention", "requested": requested, "dims": dict(dims),
                                "v_head_size": attention.v_head_size})
    return chosen


def schedule_attention(func, spec, kind: str, knobs):
    """Schedule one attention kernel (``flash``, ``scores`` or ``output``; CUDA: ``flash``)."""
    if spec.name == "cuda":
        if kind == "flash":
            return cuda_attention.schedule_flash(func, knobs)
        return cuda_attention.schedule_materialized(func)
    return x86_attention.schedule_attention(func, kind, knobs)


def schedule_softmax(func, spec, knobs):
    """Schedule one softmax PrimFunc for the target of `spec`."""
    func = inline_output_view(func)
    if spec.name == "cuda":
        return cuda.schedule_softmax(func, knobs)
    return x86.schedule_softmax(func, knobs)


__all__ = [
    "CudaAttentionKnobs", "CudaSoftmaxKnobs", "KNOB_TYPES", "X86AttentionKnobs", "X86SoftmaxKnobs", "choose_attention",
    "choose_knobs", "schedule_attention", "schedule_softmax",
]
