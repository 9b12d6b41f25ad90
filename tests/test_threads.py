"""TVM's CPU thread count: one thread per physical core unless the user chose (`tvmsoftmax._threads`)."""

from __future__ import annotations

import os
import subprocess
import sys

from tvmsoftmax._threads import physical_cores


def _threads_after_import(env: dict) -> str:
    code = "import os, tvmsoftmax; print(os.environ.get('TVM_NUM_THREADS'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_default_is_the_physical_core_count():
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    assert _threads_after_import(env) == str(physical_cores())


def test_a_users_choice_is_kept():
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    assert _threads_after_import(dict(env, TVM_NUM_THREADS="3")) == "3"
    assert _threads_after_import(dict(env, OMP_NUM_THREADS="1")) == "None"  # TVM reads OMP's
