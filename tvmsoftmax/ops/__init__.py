"""Algorithms as pure tensor-expression compute: one module per op family, no scheduling."""

from .exp import fast_exp
from .softmax import ALGORITHMS, Partitioning, softmax

__all__ = ["ALGORITHMS", "Partitioning", "fast_exp", "softmax"]
