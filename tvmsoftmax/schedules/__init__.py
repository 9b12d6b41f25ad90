"""Per-target schedule rules: take a PrimFunc from `tvmsoftmax.ops`, return it scheduled.

Knobs are frozen dataclasses so that tuning can enumerate and record them; `choose_knobs` is the
`auto` rule (algorithm and knobs per target and row shape).
"""

from __future__ import annotations

from . import cuda, x86
from .cuda import CudaSoftmaxKnobs
from .x86 import X86SoftmaxKnobs

KNOB_TYPES = {"X86SoftmaxKnobs": X86SoftmaxKnobs, "CudaSoftmaxKnobs": CudaSoftmaxKnobs}


def choose_knobs(spec, requested: str, log: bool, view: list[int | None]):
    """(algorithm, knobs) for a site with the [outer, length, inner] view (None: symbolic)."""
    if spec.name == "cuda":
        return cuda.choose(requested, log, view)
    return x86.choose(requested, log, view, spec.vector_lanes, spec.num_cores)


def schedule_softmax(func, spec, knobs):
    """Schedule one softmax PrimFunc for the target of `spec`."""
    if spec.name == "cuda":
        return cuda.schedule_softmax(func, knobs)
    return x86.schedule_softmax(func, knobs)


__all__ = ["CudaSoftmaxKnobs", "KNOB_TYPES", "X86SoftmaxKnobs", "choose_knobs", "schedule_softmax"]
