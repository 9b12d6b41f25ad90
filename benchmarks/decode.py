"""LLM decoding through onnxruntime's GroupQueryAttention (what its LLM exporters emit) and ONNX
Attention-23 with a KV cache: one decode step (1 new token over a 1024-token cache) and, for
GroupQueryAttention, a 512-token prompt; 32 query heads over 8 key/value heads, head size 128,
float32; dims static and symbolic (one compile for every step, as onnxruntime-genai runs).
tvmsoftmax's compiled node vs onnxruntime's kernel on the same model and inputs, interleaved
rounds, medians; each result is first checked against onnxruntime.
Writes benchmarks/results/decode_<threads>t.json.

    TVM_NUM_THREADS=1 python benchmarks/decode.py   # onnxruntime gets the same thread count
"""

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

import tvmsoftmax
from tvmsoftmax.models.attention_nodes import attention23_feeds, attention23_with_cache, gqa_feeds, group_query_attention
from _timing import median_of_rounds  # benchmarks/_timing.py (run as a script)

HEADS, KV_HEADS, HEAD_SIZE = 32, 8, 128
# name: (new tokens, past buffer (None: no past inputs), seqlens_k, total_sequence_length)
STEPS = {"decode (1 token, 1024 cached)": (1, 1024, [1024], 1025), "prompt (512 tokens)": (512, None, [511], 512)}


def _models(step, tokens, past, symbolic):
    """(form, model, feeds): the GroupQueryAttention node, and for a step with a cache the ONNX
    Attention-23 node with the same heads (its cache has no ragged batch: past + new keys)."""
    rng = np.random.default_rng(0)
    _tokens, _past, seqlens, total = STEPS[step]
    feeds = gqa_feeds(rng, 1, tokens, past, HEADS, KV_HEADS, HEAD_SIZE, seqlens, total)
    yield "GroupQueryAttention", group_query_attention(1, tokens, past, HEADS, KV_HEADS, HEAD_SIZE, symbolic=symbolic), feeds
    if past is not None:
        feeds = attention23_feeds(rng, 1, tokens, past, HEADS, KV_HEADS, HEAD_SIZE)
        yield "Attention-23", attention23_with_cache(1, tokens, past, HEADS, KV_HEADS, HEAD_SIZE, symbolic=symbolic), feeds


def main():
    warnings.simplefilter("ignore")
    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    results = []
    for step, (tokens, past, _seqlens, _total) in STEPS.items():
        for symbolic in (False, True):
            for form, model, feeds in _models(step, tokens, past, symbolic):
                feeds = {k: tvmsoftmax.aligned(v) if v.dtype == np.float32 else v for k, v in feeds.items()}
                compiled = tvmsoftmax.compile(model)
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                want = session.run(None, feeds)
                got = compiled.run(feeds)
                errors = [float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got.values(), want)]
                if max(errors) > 1e-4:
                    raise SystemExit(f"{form} {step}, symbolic={symbolic}: differs from onnxruntime by {max(errors):.3g}")
                if hasattr(compiled, "_prepare"):  # inputs bound once, as the other benchmarks time it
                    args = compiled._prepare(feeds)
                    call = lambda args=args: compiled._invoke(args)  # noqa: E731
                else:
                    call = lambda: compiled.run(feeds)  # noqa: E731
                medians = median_of_rounds({"tvmsoftmax": call, "onnxruntime": lambda: session.run(None, feeds)},
                                           rounds=11, batch=10)
                row = {"form": form, "step": step, "dims": "symbolic" if symbolic else "static", "threads": threads,
                       "heads": HEADS, "kv_heads": KV_HEADS, "head_size": HEAD_SIZE, "max_abs_error": max(errors),
                       "fused": [s["form"] for s in compiled.sites if s.get("rewritten")],
                       "tvmsoftmax_ms": medians["tvmsoftmax"] * 1e3, "onnxruntime_ms": medians["onnxruntime"] * 1e3,
                       "speedup_vs_onnxruntime": medians["onnxruntime"] / medians["tvmsoftmax"]}
                print(json.dumps(row), flush=True)
                results.append(row)
    out = Path(__file__).parent / "results" / f"decode_{threads}t.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "onnxruntime": ort.__version__,
                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
