"""tvmsoftmax: ONNX Softmax/LogSoftmax (and attention) lowered to TVM tensor-expression schedules.

    import tvmsoftmax
    model = tvmsoftmax.compile("model.onnx", target="x86", algorithm="auto", shapes={"x": [1, 128]})
    outputs = model.run({"x": x})
    model.save("model.tvmsm")
    again = tvmsoftmax.load("model.tvmsm")          # TVM runtime only
    report = tvmsoftmax.check("model.onnx")          # against onnxruntime

Heavy imports (TVM's compiler, onnxscript) happen on first use, so `load` works on a host that
has only TVM's runtime.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._threads import set_default_threads  # noqa: E402

set_default_threads()  # before TVM's thread pool exists (see `_threads`)

from .errors import (  # noqa: E402
    ArtifactError,
    InputError,
    ModelError,
    ReferenceRunError,
    TvmSoftmaxError,
    UnsupportedOperatorError,
)


def compile(model, target="x86", algorithm="auto", shapes=None, **options):  # noqa: A001
    """Compile an ONNX model (path, bytes or onnx.ModelProto) with our softmax lowering.

    target: "x86" or "cuda" (options: arch="sm_90", mcpu="x86-64-v3"); algorithm: "auto",
    "three-pass", "three-pass-recompute", "two-pass" or "online"; shapes: binds symbolic input
    dims, e.g. {"input_ids": [1, 128]} (unbound ones stay dynamic where TVM can keep them);
    attention: "auto", "flash", "materialized" or "none"; constants: binds inputs TVM needs as
    constants, e.g. {"axes": [1]}; tuning: records from `tune` (a path or the report).
    """
    from .lowering.compiler import compile_model

    return compile_model(model, target, algorithm, shapes, **options)


def load(path, *, target=None):
    """Load a saved artifact (needs only TVM's runtime)."""
    from .lowering.artifact import load as _load

    return _load(path, target=target)


def check(model, target="x86", algorithm="auto", shapes=None, **options):
    """Compile, run ours and onnxruntime on the same inputs, compare: returns a CheckReport."""
    from .lowering.check import check as _check

    return _check(model, target=target, algorithm=algorithm, shapes=shapes, **options)


def inspect(model, target="x86", algorithm="auto", shapes=None, **options):
    """The Softmax/LogSoftmax sites of a model and what each will be lowered to on `target`."""
    from .lowering.compiler import inspect_sites

    return inspect_sites(model, target=target, algorithm=algorithm, shapes=shapes, **options)


def tune(model, target="x86", shapes=None, **options):
    """Measure schedule knobs of `model`'s sites on this host (x86); returns the tuning report,
    which `compile(..., tuning=report_or_path)` applies. Options: constants, trials, repeat, seed,
    log (a print-like callable)."""
    from .lowering.tune import tune as _tune

    return _tune(model, target=target, shapes=shapes, **options)


def aligned(array):
    """A C-contiguous copy of `array` whose data is 64-byte aligned: `run` hands such an input to
    TVM without copying it (TVM's kernels assume 64-byte alignment; numpy's large arrays are
    16-byte aligned, and `run` copies those into a staging buffer first). For inputs reused
    across runs."""
    import numpy as np

    from .lowering.artifact import _aligned_empty

    array = np.asarray(array)
    out = _aligned_empty(array.shape, array.dtype)
    np.copyto(out, array)
    return out


__all__ = [
    "aligned",
    "ArtifactError",
    "InputError",
    "ModelError",
    "ReferenceRunError",
    "TvmSoftmaxError",
    "UnsupportedOperatorError",
    "__version__",
    "check",
    "compile",
    "inspect",
    "load",
    "tune",
]
