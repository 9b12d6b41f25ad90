"""The CPU thread count of TVM's runtime, set once when tvmsoftmax is imported.

TVM 0.27's thread pool, when ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) is unset, uses half the
logical CPU count (it assumes two hyper-threads per core: on a 2-vCPU machine of two real cores,
one thread) and re-reads that count from sysfs at every parallel launch (an open/read/close per
kernel call: a quarter of an unrolled LSTM's run time). onnxruntime's default is one thread per
physical core. So, unless the user set either variable, ``TVM_NUM_THREADS`` is set to the number of
physical cores among the CPUs this process may run on (Linux topology; elsewhere the CPU count).
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology: count the CPU itself
    return max(1, len(cores))


def set_default_threads() -> None:
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
