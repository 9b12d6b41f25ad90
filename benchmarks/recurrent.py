"""Recurrent models: stacked RNN/GRU/LSTM (`tvmsoftmax.models.recurrent.stacked`, the form torch
exports) compiled by tvmsoftmax (the recurrent nodes unrolled into plain ops,
`tvmsoftmax.lowering.recurrent`) vs onnxruntime's fused recurrent kernels (all graph
optimisations), same inputs, interleaved rounds, medians; compile time; each compiled model checked
against onnxruntime with optimisations off. Writes benchmarks/results/recurrent.json.

    TVM_NUM_THREADS=1 python benchmarks/recurrent.py   # onnxruntime gets the same thread count
"""

import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

import tvmsoftmax
from tvmsoftmax.models.recurrent import stacked

STEPS, BATCH, INPUTS, HIDDEN = 64, 4, 32, 48
# (name, op, batch dim of the model: an int, or a name for a symbolic dim)
CONFIGS = [("lstm", "LSTM", BATCH), ("gru", "GRU", BATCH), ("rnn", "RNN", BATCH), ("lstm-symbolic-batch", "LSTM", "batch")]


def _median_of_rounds(calls: dict, rounds: int = 15, budget: float = 0.05) -> dict:
    batches = {}
    for name, call in calls.items():
        call()
        start = time.perf_counter()
        call()
        batches[name] = max(1, int(budget / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(batches[name]):
                call()
            samples[name].append((time.perf_counter() - start) / batches[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def main():
    warnings.simplefilter("ignore")
    threads = int(os.environ["TVM_NUM_THREADS"])  # set by the caller, or by tvmsoftmax at import
    results = []
    for name, op, batch in CONFIGS:
        model = stacked(op, layers=2, bidirectional=True, steps=STEPS, batch=batch, inputs=INPUTS, hidden=HIDDEN)
        x = np.random.default_rng(0).standard_normal((STEPS, BATCH, INPUTS)).astype(np.float32)
        feeds = {"X": x}
        start = time.perf_counter()
        compiled = tvmsoftmax.compile(model)
        compile_s = time.perf_counter() - start
        report = tvmsoftmax.check(model, compiled=compiled, inputs=feeds)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        medians = _median_of_rounds({
            "tvmsoftmax": lambda c=compiled, f=feeds: c.run(f),
            "onnxruntime": lambda s=session, f=feeds: s.run(None, f),
        })
        row = {"model": name, "op": op, "layers": 2, "bidirectional": True, "steps": STEPS, "batch": batch,
               "inputs": INPUTS, "hidden": HIDDEN, "threads": threads, "check_passed": report.passed,
               "max_abs_err": max(o.max_abs for o in report.outputs),
               "compile_s": compile_s,
               "tvmsoftmax_ms": medians["tvmsoftmax"] * 1e3, "onnxruntime_ms": medians["onnxruntime"] * 1e3,
               "speedup_vs_onnxruntime": medians["onnxruntime"] / medians["tvmsoftmax"]}
        print(json.dumps(row), flush=True)
        results.append(row)
    out = Path(__file__).parent / "results" / "recurrent.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor()
                               or platform.machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
