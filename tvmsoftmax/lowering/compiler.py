"""ONNX model -> CompiledModel: load/validate -> bind shapes -> normalise -> rewrite sites ->
Relax import (our PrimFuncs at the sites) -> build."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import __version__
from .artifact import FORMAT, FORMAT_VERSION, CompiledModel
from .frontend import bind_shapes, dims_of, elem_dtype, graph_inputs, load_model, normalize
from .rewrite import Site, rewrite
from .targets import TargetSpec, resolve


@dataclass
class Prepared:
    """A model ready for import: normalised, sites found and rewritten."""

    model: object  # onnx.ModelProto, rewritten
    normalized: object  # onnx.ModelProto, before the rewrite
    sites: list[Site]
    source: str
    sha256: str
    timings: dict = field(default_factory=dict)


def prepare(model, *, algorithm: str = "auto", shapes: dict | None = None) -> Prepared:
    """Load, validate, bind shapes, normalise and rewrite (no TVM compile yet)."""
    started = time.perf_counter()
    loaded = load_model(model)
    bound = bind_shapes(loaded.proto, shapes)
    normalized = normalize(bound)
    rewritten, sites = rewrite(normalized, algorithm)
    return Prepared(
        rewritten, normalized, sites, loaded.source, loaded.sha256,
        {"prepare_s": time.perf_counter() - started},
    )


def inspect_sites(model, *, target: str | TargetSpec = "x86", algorithm: str = "auto",
                  shapes: dict | None = None, **target_options) -> list[Site]:
    """Every site of `model` with what it will be lowered to on `target` (no TVM compile)."""
    from .rewrite import plan

    spec = target if isinstance(target, TargetSpec) else resolve(target, **target_options)
    sites = prepare(model, algorithm=algorithm, shapes=shapes).sites
    for site in sites:
        if site.rewritten:
            chosen, knobs, view = plan(site, spec)
            site.lowered = {"algorithm": chosen, "knobs": knobs.to_json(), "view": view}
    return sites


def _io(values) -> list[dict]:
    return [
        {"name": v.name, "dtype": elem_dtype(v), "shape": dims_of(v)} for v in values
    ]


def compile_model(
    model,
    target: str | TargetSpec = "x86",
    algorithm: str = "auto",
    shapes: dict | None = None,
    *,
    arch: str | None = None,
    mcpu: str | None = None,
) -> CompiledModel:
    """See `tvmsoftmax.compile`."""
    import tvm

    from .importer import import_model
    from .pipeline import build

    spec = target if isinstance(target, TargetSpec) else resolve(target, arch=arch, mcpu=mcpu)
    prepared = prepare(model, algorithm=algorithm, shapes=shapes)
    started = time.perf_counter()
    mod = import_model(prepared.model, prepared.sites, spec)
    executable = build(mod, spec)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tvmsoftmax_version": __version__,
        "tvm_version": tvm.__version__,
        "target": spec.to_json(),
        "source": {"path": prepared.source, "sha256": prepared.sha256},
        "algorithm": algorithm,
        "shapes": {k: list(v) for k, v in (shapes or {}).items()},
        "inputs": _io(graph_inputs(prepared.normalized)),
        "outputs": _io(prepared.normalized.graph.output),
        "sites": [s.to_json() for s in prepared.sites],
        "timings": dict(prepared.timings, compile_s=time.perf_counter() - started),
    }
    if spec.name == "cuda" and not tvm.cuda(0).exist:
        return _CrossCompiled(executable, manifest)
    return CompiledModel(executable, manifest, executable=executable)


class _CrossCompiled(CompiledModel):
    """A model compiled for a device this host lacks: it can be saved and inspected, not run."""

    def __init__(self, executable, manifest):  # noqa: D107 - no VM without the device
        self.manifest = manifest
        self._executable = executable

    def _invoke(self, args):
        from ..errors import TvmSoftmaxError

        raise TvmSoftmaxError("compiled for CUDA on a host without a GPU: save it and run it on a GPU host")

    def _prepare(self, feeds):
        return self._invoke(None)
