"""Runner of a tvmsoftmax runtime bundle (copied into the bundle as ``run.py``).

Needs Python and numpy on the host; TVM's runtime and the loader come from the bundle's
``python/`` folder, and TVM's compiler is never loaded (``TVM_USE_RUNTIME_LIB=1``).

    python run.py                       list the artifacts and check cases
    python run.py check [--time N] [--json FILE]
                                        run every case, compare with the build machine's reference
                                        outputs (max abs/rel error, tolerance per case), time N runs
    python run.py run ARTIFACT --input NAME=FILE.npy ... [-o OUT.npz]

`open_bundle(path)` and `run_case(...)` are the same steps for scripts (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def open_bundle(path=HERE) -> dict:
    """Put the bundle's python/ first on sys.path (runtime-only TVM) and return bundle.json."""
    path = Path(path).resolve()
    meta = json.loads((path / "bundle.json").read_text())
    want = meta["python"]
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if want != have:
        raise SystemExit(f"{path}: bundle is for Python {want}, this is Python {have}; write the bundle with --python {have}")
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    if "tvm" in sys.modules and not str(Path(sys.modules["tvm"].__file__)).startswith(str(path)):
        raise SystemExit("another TVM is already imported in this process; run the bundle in a fresh process")
    sys.path.insert(0, str(path / "python"))
    meta["path"] = str(path)
    return meta


def load_artifact(meta: dict, name: str):
    import tvmsoftmax

    return tvmsoftmax.load(Path(meta["path"]) / "artifacts" / name)


def case_arrays(meta: dict, case: str) -> tuple[dict, dict]:
    import numpy as np

    with np.load(Path(meta["path"]) / "cases" / f"{case}.npz") as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
        outputs = {k[4:]: data[k] for k in data.files if k.startswith("out.")}
    return inputs, outputs


def compare(got, want, rtol: float, atol: float) -> dict:
    """Max abs/rel error (float64) and whether |got - want| <= atol + rtol * |want| everywhere;
    NaN must be where the reference has NaN."""
    import numpy as np

    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if g.shape != w.shape:
        return {"ok": False, "error": f"shape {list(g.shape)} != reference {list(w.shape)}"}
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    finite = ~(nan_g | nan_w) & np.isfinite(w)
    diff = np.abs(g - w)[finite]
    scale = np.abs(w)[finite]
    same_inf = np.array_equal(np.isinf(w) & ~nan_g, np.isinf(w)) and np.array_equal(g[np.isinf(w)], w[np.isinf(w)])
    ok = bool(np.array_equal(nan_g, nan_w) and same_inf and np.all(diff <= atol + rtol * scale))
    rel = diff / np.maximum(scale, np.finfo(np.float32).tiny)
    return {"ok": ok, "max_abs_err": float(diff.max(initial=0.0)), "max_rel_err": float(rel.max(initial=0.0)),
            "nan_match": bool(np.array_equal(nan_g, nan_w))}


def run_case(meta: dict, case: str, time_runs: int = 0, model=None) -> dict:
    info = meta["cases"][case]
    model = model or load_artifact(meta, info["artifact"])
    inputs, outputs = case_arrays(meta, case)
    got = model.run(inputs)
    report = {"case": case, "artifact": info["artifact"], "outputs": {}}
    for name, want in outputs.items():
        report["outputs"][name] = compare(got[name], want, info.get("rtol", 1e-5), info.get("atol", 1e-6))
    report["ok"] = all(o["ok"] for o in report["outputs"].values())
    if time_runs:
        samples = model.time(inputs, repeat=time_runs)
        report["median_s"] = sorted(samples)[len(samples) // 2]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check")
    check.add_argument("--time", type=int, default=0)
    check.add_argument("--json")
    run = sub.add_parser("run")
    run.add_argument("artifact")
    run.add_argument("--input", action="append", default=[])
    run.add_argument("-o", "--output")
    args = parser.parse_args(argv)
    meta = open_bundle(HERE)
    if args.command is None:
        for name, art in meta["artifacts"].items():
            print(f"artifact {name}: target {art['target']['name']} {art['target'].get('arch') or ''}")
        for name, case in meta["cases"].items():
            print(f"case {name}: {case['artifact']}")
        return 0
    if args.command == "run":
        import numpy as np

        feeds = {}
        for item in args.input:
            key, _, file = item.partition("=")
            feeds[key] = np.load(file)
        outputs = load_artifact(meta, args.artifact).run(feeds)
        if args.output:
            np.savez(args.output, **outputs)
        for key, value in outputs.items():
            print(f"{key}: {value.dtype} {list(value.shape)}")
        return 0
    reports, models = [], {}
    for case, info in meta["cases"].items():
        model = models.get(info["artifact"]) or models.setdefault(info["artifact"], load_artifact(meta, info["artifact"]))
        start = time.perf_counter()
        report = run_case(meta, case, args.time, model)
        errors = ", ".join(f"{k} max abs {o.get('max_abs_err', float('nan')):.2e} rel {o.get('max_rel_err', float('nan')):.2e}"
                           for k, o in report["outputs"].items())
        timing = f" median {report['median_s'] * 1e3:.3f} ms" if "median_s" in report else ""
        print(f"{'ok  ' if report['ok'] else 'FAIL'} {case}: {errors}{timing} ({time.perf_counter() - start:.1f} s)")
        reports.append(report)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
