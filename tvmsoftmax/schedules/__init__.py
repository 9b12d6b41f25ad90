"""Per-target schedule rules: take a PrimFunc from `tvmsoftmax.ops`, return it scheduled.

Knobs are frozen dataclasses so that tuning can enumerate and record them.
"""

from .x86 import X86SoftmaxKnobs, schedule_softmax as schedule_softmax_x86

__all__ = ["X86SoftmaxKnobs", "schedule_softmax_x86"]
