"""ONNX model -> CompiledModel: load/validate -> bind shapes -> normalise -> rewrite sites ->
Relax import (our PrimFuncs at the sites) -> build."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

from .. import __version__
from ..errors import ArtifactError, InputError, UnsupportedOperatorError
from .artifact import FORMAT, FORMAT_VERSION, CompiledModel, check_feed_names, owned_outputs
from .frontend import bind_constants, bind_shapes, dims_of, elem_dtype, graph_inputs, load_model, normalize, value_inputs
from .attention import FUNCTION_BODY, AttentionSite, rewrite_attention
from .function_body import expand_nodes, falls_short
from .control_flow import all_defined, unroll_control_flow
from .recurrent import expand_recurrent
from .rewrite import DTYPES_BY_TARGET, rewrite
from .targets import TargetSpec, resolve
from ..schedules import tuning as tuning_records


@dataclass
class Prepared:
    """A model ready for import: normalised, sites found and rewritten."""

    model: object  # onnx.ModelProto, rewritten
    normalized: object  # onnx.ModelProto, before the rewrite
    sites: list  # AttentionSite and Site
    source: str
    sha256: str
    timings: dict = field(default_factory=dict)


def prepare(model, *, algorithm: str = "auto", shapes: dict | None = None, attention: str = "auto",
            target: str = "x86", constants: dict | None = None) -> Prepared:
    """Load, validate, bind shapes, normalise and rewrite (no TVM compile yet).

    Attention first (its softmax becomes part of the fused site), then every other softmax."""
    started = time.perf_counter()
    loaded = load_model(model)
    bound = bind_constants(bind_shapes(loaded.proto, shapes), constants)
    # Scan / Loop (TVM has neither) unrolled first: the optimizer in `normalize` loses the values
    # their bodies read from the graph around them.
    normalized = normalize(unroll_control_flow(bound))
    again = unroll_control_flow(normalized)  # trip counts / lengths that folding settled
    if again is not normalized and all_defined(again):
        normalized = normalize(again)
    unrolled = expand_recurrent(normalized)  # RNN / GRU / LSTM: TVM has no importer for them
    if unrolled is not normalized:
        normalized = normalize(unrolled)
    kept: set = set()  # nodes whose body cannot be built (the importer refuses them by name)
    for _ in range(4):  # nodes TVM's importer gets wrong or lacks: their ONNX function bodies
        replace = falls_short(normalized) - kept  # (a body may use an op with a body of its own)
        if not replace:
            break
        expanded = unroll_control_flow(expand_nodes(normalized, replace))  # a body may hold a Scan
        kept |= replace & {n.name for n in expanded.graph.node}
        normalized = normalize(expanded)
    fused, attention_sites, not_attention = rewrite_attention(normalized, attention, algorithm)
    fallback = [s for s in attention_sites if s.lowered.get("strategy") == FUNCTION_BODY]
    if fallback:  # Attention nodes we do not fuse: their ONNX function bodies, normalised again
        normalized = normalize(expand_nodes(normalized, {s.node for s in fallback}))
        fused, attention_sites, not_attention = rewrite_attention(normalized, attention, algorithm)
        for index, site in enumerate(fallback, start=len(attention_sites)):
            site.id = f"attention{index}"
        attention_sites += fallback
    rewritten, softmax_sites = rewrite(fused, algorithm, DTYPES_BY_TARGET[target])
    for site in softmax_sites:
        site.not_attention = not_attention.get(site.node, "")
    sites = attention_sites + softmax_sites
    return Prepared(
        rewritten, normalized, sites, loaded.source, loaded.sha256,
        {"prepare_s": time.perf_counter() - started},
    )


def inspect_sites(model, *, target: str | TargetSpec = "x86", algorithm: str = "auto",
                  shapes: dict | None = None, attention: str = "auto", constants: dict | None = None,
                  tuning=None, **target_options) -> list:
    """Every site of `model` with what it will be lowered to on `target` (no TVM compile)."""
    from .rewrite import plan
    from .tune import load_records

    spec = target if isinstance(target, TargetSpec) else resolve(target, **target_options)
    sites = prepare(model, algorithm=algorithm, shapes=shapes, attention=attention, target=spec.name,
                    constants=constants).sites
    with tuning_records.using(load_records(tuning)):
        _plan_sites(sites, spec, plan)
    return sites


def _plan_sites(sites, spec, plan) -> None:
    for site in sites:
        if isinstance(site, AttentionSite):
            if site.rewritten:
                site.lowered = {"strategy": "flash" if site.requested == "auto" else site.requested}
            continue
        if site.rewritten:
            chosen, knobs, view = plan(site, spec)
            site.lowered = {"algorithm": chosen, "knobs": knobs.to_json(), "view": view}


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
    attention: str = "auto",
    constants: dict | None = None,
    tuning=None,
) -> CompiledModel:
    """See `tvmsoftmax.compile`."""
    from .tune import load_records

    spec = target if isinstance(target, TargetSpec) else resolve(target, arch=arch, mcpu=mcpu)
    records = load_records(tuning)
    try:
        with tuning_records.using(records):
            return _compile(model, spec, algorithm, shapes, attention, constants)
    except (UnsupportedOperatorError, InputError, ArtifactError):
        raise  # not about values: an op nobody lowers, a bad argument
    except Exception as err:  # noqa: BLE001 - decided below: specialise, or raise as it was
        source = bind_constants(bind_shapes(load_model(model).proto, shapes), constants)
        deferred = value_inputs(source)
        shaped = [i.name for i in graph_inputs(source)
                  if i.name not in deferred and any(not isinstance(d, int) for d in dims_of(i) or [None])]
        if not (deferred or shaped) or spec.name != "x86":
            raise
        return SpecializingModel(model, spec, algorithm, shapes, attention, constants or {}, deferred, shaped,
                                 source, err, records)


def _compile(model, spec, algorithm, shapes, attention, constants) -> CompiledModel:
    import tvm

    from .importer import import_model
    from .pipeline import build

    prepared = prepare(model, algorithm=algorithm, shapes=shapes, attention=attention, target=spec.name,
                       constants=constants)
    _refuse_unlowerable(prepared.sites)
    started = time.perf_counter()
    mod = import_model(prepared.model, prepared.sites, spec)
    executable = build(mod, spec)
    fatbins = {}
    if spec.name == "cuda":
        from .device_code import compile_fatbins

        nvcc_started = time.perf_counter()
        fatbins = compile_fatbins(executable.mod, spec.arch)
        prepared.timings["nvcc_s"] = time.perf_counter() - nvcc_started
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tvmsoftmax_version": __version__,
        "tvm_version": tvm.__version__,
        "target": spec.to_json(),
        "source": {"path": prepared.source, "sha256": prepared.sha256},
        "algorithm": algorithm,
        "attention": attention,
        "shapes": {k: list(v) for k, v in (shapes or {}).items()},
        "constants": sorted(constants or ()),
        "inputs": _io(graph_inputs(prepared.normalized)),
        "outputs": _io(prepared.normalized.graph.output),
        "sites": [s.to_json() for s in prepared.sites],
        "owned_outputs": owned_outputs(executable.as_text(), len(prepared.normalized.graph.output)),
        "timings": dict(prepared.timings, compile_s=time.perf_counter() - started),
    }
    if fatbins:
        manifest["cuda_kernels"] = [
            {"source_sha256": key, "member": f"kernels/{key}.fatbin", "arch": spec.arch,
             "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
            for key, blob in sorted(fatbins.items())
        ]
    if spec.name == "cuda" and not tvm.cuda(0).exist:
        return _CrossCompiled(executable, manifest, fatbins)
    return CompiledModel(executable, manifest, executable=executable, fatbins=fatbins)


def _refuse_unlowerable(sites) -> None:
    """An ONNX Attention / MultiHeadAttention node we could not fuse has no other lowering (TVM
    0.27's importer sends every Attention to its com.microsoft converter)."""
    from ..errors import UnsupportedOperatorError

    for site in sites:
        if isinstance(site, AttentionSite) and not site.rewritten and not site.form.startswith("decomposed") \
                and not site.lowered:  # lowered: replaced by its ONNX function body
            raise UnsupportedOperatorError(
                f"node {site.node!r}: {site.form} cannot be lowered: {site.reason}"
            )


class _CrossCompiled(CompiledModel):
    """A model compiled for a device this host lacks: it can be saved and inspected, not run."""

    def __init__(self, executable, manifest, fatbins):  # noqa: D107 - no VM without the device
        self.manifest = manifest
        self._executable = executable
        self._fatbins = fatbins
        self._staging, self._lock = {}, threading.Lock()

    def _invoke(self, args):
        from ..errors import TvmSoftmaxError

        raise TvmSoftmaxError("compiled for CUDA on a host without a GPU: save it and run it on a GPU host")

    def _prepare(self, feeds):
        return self._invoke(None)


class SpecializingModel:
    """A model TVM can only compile once some inputs are known, run as onnxruntime runs it.

    Two kinds of inputs are deferred to run time: those TVM needs as constants
    (`frontend.VALUE_INPUTS`: reduction axes, TopK's k, Pad's pads, Resize's sizes, ... fed as graph
    inputs), by value, and those with symbolic dims, by shape (whole exported transformers: TVM
    0.27's importer loses their shape computations). Each `run` compiles (once per distinct
    values/shapes, the last `CACHE` kept) the model with those bound, then runs it. Compiling with
    `constants=` and `shapes=` instead gives an ordinary model that can be saved."""

    CACHE = 8

    def __init__(self, model, spec, algorithm, shapes, attention, constants, deferred, shaped, source, error,
                 records=None):
        self._model, self._spec, self._algorithm = model, spec, algorithm
        self._records = records or {}
        self._shapes, self._attention, self._constants = dict(shapes or {}), attention, constants
        self.deferred, self.shaped = list(deferred), list(shaped)
        self._compiled: dict = {}
        self._lock = threading.Lock()
        self.manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "tvmsoftmax_version": __version__,
            "target": spec.to_json(), "algorithm": algorithm, "attention": attention,
            "inputs": _io(graph_inputs(source)), "outputs": _io(source.graph.output), "sites": [],
            "specialized_on": {"values": self.deferred, "shapes": self.shaped},
            "compile_error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
        }

    inputs = CompiledModel.inputs
    outputs = CompiledModel.outputs
    target = CompiledModel.target
    executable = None

    @property
    def sites(self) -> list[dict]:
        """The sites of the model as last specialised (none before the first run)."""
        with self._lock:
            last = next(reversed(self._compiled.values()), None)
        return last.sites if last is not None else []

    def specialize(self, feeds: dict) -> CompiledModel:
        """The model compiled for the values and shapes `feeds` gives the deferred inputs."""
        import numpy as np

        check_feed_names(feeds, [i["name"] for i in self.inputs])
        values = {n: np.asarray(feeds[n]) for n in self.deferred}
        declared = {i["name"]: i["shape"] for i in self.inputs}
        shapes = {}
        for name in self.shaped:
            shape = list(np.shape(feeds[name]))
            if declared[name] is not None and len(shape) != len(declared[name]):
                raise InputError(f"input {name!r}: expected rank {len(declared[name])} {declared[name]}, "
                                 f"got shape {shape}")
            shapes[name] = shape
        key = (tuple((n, v.dtype.str, v.shape, v.tobytes()) for n, v in values.items()),
               tuple((n, tuple(s)) for n, s in shapes.items()))
        with self._lock:
            compiled = self._compiled.pop(key, None)
            if compiled is None:
                with tuning_records.using(self._records):
                    compiled = _compile(self._model, self._spec, self._algorithm, {**self._shapes, **shapes},
                                        self._attention, {**self._constants, **values})
            self._compiled[key] = compiled  # most recent last
            while len(self._compiled) > self.CACHE:
                self._compiled.pop(next(iter(self._compiled)))
        return compiled

    def _rest(self, feeds: dict) -> dict:
        return {k: v for k, v in feeds.items() if k not in self.deferred}

    def run(self, feeds: dict) -> dict:
        """As `CompiledModel.run` (compiling first for new values/shapes of the deferred inputs)."""
        return self.specialize(feeds).run(self._rest(feeds))

    def time(self, feeds: dict, **options) -> list[float]:
        return self.specialize(feeds).time(self._rest(feeds), **options)

    def save(self, path):
        bind = []
        if self.deferred:
            bind.append(f"the values of input(s) {', '.join(map(repr, self.deferred))} (constants={{...}}, "
                        "CLI --constant NAME=V1,V2)")
        if self.shaped:
            bind.append(f"the shapes of input(s) {', '.join(map(repr, self.shaped))} (shapes={{...}}, "
                        "CLI --shape NAME=D1,D2)")
        raise ArtifactError(
            f"this model compiles only once {' and '.join(bind)} are known: bind them to get an artifact "
            f"(the general model failed: {self.manifest['compile_error']})")
