"""Memory bandwidth a TVM-generated kernel reaches on this host (context for the softmax figures).

Copy-with-scale (1 read + 1 write) and a vectorised sum (1 read) over 16M float32 on one thread,
through the same x86 target as the softmax kernels. Writes benchmarks/results/bandwidth.json.

    TVM_NUM_THREADS=1 python benchmarks/bandwidth.py
"""

import json
import statistics
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import s_tir, te

from tvmsoftmax.lowering.targets import resolve

N = 1 << 24


def _time(function, *args, repeat=15):
    function(*args)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function(*args)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    spec = resolve("x86")
    lanes = spec.vector_lanes
    x = te.placeholder((N,), "float32", name="x")
    y = te.compute((N,), lambda i: x[i] * 2.0, name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    sch.vectorize(sch.split(loop, [None, lanes])[1])
    copy = tvm.compile(sch.mod, spec.tvm_target())["main"]

    partials = 2 * lanes
    k = te.reduce_axis((0, N // partials), "k")
    s = te.compute((partials,), lambda p: te.sum(x[k * partials + p], axis=k), name="s")
    sch = s_tir.Schedule(te.create_prim_func([x, s]))
    block = sch.get_sblock("s")
    p, kk = sch.get_loops(block)
    sch.reorder(kk, p)
    outer, inner = sch.split(p, [None, lanes])
    sch.vectorize(inner)
    sch.unroll(outer)
    sch.decompose_reduction(block, kk)
    total = tvm.compile(sch.mod, spec.tvm_target())["main"]

    a = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(N).astype(np.float32))
    b = tvm.runtime.empty((N,), "float32", tvm.cpu())
    c = tvm.runtime.empty((partials,), "float32", tvm.cpu())
    copy_s = _time(copy, a, b)
    read_s = _time(total, a, c)
    result = {
        "machine": {"cpu": spec.mcpu, "features": list(spec.required_features)},
        "elements": N,
        "copy_scale_gbps": 2 * 4 * N / copy_s / 1e9,
        "read_sum_gbps": 4 * N / read_s / 1e9,
        "copy_scale_ms": copy_s * 1e3,
        "read_sum_ms": read_s * 1e3,
        "threads": "TVM_NUM_THREADS (1 recommended)",
    }
    out = Path(__file__).parent / "results" / "bandwidth.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
