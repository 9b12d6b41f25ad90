"""Silence TVM's C++ log noise around calls that print it to file descriptor 2.

TVM 0.27 logs a "Scope Saving:/Scope Loaded:" warning per constant when a VM executable is
exported or loaded, and "Fast mode segfaults ..." for every Gather it legalizes. Errors still
reach the caller as Python exceptions; set TVMSOFTMAX_NATIVE_LOG=1 to see the native log.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_native_stderr():
    if os.environ.get("TVMSOFTMAX_NATIVE_LOG") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured by a test runner)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
