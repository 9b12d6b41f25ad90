"""Softmax benchmark: every algorithm, onnxruntime, numpy and TVM's default, interleaved.

For each thread count and shape, every implementation is built once, checked against float64,
then timed in rounds: each round times every implementation once (a batch sized to ~20 ms), so that
machine noise hits all of them alike; the median over rounds is reported. Bandwidth is counted at
each algorithm's minimum traffic (ACCESSES below x 4 bytes per element). Results: JSON (every
sample), a markdown table and a PNG plot (GB/s against row length, one line per implementation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

SHAPES = [
    (1, 1000), (64, 1000), (128, 4096), (1024, 1024), (6144, 128), (6144, 512),
    (8, 32000), (8, 128256), (1, 1 << 24), (65536, 2048),
]
OURS = ["three-pass", "three-pass-recompute", "two-pass", "online"]
# Memory accesses per element (reads + writes) of each implementation's algorithm.
ACCESSES = {
    "three-pass": 5, "three-pass-recompute": 4, "two-pass": 3, "online": 3,
    "onnxruntime": 5,  # MLAS: three-pass with reloading
    "numpy": 5,  # max, subtract+exp (stored), sum, divide: at least three-pass's traffic
    "tvm-default": 5,  # topi.nn.softmax unscheduled: max, exp stored, sum, divide
}
OUT_OF_CACHE = [(8, 128256), (1, 1 << 24), (65536, 2048)]


def _worker_env(threads: int) -> dict:
    """Environment of a benchmark worker: TVM's pool is sized at start-up (config_threadpool on a
    running pool has no effect), and nobody spin-waits (spinning pools stall on a shared machine)."""
    env = dict(os.environ)
    env.update({
        "TVM_NUM_THREADS": str(threads),
        "TVM_THREAD_POOL_SPIN_COUNT": "0",
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "OPENBLAS_NUM_THREADS": "1",
    })
    return env


def _onnxruntime(shape, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning pools stall when another process takes a core on this shared 2-core machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def bound_call(x):
        """IOBinding with the input and a preallocated output: the cheapest call path."""
        binding = session.io_binding()
        binding.bind_cpu_input("x", x)
        output = np.empty_like(x)  # kept alive by the closure below: ORT holds only its pointer
        binding.bind_output("y", "cpu", 0, np.float32, list(x.shape), output.ctypes.data)

        def call(binding=binding, output=output):
            session.run_with_iobinding(binding)
            return output

        return call

    return (lambda x: session.run(None, {"x": x})[0]), bound_call


def _numpy(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _tvm_default(shape, spec):
    import tvm
    from tvm import te, topi

    x = te.placeholder(shape, "float32", name="x")
    y = topi.nn.softmax(x, axis=-1)
    executable = tvm.compile(tvm.IRModule({"main": te.create_prim_func([x, y])}), spec.tvm_target())
    function = executable["main"]

    def run(a):
        out = tvm.runtime.empty(shape, "float32", tvm.cpu())
        function(tvm.runtime.tensor(a), out)
        return out.numpy()

    def bound_call(a):
        inp, out = tvm.runtime.tensor(a), tvm.runtime.empty(shape, "float32", tvm.cpu())
        return lambda: function(inp, out)

    return run, bound_call


def _timer(call, number):
    """Mean seconds of `number` back-to-back calls of a pre-bound no-argument callable.

    Every implementation is timed this way (a Python loop over its cheapest call path: TVM
    functions on preallocated tensors, onnxruntime with IOBinding, numpy on arrays), so each
    carries its own per-call overhead, which only matters for the smallest shapes."""

    def timed():
        start = time.perf_counter()
        for _ in range(number):
            call()
        return (time.perf_counter() - start) / number

    return timed


def _calibrate(call, budget=0.02):
    call()
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    number = max(1, min(2000, int(budget / max(first, 1e-7))))
    return _timer(call, number), number


def _reference(x):
    a = x.astype(np.float64)
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def run_workers(module: str, threads, config: dict, log) -> list:
    """Run `python -m module CONFIG` once per thread count (environment from _worker_env), echo its
    output through `log`, and return the concatenated result rows each worker wrote to config["out"]."""
    import subprocess
    import sys
    import tempfile

    results = []
    for nthreads in threads:
        with tempfile.NamedTemporaryFile(suffix=".json") as handle:
            command = [sys.executable, "-m", module, json.dumps({**config, "threads": nthreads, "out": handle.name})]
            process = subprocess.Popen(command, env=_worker_env(nthreads), stdout=subprocess.PIPE, text=True)
            for line in process.stdout:
                log(line.rstrip())
            if process.wait() != 0:
                raise RuntimeError(f"{module} worker for {nthreads} thread(s) failed")
            results.extend(json.loads(Path(handle.name).read_text()))
    return results


def run_softmax_benchmark(threads=(1, 2), shapes=None, repeat=15, out_dir=Path("benchmarks/results"),
                          console=None, implementations=None):
    """Run one worker process per thread count, then write JSON, markdown and the plot."""
    from .lowering.targets import resolve

    shapes = shapes or SHAPES
    implementations = implementations or OURS + ["onnxruntime", "numpy", "tvm-default"]
    spec = resolve("x86")
    log = console.print if console else print
    config = {"shapes": [list(s) for s in shapes], "repeat": repeat, "implementations": implementations}
    results = run_workers("tvmsoftmax.bench", threads, config, log)
    report = {
        "benchmark": "softmax", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": spec.mcpu, "features": list(spec.required_features), "cores": os.cpu_count(),
                    "platform": platform.platform()},
        "versions": _versions(), "repeat": repeat,
        "method": "one worker process per thread count (TVM_NUM_THREADS, no spin-waiting); per shape, "
                  "rounds that time every implementation once (a Python loop over its cheapest pre-bound "
                  "call, batches of ~20 ms); medians over rounds",
        "results": results,
        "summary": summarize(results),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "softmax.json").write_text(json.dumps(report, indent=1))
    (out_dir / "softmax.md").write_text(markdown(report))
    plot(report, out_dir / "softmax.png")
    log(f"wrote {out_dir / 'softmax.json'}, softmax.md, softmax.png")
    return report


def _worker(config: dict) -> None:
    """One thread count, in a process whose pools were sized by _worker_env."""
    from .lowering.kernels import SoftmaxKernel
    from .lowering.targets import resolve

    nthreads, repeat, implementations = config["threads"], config["repeat"], config["implementations"]
    spec = dataclasses.replace(resolve("x86"), num_cores=nthreads)  # knobs for this many threads
    results = []
    for shape in (tuple(s) for s in config["shapes"]):
        rng = np.random.default_rng(0)
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        want = _reference(x)
        timers, meta = {}, {}
        for name in implementations:
            if name in OURS:
                kernel = SoftmaxKernel((shape[0], shape[1], 1), algorithm=name, spec=spec)
                got, call = kernel(x), kernel.bound_call(x)
                meta[name] = {"knobs": kernel.knobs.to_json()}
            elif name == "onnxruntime":
                run, bind = _onnxruntime(shape, nthreads)
                got, call = run(x), bind(x)
            elif name == "numpy":
                got, call = _numpy(x), (lambda x=x: _numpy(x))
            else:
                run, bind = _tvm_default(shape, spec)
                got, call = run(x), bind(x)
            err = np.abs(got.astype(np.float64) - want)
            meta.setdefault(name, {})["max_rel_err"] = float((err / np.maximum(want, 1e-30)).max())
            meta[name]["max_abs_err"] = float(err.max())
            timers[name], meta[name]["batch"] = _calibrate(call)
        samples = {name: [] for name in implementations}
        for _ in range(repeat):
            for name in implementations:  # interleaved: each round times everyone once
                samples[name].append(timers[name]())
        elements = shape[0] * shape[1]
        ort_median = statistics.median(samples["onnxruntime"]) if "onnxruntime" in samples else None
        for name in implementations:
            median = statistics.median(samples[name])
            row = {
                "threads": nthreads, "shape": list(shape), "implementation": name,
                "median_s": median, "min_s": min(samples[name]), "samples_s": samples[name],
                "accesses_per_element": ACCESSES[name],
                "gbps": elements * 4 * ACCESSES[name] / median / 1e9,
                "speedup_vs_onnxruntime": (ort_median / median) if ort_median else None,
                **meta[name],
            }
            results.append(row)
        line = "  ".join(f"{n} {statistics.median(samples[n]) * 1e3:.3f}ms" for n in implementations)
        print(f"threads={nthreads} shape={shape}: {line}", flush=True)
    Path(config["out"]).write_text(json.dumps(results))


def _versions():
    import onnxruntime
    import tvm

    from . import __version__

    return {"tvmsoftmax": __version__, "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def summarize(results):
    """Per thread count: best algorithm's geomean speedup vs onnxruntime, worst shape, and
    two-pass/online vs three-pass on the out-of-cache shapes."""
    summary = {}
    for nthreads in sorted({r["threads"] for r in results}):
        rows = [r for r in results if r["threads"] == nthreads]
        by = {(tuple(r["shape"]), r["implementation"]): r for r in rows}
        shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: s[0] * s[1])
        best = []
        for shape in shapes:
            ours = [by[(shape, a)] for a in OURS if (shape, a) in by]
            if not ours or (shape, "onnxruntime") not in by:
                continue
            winner = max(ours, key=lambda r: r["speedup_vs_onnxruntime"])
            best.append({"shape": list(shape), "algorithm": winner["implementation"],
                         "speedup_vs_onnxruntime": winner["speedup_vs_onnxruntime"]})
        speedups = [b["speedup_vs_onnxruntime"] for b in best]
        entry = {
            "best_per_shape": best,
            "geomean_best_speedup_vs_onnxruntime": float(np.exp(np.mean(np.log(speedups)))) if speedups else None,
            "worst_best_speedup_vs_onnxruntime": min(speedups) if speedups else None,
        }
        for algorithm in ("two-pass", "online"):
            ratios = []
            for shape in OUT_OF_CACHE:
                if (shape, algorithm) in by and (shape, "three-pass") in by:
                    ratios.append(by[(shape, "three-pass")]["median_s"] / by[(shape, algorithm)]["median_s"])
            if ratios:
                entry[f"{algorithm}_vs_three_pass_out_of_cache"] = ratios
        summary[str(nthreads)] = entry
    return summary


def markdown(report) -> str:
    results = report["results"]
    names = list(dict.fromkeys(r["implementation"] for r in results))
    lines = [f"# Softmax benchmark ({report['date']}, {report['machine']['cpu']}, "
             f"{report['machine']['cores']} cores; median of {report['repeat']} interleaved rounds)", ""]
    for nthreads in sorted({r["threads"] for r in results}):
        lines += [f"## {nthreads} thread(s): median ms (speedup vs onnxruntime) [GB/s at minimum traffic]", "",
                  "| shape | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for shape in dict.fromkeys(tuple(r["shape"]) for r in results if r["threads"] == nthreads):
            cells = []
            for name in names:
                r = next(r for r in results if r["threads"] == nthreads and tuple(r["shape"]) == shape and r["implementation"] == name)
                speed = r["speedup_vs_onnxruntime"]
                cells.append(f"{r['median_s'] * 1e3:.3f} ({speed:.2f}x) [{r['gbps']:.1f}]")
            lines.append(f"| {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |")
        s = report["summary"][str(nthreads)]
        lines += ["", f"Best algorithm vs onnxruntime: geometric mean {s['geomean_best_speedup_vs_onnxruntime']:.2f}x, "
                      f"worst shape {s['worst_best_speedup_vs_onnxruntime']:.2f}x."]
        for algorithm in ("two-pass", "online"):
            key = f"{algorithm}_vs_three_pass_out_of_cache"
            if key in s:
                lines.append(f"{algorithm} / three-pass speed on out-of-cache shapes: "
                             + ", ".join(f"{v:.2f}x" for v in s[key]) + ".")
        lines.append("")
    return "\n".join(lines)


def plot(report, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    results = report["results"]
    thread_counts = sorted({r["threads"] for r in results})
    fig, axes = plt.subplots(1, len(thread_counts), figsize=(7 * len(thread_counts), 5), squeeze=False)
    for ax, nthreads in zip(axes[0], thread_counts):
        rows_here = [r for r in results if r["threads"] == nthreads]
        shapes = sorted({tuple(r["shape"]) for r in rows_here}, key=lambda s: (s[1], s[0]))
        for name in dict.fromkeys(r["implementation"] for r in rows_here):
            by_shape = {tuple(r["shape"]): r for r in rows_here if r["implementation"] == name}
            ax.plot(range(len(shapes)), [by_shape[s]["gbps"] for s in shapes], marker="o", label=name)
        ax.set_xticks(range(len(shapes)), [f"{s[0]}x{s[1]}" for s in shapes], rotation=40, ha="right")
        ax.set_xlabel("shape (rows x row length), by row length")
        ax.set_ylabel("GB/s at the algorithm's minimum traffic")
        ax.set_title(f"softmax, {nthreads} thread(s), {report['machine']['cpu']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    _worker(json.loads(sys.argv[1]))
