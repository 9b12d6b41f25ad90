"""Softmax benchmark (same as `tvmsoftmax bench softmax`): every algorithm, onnxruntime, numpy and
TVM's default side by side, interleaved, 1 and 2 threads. Results: benchmarks/results/softmax.{json,md,png}.

    python benchmarks/softmax.py [--threads 1,2] [--shapes 64x1000,8x32000] [--repeat 15]
"""

import sys

from tvmsoftmax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "softmax", *sys.argv[1:]]))
