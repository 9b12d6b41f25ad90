"""Check a compiled model against onnxruntime, the way Polygraphy compares runners.

Reference: onnxruntime CPU with graph optimisations off, on the source model (shapes bound as for
the compile). Inputs: the user's arrays, or seeded random values suited to each input (ids in the
valid range of the embedding they index, attention masks of ones, positions 0..n-1, floats from a
normal distribution). Per output: max/mean/p99 absolute and relative error, NaN/inf mismatches,
pass/fail against |ours - ref| <= atol + rtol * |ref| with non-finite values required to match
exactly. Default tolerances: float32 atol = rtol = 1e-5; float16 atol = rtol = 1e-3 (stated in
`DEFAULT_TOLERANCES`). A float32 output outside them is then judged against the model evaluated
in float64 (onnx's reference evaluator, where it can): it passes if it is no further from that
than onnxruntime's, within `ARBITER_SLACK` (`_float64_arbiter`; both errors are reported).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..errors import InputError, ReferenceRunError
from .frontend import bind_constants, bind_shapes, dims_of, elem_dtype, graph_inputs, load_model

DEFAULT_TOLERANCES = {
    "float32": (1e-5, 1e-5),  # (rtol, atol)
    "float16": (1e-3, 1e-3),
    "bfloat16": (1e-2, 1e-2),
    "float64": (1e-7, 1e-7),
}
DEFAULT_DIM = 4  # value of a symbolic dim nobody bound, for generated inputs


@dataclass
class OutputReport:
    name: str
    dtype: str
    shape: list
    rtol: float
    atol: float
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    nonfinite_mismatches: int
    violations: int
    passed: bool
    # Where a float32 output was outside the tolerance: max |error| of ours and of onnxruntime
    # against a float64 evaluation of the model (`_float64_arbiter`), when one could be made.
    float64_max_abs: float | None = None
    onnxruntime_float64_max_abs: float | None = None


@dataclass
class CheckReport:
    outputs: list[OutputReport]
    sites: list[dict]
    target: dict
    timings: dict = field(default_factory=dict)  # median seconds: ours, onnxruntime

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "outputs": [asdict(o) for o in self.outputs],
            "sites": self.sites,
            "target": self.target,
            "timings": self.timings,
        }


def _vocab_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Input name -> rows of the embedding table it indexes (Gather(table, ids))."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    sizes: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            dims = tables[node.input[0]]
            if dims:
                sizes[node.input[1]] = min(sizes.get(node.input[1], dims[0]), dims[0])
    return sizes


def make_inputs(model: onnx.ModelProto, seed: int = 0, dims: dict[str, int] | None = None) -> dict:
    """Seeded inputs suited to each input's dtype and role."""
    rng = np.random.default_rng(seed)
    vocab = _vocab_sizes(model)
    symbols = dict(dims or {})
    feeds = {}
    for value in graph_inputs(model):
        shape = []
        for d in dims_of(value) or []:
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(symbols.setdefault(d, DEFAULT_DIM))
        dtype = np.dtype(elem_dtype(value))
        lowered = value.name.lower()
        if dtype.kind in "iu":
            if "mask" in lowered:
                array = np.ones(shape, dtype)
            elif "position" in lowered and shape:
                array = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            elif "type" in lowered:
                array = np.zeros(shape, dtype)
            else:
                high = vocab.get(value.name, 2)
                array = rng.integers(0, max(high, 1), size=shape).astype(dtype)
        elif dtype.kind == "b":
            array = np.ones(shape, dtype) if "mask" in lowered else rng.random(shape) < 0.5
        elif dtype.kind == "f":
            array = rng.standard_normal(shape).astype(dtype)
            if "mask" in lowered:
                array = np.ones(shape, dtype)
        else:
            raise InputError(f"input {value.name!r}: cannot generate values of dtype {dtype}")
        feeds[value.name] = array
    return feeds


def onnxruntime_session(model: onnx.ModelProto, *, optimized: bool = False, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare(name: str, ours: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> OutputReport:
    if ours.shape != ref.shape:
        return OutputReport(name, str(ref.dtype), list(ref.shape), rtol, atol, *([float("inf")] * 6),
                            int(ref.size), int(ref.size), False)
    a = ours.astype(np.float64)
    b = ref.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    # Non-finite values must match: NaN with NaN, +inf with +inf, -inf with -inf.
    same_nonfinite = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b)))
    nonfinite_mismatches = int(np.count_nonzero(~finite & ~same_nonfinite))
    diff = np.abs(a[finite] - b[finite])
    rel = diff / np.maximum(np.abs(b[finite]), np.finfo(np.float64).tiny)
    violations = int(np.count_nonzero(diff > atol + rtol * np.abs(b[finite])))

    def stat(values, fn):
        return float(fn(values)) if values.size else 0.0

    return OutputReport(
        name=name,
        dtype=str(ref.dtype),
        shape=list(ref.shape),
        rtol=rtol,
        atol=atol,
        max_abs=stat(diff, np.max),
        mean_abs=stat(diff, np.mean),
        p99_abs=stat(diff, lambda v: np.percentile(v, 99)),
        max_rel=stat(rel, np.max),
        mean_rel=stat(rel, np.mean),
        p99_rel=stat(rel, lambda v: np.percentile(v, 99)),
        nonfinite_mismatches=nonfinite_mismatches,
        violations=violations,
        passed=violations == 0 and nonfinite_mismatches == 0,
    )


ARBITER_SLACK = 1.25  # ours may be this much further from float64 than onnxruntime, and pass


def _as_float64(graph: onnx.GraphProto) -> None:
    """Every float32 tensor of `graph` (initializers, declared values, Cast targets, constants,
    subgraphs) made float64, in place."""
    from onnx import numpy_helper

    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == onnx.TensorProto.FLOAT:
            graph.initializer[index].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            info.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name in ("to", "dtype") and attribute.i == onnx.TensorProto.FLOAT:
                attribute.i = onnx.TensorProto.DOUBLE
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == onnx.TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attribute.t).astype(np.float64), attribute.t.name))
            elif attribute.type == onnx.AttributeProto.GRAPH:
                _as_float64(attribute.g)


def _float64_arbiter(model: onnx.ModelProto, feeds: dict, ours: dict, reference: dict, reports: list) -> None:
    """A float32 output outside the tolerance of onnxruntime's is judged against the exact result:
    the model evaluated in float64 by onnx's reference evaluator. It passes when ours is at most
    `ARBITER_SLACK` times further from that than onnxruntime's (both are float32 computations
    with their own rounding; in a 12-layer model each was ~1.4e-5 from float64 and 2.1e-5 from
    the other, outside the 1e-5 tolerance). Where the model cannot be evaluated so (an op the
    evaluator lacks, a contrib op), the report stays as it is. NaN/inf mismatches never pass."""
    failing = [r for r in reports if not r.passed and r.dtype == "float32" and r.nonfinite_mismatches == 0
               and list(np.shape(ours[r.name])) == r.shape]
    if not failing:
        return
    try:
        from onnx.reference import ReferenceEvaluator

        wide = onnx.ModelProto()
        wide.CopyFrom(model)
        _as_float64(wide.graph)
        wide_feeds = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
        names = [o.name for o in wide.graph.output]
        exact = dict(zip(names, ReferenceEvaluator(wide).run(None, wide_feeds)))
    except Exception:  # noqa: BLE001 - no float64 evaluation: the comparison with onnxruntime stands
        return
    for report in failing:
        if report.name not in exact:
            continue
        truth = np.asarray(exact[report.name], dtype=np.float64)
        finite = np.isfinite(truth)
        if truth.shape != tuple(report.shape) or not finite.any():
            continue
        mine = float(np.abs(ours[report.name].astype(np.float64) - truth)[finite].max())
        theirs = float(np.abs(reference[report.name].astype(np.float64) - truth)[finite].max())
        report.float64_max_abs, report.onnxruntime_float64_max_abs = mine, theirs
        report.passed = mine <= ARBITER_SLACK * theirs


def _median_time(fn, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def check(
    model,
    *,
    target: str = "x86",
    algorithm: str = "auto",
    shapes: dict | None = None,
    inputs: dict | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    time_runs: int = 0,
    compiled=None,
    **options,
) -> CheckReport:
    """Compile (unless `compiled` is given), run ours and onnxruntime, compare every output."""
    from .compiler import compile_model

    source = load_model(model).proto
    bound = bind_constants(bind_shapes(source, shapes), options.pop("constants", None))
    compiled = compiled or compile_model(bound, target, algorithm, None, **options)
    if compiled.target["name"] == "cuda":
        raise InputError("check runs the model here: use target x86, or run the CUDA artifact on a GPU host")
    feeds = make_inputs(bound, seed) if inputs is None else dict(inputs)
    if inputs is not None:
        generated = make_inputs(bound, seed)
        for name, value in generated.items():
            feeds.setdefault(name, value)
    ours = compiled.run(feeds)
    try:
        session = onnxruntime_session(bound)
        ort_feeds = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
        reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, ort_feeds)))
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Exception subclasses
        if not type(err).__module__.startswith("onnxruntime"):
            raise
        import onnxruntime

        raise ReferenceRunError(
            f"onnxruntime {onnxruntime.__version__}, the reference of check, cannot run this model, so nothing was "
            f"compared (the compiled model itself ran; `tvmsoftmax run` gives its outputs): "
            f"{str(err).strip().splitlines()[-1]}"
        ) from err
    reports = []
    for name, ref in reference.items():
        default_rtol, default_atol = DEFAULT_TOLERANCES.get(ref.dtype.name, (0.0, 0.0))
        reports.append(
            compare(name, ours[name], ref,
                    default_rtol if rtol is None else rtol, default_atol if atol is None else atol)
        )
    _float64_arbiter(bound, feeds, ours, reference, reports)
    timings = {}
    if time_runs:
        fast = onnxruntime_session(bound, optimized=True)
        timings["onnxruntime_s"] = _median_time(lambda: fast.run(None, ort_feeds), time_runs)
        timings["tvmsoftmax_s"] = statistics.median(compiled.time(feeds, repeat=time_runs))
    return CheckReport(reports, compiled.sites, compiled.target, timings)
