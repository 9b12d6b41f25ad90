"""GPU check and benchmark of compiled softmax artifacts: build here, run on a GPU host.

Two steps, on two machines:

    # build machine (tvmsoftmax + TVM installed; no GPU needed)
    python benchmarks/gpu_check.py prepare gpu-bundle --arch sm_90 --python 3.12
    # GPU host (Python, numpy, PyTorch; no TVM): copy gpu-bundle/ and this file over
    python gpu_check.py run gpu-bundle --out gpu_check.json

`prepare` compiles Softmax and LogSoftmax, every algorithm, float32 and float16, with symbolic
[rows, length] dims (one artifact each), and adds check cases whose reference outputs onnxruntime
computes here (graph optimisations off): random rows, edge rows (-inf, -FLT_MAX, -1e9 masks, +inf,
NaN, huge ranges) and a long row. It writes a runtime bundle (`tvmsoftmax.deploy`).

It also compiles each large shape with static dims (``*-<rows>x<length>.tvmsm``: the schedules
that need static rows, 16-byte loads and rows split across blocks, apply there) and ONNX
Attention-23 in float16 for the attention shapes (fused flash attention on tensor cores), with check cases whose
references onnxruntime computes here (a small causal case and a small non-causal one).

`run` runs every check case (max abs/rel error against those references, tolerance per dtype),
then times every artifact on the large shapes against ``torch.softmax`` / ``torch.log_softmax``
(device-resident inputs, medians of CUDA-synchronised runs), checks the large outputs against
torch in float64, measures the device's copy bandwidth (``torch`` clone), times the attention
artifacts against ``torch.nn.functional.scaled_dot_product_attention`` (TFLOP/s counted as
4 B H S^2 D, halved when causal, for both) and writes JSON with the device name. Traffic counted at
each algorithm's minimum (read + write once per element, plus one extra read per extra pass:
three-pass 5 accesses per element with its stored exponentials, recompute 4, two-pass and online 3).

``--target x86`` builds the same bundle for this CPU (and ``run --device cpu`` runs it), which is
how the tests exercise both steps without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ALGORITHMS = ["three-pass", "three-pass-recompute", "two-pass", "online"]
ACCESSES = {"three-pass": 5, "three-pass-recompute": 4, "two-pass": 3, "online": 3}
LARGE_SHAPES = [(4096, 32000), (32, 128256), (1, 1 << 26), (65536, 1024)]
# (B, H, S, D, causal), float16: the shapes of the CUDA issue.
ATTENTION_SHAPES = [(1, 12, 512, 64, False), (4, 32, 2048, 64, False), (1, 32, 4096, 128, True)]
ATTENTION_CHECKS = {"attention-check-1x2x200x64-causal": (1, 2, 200, 64, True),
                    "attention-check-2x3x77x32": (2, 3, 77, 32, False)}
# onnxruntime GroupQueryAttention, one symbolic float16 model (rotary, head sink) for both steps:
# name: (batch, new tokens, seqlens_k, total_sequence_length) over a 16-row past buffer
GQA_CHECKS = {"gqa-check-decode-ragged-batch": (2, 1, [15, 9], 16), "gqa-check-first-prompt": (1, 12, [11], 12)}
GQA_HEADS, GQA_KV_HEADS, GQA_HEAD_SIZE, GQA_PAST = 8, 2, 64, 16
DTYPES = ["float32", "float16"]
FLT_MAX = float(np.finfo(np.float32).max)


def _artifact_name(op: str, algorithm: str, dtype: str) -> str:
    return f"{op.lower()}-{algorithm}-{dtype}.tvmsm"


def _static_name(op: str, algorithm: str, dtype: str, shape) -> str:
    return f"{op.lower()}-{algorithm}-{dtype}-{'x'.join(map(str, shape))}.tvmsm"


def _attention_name(shape) -> str:
    b, h, s, d, causal = shape
    return f"attention-float16-{b}x{h}x{s}x{d}{'-causal' if causal else ''}.tvmsm"


def _model(op: str, dtype: str, shape=("rows", "length")):
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], axis=-1)], "g",
        [helper.make_tensor_value_info("x", elem, list(shape))],
        [helper.make_tensor_value_info("y", elem, list(shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _attention_model(shape):
    """ONNX Attention-23, float16 Q, K, V of [B, H, S, D], default scale 1/sqrt(D)."""
    from onnx import TensorProto, helper

    b, h, s, d, causal = shape
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [b, h, s, d]) for n in ("Q", "K", "V", "Y")]
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=int(causal))
    graph = helper.make_graph([node], "attention", values[:3], values[3:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _parse_attention_shape(text: str):
    """'1x32x4096x128c' -> (1, 32, 4096, 128, True)."""
    causal = text.endswith("c")
    return (*(int(d) for d in text.rstrip("c").split("x")), causal)


def _edge_rows(length: int, rng) -> np.ndarray:
    rows = rng.standard_normal((12, length)).astype(np.float32) * 4
    rows[0, :] = -np.inf
    rows[1, : length // 2] = -np.inf
    rows[2, :] = -FLT_MAX
    rows[3, 1::2] = -1e9
    rows[4, 3] = np.inf
    rows[5, 5] = np.nan
    rows[6] *= 1e4  # huge range
    rows[7, 1::3] = -1e4
    rows[8, :] = 0.0
    return rows


def prepare(out: Path, target: str, arch: str | None, python: str | None, ffi_wheel, shapes=None,
            algorithms=None, attention_shapes=None) -> Path:
    import onnxruntime as ort

    import tvmsoftmax
    from tvmsoftmax.deploy import write_bundle

    algorithms = algorithms or ALGORITHMS
    work = out.parent / f".{out.name}.artifacts"
    work.mkdir(parents=True, exist_ok=True)
    artifacts, cases = [], {}
    rng = np.random.default_rng(0)
    inputs = {"random-64x1000": rng.standard_normal((64, 1000)).astype(np.float32) * 3,
              "edges-12x4099": _edge_rows(4099, rng),
              "long-1x65537": rng.standard_normal((1, 65537)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for op in ("Softmax", "LogSoftmax"):
        for dtype in DTYPES:
            model = _model(op, dtype)
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            for algorithm in algorithms:
                name = _artifact_name(op, algorithm, dtype)
                kwargs = {"arch": arch} if target == "cuda" else {}
                try:
                    compiled = tvmsoftmax.compile(model, target=target, algorithm=algorithm, **kwargs)
                except tvmsoftmax.TvmSoftmaxError as err:  # e.g. three-pass on CUDA with symbolic rows
                    print(f"skip {name}: {err}")
                else:
                    artifacts.append(compiled.save(work / name))
                    print(f"compiled {name}", flush=True)
                    for case, x in inputs.items():
                        x = x.astype(dtype)
                        (y,) = session.run(None, {"x": x})
                        rtol, atol = (1e-5, 1e-5) if dtype == "float32" else (1e-3, 1e-3)
                        if op == "LogSoftmax":  # the sum's rounding carried into log (README)
                            atol = max(atol, float(np.finfo(np.float32).eps) * x.shape[1] / 16)
                        cases[f"{name[:-6]}-{case}"] = {"artifact": name, "inputs": {"x": x}, "outputs": {"y": y},
                                                       "rtol": rtol, "atol": atol, "op": op, "algorithm": algorithm,
                                                       "dtype": dtype}
                for shape in shapes or LARGE_SHAPES:  # static dims: vector loads, split rows
                    static = _static_name(op, algorithm, dtype, shape)
                    try:
                        compiled = tvmsoftmax.compile(_model(op, dtype, shape), target=target, algorithm=algorithm, **kwargs)
                    except tvmsoftmax.TvmSoftmaxError as err:  # three-pass: long rows on CUDA
                        print(f"skip {static}: {err}")
                        continue
                    artifacts.append(compiled.save(work / static))
                    print(f"compiled {static} (knobs {compiled.sites[0]['lowered']['knobs']})", flush=True)
    attention_shapes = ATTENTION_SHAPES if attention_shapes is None else attention_shapes
    for case, shape in ATTENTION_CHECKS.items() if attention_shapes else ():
        artifacts.append(_compile_attention(shape, target, arch, work))
        model = _attention_model(shape)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {n: rng.standard_normal(shape[:4]).astype(np.float16) for n in ("Q", "K", "V")}
        (y,) = session.run(None, feeds)
        cases[case] = {"artifact": _attention_name(shape), "inputs": feeds, "outputs": {"Y": y},
                       "rtol": 2e-3, "atol": 2e-3, "op": "Attention", "dtype": "float16"}
    for shape in attention_shapes:
        artifacts.append(_compile_attention(shape, target, arch, work))
    if attention_shapes:
        artifacts.append(_gqa_checks(target, arch, work, cases, rng))
    extra = {"gpu_check": {"large_shapes": [list(s) for s in (shapes or LARGE_SHAPES)], "accesses": ACCESSES,
                           "attention_shapes": [list(s) for s in attention_shapes]}}
    return write_bundle(out, artifacts, cases=cases, python=python, ffi_wheel=ffi_wheel, extra=extra)


def _gqa_model():
    from onnx import TensorProto, helper

    from tvmsoftmax.models.attention_nodes import group_query_attention

    model = group_query_attention(1, 1, GQA_PAST, GQA_HEADS, GQA_KV_HEADS, GQA_HEAD_SIZE, rotary=(GQA_HEAD_SIZE // 2, False),
                                  dtype=TensorProto.FLOAT16, symbolic=True)
    node = model.graph.node[0]
    node.input.extend([""] * (11 - len(node.input)) + ["head_sink"])
    model.graph.input.append(helper.make_tensor_value_info("head_sink", TensorProto.FLOAT16, [GQA_HEADS]))
    return model


def _gqa_checks(target: str, arch: str | None, work: Path, cases: dict, rng) -> Path:
    """The GroupQueryAttention model compiled once (symbolic dims); its decode and first-prompt
    cases with onnxruntime's CPU outputs (output and both presents) as the reference."""
    import onnxruntime as ort

    import tvmsoftmax
    from tvmsoftmax.models.attention_nodes import gqa_feeds

    model = _gqa_model()
    kwargs = {"arch": arch} if target == "cuda" else {}
    compiled = tvmsoftmax.compile(model, target=target, **kwargs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    for case, (batch, tokens, seqlens, total) in GQA_CHECKS.items():
        feeds = gqa_feeds(rng, batch, tokens, GQA_PAST, GQA_HEADS, GQA_KV_HEADS, GQA_HEAD_SIZE, seqlens, total,
                          dtype="float16")
        feeds["head_sink"] = rng.standard_normal(GQA_HEADS).astype(np.float16)
        cases[case] = {"artifact": "gqa-float16.tvmsm", "inputs": feeds, "outputs": dict(zip(names, session.run(None, feeds))),
                       "rtol": 2e-3, "atol": 2e-3, "op": "GroupQueryAttention", "dtype": "float16"}
    print("compiled gqa-float16", flush=True)
    return compiled.save(work / "gqa-float16.tvmsm")


def _compile_attention(shape, target: str, arch: str | None, work: Path) -> Path:
    import tvmsoftmax

    kwargs = {"arch": arch} if target == "cuda" else {}
    compiled = tvmsoftmax.compile(_attention_model(shape), target=target, attention="flash", **kwargs)
    fused = [s for s in compiled.sites if s.get("kind") == "attention" and s["rewritten"]]
    assert len(fused) == 1, f"attention {shape} not fused"
    print(f"compiled {_attention_name(shape)}", flush=True)
    return compiled.save(work / _attention_name(shape))


def _median_time(fn, sync, budget=0.5, repeat=15) -> float:
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    batch = max(1, min(1000, int(0.02 / once)))
    samples = []
    deadline = time.perf_counter() + budget
    while len(samples) < repeat or (time.perf_counter() < deadline and len(samples) < 3 * repeat):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / batch)
    return statistics.median(samples)


def run(bundle: Path, out: Path, device: str) -> dict:
    sys.path.insert(0, str(bundle))
    import run as runner  # the bundle's run.py

    meta = runner.open_bundle(bundle)
    import torch

    import tvm

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    report = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "tvm_runtime": tvm.__version__, "checks": [], "timings": []}
    models = {}
    for case, info in meta["cases"].items():
        model = models.get(info["artifact"]) or models.setdefault(info["artifact"], runner.load_artifact(meta, info["artifact"]))
        entry = runner.run_case(meta, case, 0, model)
        report["checks"].append(entry)
        worst = max((o.get("max_abs_err", float("nan")) for o in entry["outputs"].values()), default=float("nan"))
        print(f"{'ok  ' if entry['ok'] else 'FAIL'} {case}: max abs {worst:.2e}", flush=True)
    # Copy bandwidth of the device (read + write), the roof for a pass over memory.
    big = torch.empty(1 << 28, dtype=torch.float32, device=dev) if dev.type == "cuda" else torch.empty(1 << 24)
    copy_s = _median_time(lambda: big.clone(), sync)
    report["copy_bandwidth_gbs"] = 2 * big.numel() * 4 / copy_s / 1e9
    del big
    for rows, length in meta["gpu_check"]["large_shapes"]:
        for dtype in DTYPES:
            tdtype = getattr(torch, dtype)
            x = torch.randn(rows, length, device=dev, dtype=torch.float32).to(tdtype)
            for op in ("Softmax", "LogSoftmax"):
                fn = torch.softmax if op == "Softmax" else torch.log_softmax
                torch_s = _median_time(lambda fn=fn: fn(x, dim=-1), sync)
                want = fn(x.double(), dim=-1)
                row = {"shape": [rows, length], "dtype": dtype, "op": op, "torch_s": torch_s, "algorithms": {}}
                for algorithm in ACCESSES:
                    # "symbolic": one artifact for every shape; "static": compiled for this shape
                    for kind, name in (("symbolic", _artifact_name(op, algorithm, dtype)),
                                       ("static", _static_name(op, algorithm, dtype, (rows, length)))):
                        if name not in meta["artifacts"]:
                            continue
                        model = models.get(name) or models.setdefault(name, runner.load_artifact(meta, name))
                        args = [tvm.runtime.from_dlpack(x)]
                        call = lambda model=model, args=args: model._invoke(args)  # noqa: E731
                        seconds = _median_time(call, sync)
                        got = torch.from_dlpack(call())
                        err = (got.double() - want).abs().nan_to_num(0.0).max().item()
                        gbs = rows * length * x.element_size() * ACCESSES[algorithm] / seconds / 1e9
                        key = algorithm if kind == "symbolic" else f"{algorithm} (static)"
                        row["algorithms"][key] = {
                            "median_s": seconds, "vs_torch": torch_s / seconds, "max_abs_err_vs_torch64": err,
                            "gbs_at_min_traffic": gbs, "fraction_of_copy_bandwidth": gbs / report["copy_bandwidth_gbs"],
                            "knobs": meta["artifacts"][name].get("sites", [{}])[0].get("lowered", {}).get("knobs"),
                        }
                report["timings"].append(row)
                best = min(row["algorithms"].items(), key=lambda kv: kv[1]["median_s"], default=None)
                print(f"{op} {dtype} {rows}x{length}: torch {torch_s * 1e3:.3f} ms"
                      + (f", best {best[0]} {best[1]['median_s'] * 1e3:.3f} ms ({best[1]['vs_torch']:.2f}x)" if best else ""),
                      flush=True)
            del x
    report["attention"] = [_time_attention(shape, meta, models, runner, dev, sync)
                           for shape in meta["gpu_check"].get("attention_shapes", [])]
    report["ok"] = all(c["ok"] for c in report["checks"])
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


def _time_attention(shape, meta, models, runner, dev, sync) -> dict:
    """Our fused flash attention against torch SDPA (same inputs, float16 on CUDA, float32 on the
    CPU where torch has no float16 SDPA kernel for every shape); error against SDPA in float32."""
    import torch
    import torch.nn.functional as F

    import tvm

    b, h, s, d, causal = shape
    name = _attention_name(shape)
    model = models.get(name) or models.setdefault(name, runner.load_artifact(meta, name))
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.float32).to(torch.float16) for _ in range(3))
    sdpa_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sq, sk, sv = (t.to(sdpa_dtype) for t in (q, k, v))
    torch_s = _median_time(lambda: F.scaled_dot_product_attention(sq, sk, sv, is_causal=causal), sync)
    args = [tvm.runtime.from_dlpack(t) for t in (q, k, v)]
    call = lambda: model._invoke(args)  # noqa: E731
    seconds = _median_time(call, sync)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    err = (torch.from_dlpack(call()).float() - want).abs().max().item()
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    entry = {"shape": [b, h, s, d], "causal": causal, "dtype": "float16", "median_s": seconds,
             "torch_sdpa_s": torch_s, "tflops": flops / seconds / 1e12, "torch_sdpa_tflops": flops / torch_s / 1e12,
             "fraction_of_sdpa": torch_s / seconds, "max_abs_err_vs_sdpa_float32": err}
    print(f"attention {b}x{h}x{s}x{d}{' causal' if causal else ''}: ours {seconds * 1e3:.3f} ms "
          f"({entry['tflops']:.1f} TFLOP/s), SDPA {torch_s * 1e3:.3f} ms ({entry['torch_sdpa_tflops']:.1f}), "
          f"max abs err {err:.1e}", flush=True)
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    p.add_argument("--target", choices=["cuda", "x86"], default="cuda")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--python", default=None)
    p.add_argument("--ffi-wheel", default=None)
    p.add_argument("--shapes", default=None, help="large shapes, e.g. 4096x32000,65536x1024")
    p.add_argument("--algorithms", default=None, help="comma-separated (default: all four)")
    p.add_argument("--attention-shapes", default=None,
                   help="BxHxSxD[c] (c: causal), comma-separated; 'none' for no attention")
    r = sub.add_parser("run")
    r.add_argument("bundle", type=Path)
    r.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    r.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
        algorithms = args.algorithms.split(",") if args.algorithms else None
        attention = None
        if args.attention_shapes:
            attention = [] if args.attention_shapes == "none" else [
                _parse_attention_shape(t) for t in args.attention_shapes.split(",")]
        path = prepare(args.out, args.target, args.arch, args.python, args.ffi_wheel, shapes, algorithms, attention)
        print(f"wrote {path}")
        return 0
    report = run(args.bundle, args.out, args.device)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
