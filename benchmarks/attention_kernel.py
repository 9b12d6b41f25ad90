"""The x86 flash-attention kernel alone (no model, no `run`) against this core's FMA peak.

    python benchmarks/attention_kernel.py [--out benchmarks/results/attention_kernel.json]

One thread (TVM_NUM_THREADS=1 is set here). Peak: a C loop of 12 independent AVX-512 (or AVX2)
FMA chains in registers, built with the system C compiler (skipped when there is none). Kernel:
`ops.attention.flash_attention` scheduled by `schedules.x86_attention` with the `auto` knobs and
built by the models' TIR pipeline,
inputs pre-bound, TVM's time_evaluator (median of 7 repeats). FLOPs 4*B*H*S^2*D as in
`tvmsoftmax bench attention`. Each shape is timed again with K's whole tiles packed key by key
(`transpose_keys=False`) instead of transposed in registers: `key_by_key_packing_median_s`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

SHAPES = [(1, 12, 128, 64), (1, 12, 512, 64), (1, 16, 2048, 64), (1, 32, 1024, 128)]

PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#ifdef __AVX512F__
typedef __m512 V; enum { LANES = 16 };
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
static float sum(V v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 V; enum { LANES = 8 };
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
static float sum(V v) { float t[8]; _mm256_storeu_ps(t, v); return t[0] + t[7]; }
#endif
int main(void) {
  V a[12], b = SET1(1.0000001f), c = SET1(1e-7f);
  for (int i = 0; i < 12; i++) a[i] = SET1((float)i);
  long n = 100000000; struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = FMA(a[i], b, c);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
  float r = 0; for (int i = 0; i < 12; i++) r += sum(a[i]);
  printf("%f %f\n", n * 12.0 * LANES * 2 / s / 1e9, r);
  return 0;
}
"""


def peak_gflops(avx512: bool) -> float | None:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp, "peak.c"), Path(tmp, "peak")
        source.write_text(PEAK_C)
        flags = ["-mavx512f"] if avx512 else ["-mavx2", "-mfma"]
        subprocess.run([compiler, "-O2", *flags, str(source), "-o", str(binary)], check=True)
        runs = [float(subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()[0])
                for _ in range(3)]
    return max(runs)


def kernel_gflops(shape, **overrides) -> dict:
    import tvm

    from tvmsoftmax.lowering.pipeline import TIR_PIPELINE
    from tvmsoftmax.lowering.targets import resolve
    from tvmsoftmax.ops.attention import AttentionSpec, flash_attention
    from tvmsoftmax.schedules import choose_attention, schedule_attention

    b, h, s, d = shape
    spec = resolve("x86")
    attention = AttentionSpec(q_heads=h, kv_heads=h, head_size=d, v_head_size=d, scale=d ** -0.5)
    dims = {"batch": b, "q_len": s, "kv_len": s}
    _strategy, knobs = choose_attention(spec, "flash", dims, attention)
    knobs = dataclasses.replace(knobs, **overrides)
    func = schedule_attention(flash_attention(attention, knobs.tiling(), dims), spec, "flash", knobs)
    executable = tvm.compile(tvm.IRModule({"main": func}), spec.tvm_target(), tir_pipeline=TIR_PIPELINE)
    device = tvm.cpu()
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(shape).astype(np.float32), device) for _ in range(3)]
    args.append(tvm.runtime.empty(shape, "float32", device))
    number = 3 if s >= 1024 else 20
    timer = executable.mod.time_evaluator("main", device, number=number, repeat=7)
    median = float(np.median(timer(*args).results))
    return {"shape": list(shape), "knobs": knobs.to_json(), "median_s": median,
            "gflops": 4 * b * h * s * s * d / median / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/attention_kernel.json")
    args = parser.parse_args()
    from tvmsoftmax.lowering.targets import resolve

    spec = resolve("x86")
    avx512 = spec.vector_lanes >= 16
    peak = peak_gflops(avx512)
    rows = []
    for shape in SHAPES:
        row = kernel_gflops(shape)
        row["fraction_of_peak"] = row["gflops"] / peak if peak else None
        # Ablation: K's whole tiles packed key by key (stored lane by lane) instead of transposed
        # in registers (`schedules/intrinsics.py`), timed right after
        row["key_by_key_packing_median_s"] = kernel_gflops(shape, transpose_keys=False)["median_s"]
        rows.append(row)
        print(f"{tuple(shape)}: {row['median_s'] * 1e3:.3f} ms, {row['gflops']:.1f} GFLOP/s"
              + (f" ({row['fraction_of_peak']:.0%} of peak)" if peak else "")
              + f"; K packed key by key: {row['key_by_key_packing_median_s'] * 1e3:.3f} ms", flush=True)
    report = {"benchmark": "attention_kernel", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": spec.mcpu,
              "threads": 1, "peak_fma_gflops": peak, "peak_isa": "avx512" if avx512 else "avx2", "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"peak {peak} GFLOP/s; wrote {args.out}")


if __name__ == "__main__":
    main()
