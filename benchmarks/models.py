"""Whole-model timing: the tvmsoftmax.models families (tiny, and at bert-base/gpt2/vit-base size)
compiled by tvmsoftmax vs onnxruntime (all graph optimisations), same inputs, interleaved rounds,
medians. Each result is also checked against onnxruntime with optimisations off. Writes
benchmarks/results/models.json.

    TVM_NUM_THREADS=1 python benchmarks/models.py   # onnxruntime gets the same thread count
    TVM_NUM_THREADS=1 python benchmarks/models.py results/emeraldrapids/models.json   # another path
"""

import json
import os
import sys
import time
import warnings
from pathlib import Path

import onnxruntime as ort

import tvmsoftmax
from tvmsoftmax.lowering.check import make_inputs
from tvmsoftmax.lowering.targets import resolve
from tvmsoftmax.models import build
from _timing import median_of_rounds  # benchmarks/_timing.py (run as a script)

SHAPES = {
    "bert": {"input_ids": [1, 64], "attention_mask": [1, 64]},
    "gpt2": {"input_ids": [1, 64], "attention_mask": [1, 64]},
    "llama": {"input_ids": [1, 64], "attention_mask": [1, 64]},
    "vit": {"pixel_values": [1, 3, 32, 32]},
}
# The same families at the size of bert-base / gpt2 / vit-base (12 layers, width 768, 12 heads;
# a 1000-word vocabulary: the embedding gather is not what is timed), where the matmuls dominate.
BASE = {
    "bert": ({"layers": 12, "hidden": 768, "heads": 12, "vocab": 1000, "max_positions": 512},
             {"input_ids": [1, 128], "attention_mask": [1, 128]}),
    "gpt2": ({"layers": 12, "hidden": 768, "heads": 12, "vocab": 1000, "max_positions": 512},
             {"input_ids": [1, 128], "attention_mask": [1, 128]}),
    "vit": ({"layers": 12, "hidden": 768, "heads": 12, "image": 224, "patch": 16},
            {"pixel_values": [1, 3, 224, 224]}),
}


def main():
    warnings.simplefilter("ignore")
    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    results = []
    runs = [("tiny", family, {}, shapes) for family, shapes in SHAPES.items()]
    runs += [("base", family, kwargs, shapes) for family, (kwargs, shapes) in BASE.items()]
    for size, family, kwargs, shapes in runs:
        model = build(family, **kwargs)
        dims = {"batch": 1, "sequence": next(iter(shapes.values()))[1]}
        feeds = make_inputs(model, 0, dims)
        compiled = tvmsoftmax.compile(model, shapes=shapes)
        report = tvmsoftmax.check(model, shapes=shapes, compiled=compiled, inputs=feeds)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        args = compiled._prepare(feeds)
        medians = median_of_rounds({
            "tvmsoftmax": lambda: compiled._invoke(args),
            "onnxruntime": lambda: session.run(None, feeds),
        }, **({} if size == "tiny" else {"rounds": 7, "batch": 3}))
        row = {"family": family, "size": size, "shapes": shapes, "threads": threads, "check_passed": report.passed,
               "tvmsoftmax_ms": medians["tvmsoftmax"] * 1e3, "onnxruntime_ms": medians["onnxruntime"] * 1e3,
               "speedup_vs_onnxruntime": medians["onnxruntime"] / medians["tvmsoftmax"],
               "sites": [f'{s.get("kind", "softmax")}: {s["lowered"].get("strategy") or s["lowered"].get("algorithm")}'
                         for s in report.sites if s["rewritten"]]}
        print(json.dumps(row))
        results.append(row)
    out = Path(__file__).parent / (sys.argv[1] if len(sys.argv) > 1 else "results/models.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": resolve("x86").mcpu, "results": results}
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
