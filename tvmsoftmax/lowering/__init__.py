"""ONNX load/validate -> rewrite -> Relax import -> our PrimFuncs -> compile -> artifact -> run."""
