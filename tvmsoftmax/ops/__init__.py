"""Algorithms as pure tensor-expression compute: one module per op family, no scheduling."""

from .exp import exp_nonpositive, fast_exp
from .softmax import ALGORITHMS, Partitioning, softmax

__all__ = ["ALGORITHMS", "Partitioning", "exp_nonpositive", "fast_exp", "softmax"]
