"""`tvmsoftmax bench attention`: fused attention vs onnxruntime's variants and torch SDPA.

Implementations, timed side by side (interleaved rounds) in one worker process per thread count:

* ``flash`` / ``materialized``: an ONNX Attention-23 graph compiled by tvmsoftmax with that
  strategy;
* ``flash-16B``: ``flash`` fed numpy's usual 16-byte-aligned arrays (every other implementation
  gets the same 64-byte-aligned arrays, `tvmsoftmax.aligned`): TVM's kernels assume 64-byte
  alignment, so `run` copies such inputs first; this row shows that copy's cost;
* ``ort-unfused``: MatMul(Q, K^T) -> Mul(scale) [-> Add(causal mask)] -> Softmax -> MatMul(V) in
  onnxruntime (all graph optimisations on);
* ``ort-mha``: com.microsoft MultiHeadAttention (3-D inputs, ``unidirectional`` for causal);
* ``ort-attention23``: ONNX Attention-23 (``is_causal``);
* ``torch-sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` if torch is installed;
* ``flash-unmasked`` (causal shapes only): ``flash`` compiled without the causal mask, timed in the
  same rounds, so the causal speed-up (`flash_causal_vs_not_causal`) compares two timings taken
  side by side rather than two shapes timed minutes apart.

float32, (B, H, S, D); FLOP count 4*B*H*S^2*D for every shape (causal included, so a causal
speed-up shows as higher GFLOP/s).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .bench import _calibrate, _versions, run_workers

SHAPES = [
    (1, 12, 128, 64, False), (1, 12, 512, 64, False), (1, 16, 2048, 64, False), (1, 32, 1024, 128, False),
    (1, 32, 1024, 128, True),
]
IMPLEMENTATIONS = ["flash", "flash-16B", "materialized", "ort-unfused", "ort-mha", "ort-attention23", "torch-sdpa",
                   "flash-unmasked"]
ORT = ("ort-unfused", "ort-mha", "ort-attention23")


def _models(b, h, s, d, causal):
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    four = [helper.make_tensor_value_info(n, f, [b, h, s, d]) for n in ("Q", "K", "V")]
    out4 = [helper.make_tensor_value_info("Y", f, [b, h, s, d])]
    attention = helper.make_model(
        helper.make_graph([helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=int(causal))],
                          "attention23", four, out4),
        opset_imports=[helper.make_opsetid("", 23)],
    )
    nodes = [
        helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "Kt"], ["S0"]),
        helper.make_node("Mul", ["S0", "scale"], ["S1"]),
    ]
    inits = [numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale")]
    scores = "S1"
    if causal:
        mask = np.triu(np.full((s, s), -np.inf, np.float32), 1)
        inits.append(numpy_helper.from_array(mask, "causal_mask"))
        nodes.append(helper.make_node("Add", ["S1", "causal_mask"], ["S2"]))
        scores = "S2"
    nodes += [helper.make_node("Softmax", [scores], ["P"], axis=-1), helper.make_node("MatMul", ["P", "V"], ["Y"])]
    unfused = helper.make_model(helper.make_graph(nodes, "unfused", four, out4, inits),
                                opset_imports=[helper.make_opsetid("", 17)])
    three = [helper.make_tensor_value_info(n, f, [b, s, h * d]) for n in ("q", "k", "v")]
    mha = helper.make_model(
        helper.make_graph([helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
                                            num_heads=h, unidirectional=int(causal))],
                          "mha", three, [helper.make_tensor_value_info("y", f, [b, s, h * d])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    return attention, unfused, mha


def _reference(q, k, v, causal):
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if causal:
        s = s + np.triu(np.full(s.shape[-2:], -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _worker(config: dict) -> None:
    import onnxruntime as ort

    import tvmsoftmax

    def sixteen(a):  # a copy at 16 (mod 64) bytes, as numpy's large arrays usually are
        raw = np.empty(a.nbytes + 128, np.uint8)
        offset = (16 - raw.ctypes.data) % 64
        out = raw[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out

    threads, repeat = config["threads"], config["repeat"]
    results = []
    for b, h, s, d, causal in (tuple(x) for x in config["shapes"]):
        rng = np.random.default_rng(0)
        q, k, v = (tvmsoftmax.aligned(rng.standard_normal((b, h, s, d)).astype(np.float32)) for _ in range(3))
        want = _reference(q, k, v, causal) if s <= 1024 else None
        attention, unfused, mha = _models(b, h, s, d, causal)
        feeds4 = {"Q": q, "K": k, "V": v}
        to3 = lambda a: tvmsoftmax.aligned(a.transpose(0, 2, 1, 3).reshape(b, s, h * d))  # noqa: E731
        feeds3 = {"q": to3(q), "k": to3(k), "v": to3(v)}
        calls, outputs = {}, {}
        for name in config["implementations"]:
            if name == "flash-unmasked":
                if not causal:
                    continue
                compiled = tvmsoftmax.compile(_models(b, h, s, d, False)[0], attention="flash")
                calls[name] = lambda c=compiled: c.run(feeds4)
                continue
            if name in ("flash", "materialized", "flash-16B"):
                compiled = tvmsoftmax.compile(attention, attention=name.removesuffix("-16B"))
                feeds = {n: sixteen(a) for n, a in feeds4.items()} if name == "flash-16B" else feeds4
                calls[name] = lambda c=compiled, fe=feeds: c.run(fe)
                outputs[name] = lambda c=compiled, fe=feeds: c.run(fe)["Y"]
            elif name in ORT:
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                # As every pool here: no spin-waiting (a spinning pool keeps the cores busy after its
                # call and slows whatever is timed next on this shared 2-core machine).
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                model, feeds = {"ort-unfused": (unfused, feeds4), "ort-mha": (mha, feeds3),
                                "ort-attention23": (attention, feeds4)}[name]
                session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                calls[name] = lambda se=session, fe=feeds: se.run(None, fe)
                if name == "ort-mha":
                    outputs[name] = lambda se=session: se.run(None, feeds3)[0].reshape(b, s, h, d).transpose(0, 2, 1, 3)
                else:
                    outputs[name] = lambda se=session, fe=feeds: se.run(None, fe)[0]
            elif name == "torch-sdpa":
                try:
                    import torch
                except ImportError:
                    continue
                torch.set_num_threads(threads)
                tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

                def sdpa(tq=tq, tk=tk, tv=tv):
                    with torch.no_grad():
                        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                calls[name], outputs[name] = sdpa, (lambda f=sdpa: f().numpy())
        meta, timers = {}, {}
        for name, call in calls.items():
            meta[name] = {}
            if want is not None and name in outputs:  # (flash-unmasked computes another function)
                got = outputs[name]()
                meta[name]["max_abs_err"] = float(np.abs(got.astype(np.float64) - want).max())
            timers[name], meta[name]["batch"] = _calibrate(call, budget=0.05)
        samples = {name: [] for name in calls}
        for _ in range(repeat):
            for name in calls:
                samples[name].append(timers[name]())
        flops = 4 * b * h * s * s * d
        best_ort = min(statistics.median(samples[n]) for n in ORT if n in samples)
        for name in calls:
            median = statistics.median(samples[name])
            results.append({
                "threads": threads, "shape": [b, h, s, d], "causal": causal, "implementation": name,
                "median_s": median, "min_s": min(samples[name]), "samples_s": samples[name],
                "gflops": flops / median / 1e9, "speedup_vs_best_onnxruntime": best_ort / median, **meta[name],
            })
        line = "  ".join(f"{n} {statistics.median(samples[n]) * 1e3:.2f}ms" for n in calls)
        print(f"threads={threads} (B,H,S,D)=({b},{h},{s},{d}){' causal' if causal else ''}: {line}", flush=True)
    Path(config["out"]).write_text(json.dumps(results))


def summarize(results: list) -> dict:
    out = {}
    for threads in sorted({r["threads"] for r in results}):
        rows = [r for r in results if r["threads"] == threads]
        per_shape = {}
        for r in rows:
            key = f"{tuple(r['shape'])}{' causal' if r['causal'] else ''}"
            per_shape.setdefault(key, {})[r["implementation"]] = r["median_s"]
        summary = {}
        for key, times in per_shape.items():
            best_ort = min(times[n] for n in ORT if n in times)
            ours = min(times[n] for n in ("flash", "materialized") if n in times)
            summary[key] = {"best_ours_vs_best_onnxruntime": best_ort / ours,
                            "flash_vs_best_onnxruntime": best_ort / times["flash"] if "flash" in times else None,
                            "flash_16B_vs_best_onnxruntime":
                                best_ort / times["flash-16B"] if "flash-16B" in times else None}
        # Causal vs the same shape without the mask (flash): timed side by side (flash-unmasked),
        # else from the two shapes' rows when both were run.
        flash = {(tuple(r["shape"]), r["causal"]): r["median_s"] for r in rows if r["implementation"] == "flash"}
        for (shape, causal), median in flash.items():
            times = per_shape.get(f"{shape} causal", {})
            if causal and "flash-unmasked" in times:
                summary[f"{shape} causal"]["flash_causal_vs_not_causal"] = times["flash-unmasked"] / median
            elif causal and (shape, False) in flash:
                summary[f"{shape} causal"]["flash_causal_vs_not_causal"] = flash[(shape, False)] / median
        out[f"{threads} thread(s)"] = summary
    return out


def markdown(report: dict) -> str:
    lines = [f"# Attention benchmark ({report['date']}, {report['machine']['cpu']})", "",
             "Median ms (speed-up vs the best onnxruntime variant)", ""]
    names = [n for n in IMPLEMENTATIONS if any(r["implementation"] == n for r in report["results"])]
    lines.append("| threads | (B,H,S,D) | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 2) + "|")
    keys = []
    for r in report["results"]:
        key = (r["threads"], tuple(r["shape"]), r["causal"])
        if key not in keys:
            keys.append(key)
    for threads, shape, causal in keys:
        cells = []
        for n in names:
            row = next((r for r in report["results"] if (r["threads"], tuple(r["shape"]), r["causal"], r["implementation"])
                        == (threads, shape, causal, n)), None)
            cells.append(f"{row['median_s'] * 1e3:.2f} ({row['speedup_vs_best_onnxruntime']:.2f}x)" if row else "-")
        lines.append(f"| {threads} | {shape}{' causal' if causal else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_attention_benchmark(threads=(1, 2), shapes=None, repeat=5, out_dir=Path("benchmarks/results"),
                            console=None, implementations=None):
    from .lowering.targets import resolve

    shapes = shapes or SHAPES
    log = console.print if console else print
    config = {"shapes": [list(s) for s in shapes], "repeat": repeat,
              "implementations": implementations or IMPLEMENTATIONS}
    results = run_workers("tvmsoftmax.bench_attention", threads, config, log)
    spec = resolve("x86")
    report = {
        "benchmark": "attention", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": spec.mcpu, "features": list(spec.required_features), "cores": os.cpu_count(),
                    "platform": platform.platform()},
        "versions": _versions(), "repeat": repeat, "dtype": "float32",
        "method": "one worker process per thread count (TVM_NUM_THREADS / intra_op_num_threads / "
                  "torch.set_num_threads, no spin-waiting); per shape, rounds that time every "
                  "implementation once (batches of ~50 ms, at least one call); medians over rounds",
        "results": results, "summary": summarize(results),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps(report, indent=1))
    (out_dir / "attention.md").write_text(markdown(report))
    log(f"wrote {out_dir / 'attention.json'} and attention.md")
    return report


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
