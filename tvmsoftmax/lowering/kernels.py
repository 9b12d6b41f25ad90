"""Stand-alone softmax kernels: one site's compute + schedule, compiled without a model.

Used by the benchmarks and tuning: the same `ops.softmax` compute, `choose_knobs` rule and
schedule rule as a site inside a model, so what is measured here is what a model runs.
"""

from __future__ import annotations

import numpy as np

from .._native import quiet_native_stderr
from ..ops.softmax import softmax
from ..schedules import choose_knobs, schedule_softmax
from .pipeline import TIR_PIPELINE
from .targets import TargetSpec


class SoftmaxKernel:
    """A compiled softmax over rows of a [outer, length, inner] float tensor."""

    def __init__(self, view, *, algorithm="auto", log=False, spec: TargetSpec, knobs=None, dtype="float32"):
        import tvm
        from tvm import te

        self.view = tuple(int(v) for v in view)
        self.spec = spec
        chosen, default_knobs = choose_knobs(spec, algorithm, log, list(self.view))
        self.algorithm = chosen
        self.knobs = knobs or default_knobs
        x = te.placeholder(self.view, dtype, name="x")
        y = softmax(x, algorithm=chosen, log=log, partitioning=self.knobs.partitioning(self.view[2] == 1))
        self.func = schedule_softmax(te.create_prim_func([x, y]), spec, self.knobs)  # the scheduled PrimFunc
        with quiet_native_stderr():
            self.executable = tvm.compile(tvm.IRModule({"main": self.func}), spec.tvm_target(), tir_pipeline=TIR_PIPELINE)
        self.device = tvm.cuda(0) if spec.name == "cuda" else tvm.cpu(0)
        self.dtype = dtype

    def tensors(self, x: np.ndarray):
        import tvm

        x = np.ascontiguousarray(x.reshape(self.view))
        return tvm.runtime.tensor(x, self.device), tvm.runtime.empty(self.view, self.dtype, self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        inp, out = self.tensors(x)
        self.executable["main"](inp, out)
        return out.numpy().reshape(x.shape)

    def bound_call(self, x: np.ndarray):
        """A no-argument callable running the kernel on device copies of `x` (for timing loops)."""
        inp, out = self.tensors(x)
        function = self.executable["main"]
        return lambda: function(inp, out)
