"""Builders of the ONNX models used by demos, tests and benchmarks."""

from .transformers import EXPORTERS, FAMILIES, bert, build, gpt2, llama, vit

__all__ = ["EXPORTERS", "FAMILIES", "bert", "build", "gpt2", "llama", "vit"]
