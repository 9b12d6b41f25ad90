"""Targets: the user-facing names ("x86", "cuda") resolved to TVM 0.27 target dicts.

x86 uses the host CPU that LLVM detects (``mcpu: native`` is refused by LLVM 22, so the CPU name is
asked for explicitly) and records the CPU features the code needs, so that `load` can refuse an
artifact that would die with SIGILL on a host without them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..errors import TvmSoftmaxError

TARGET_NAMES = ("x86", "cuda")
CUDA_ARCHS = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
_X86_FEATURES = ("avx512f", "avx2", "fma", "avx")
CUDA_HOST_CPU = "x86-64-v2"


@dataclass(frozen=True)
class TargetSpec:
    """What an artifact was compiled for (stored in the manifest)."""

    name: str  # "x86" or "cuda"
    mcpu: str  # LLVM CPU of the host code
    num_cores: int
    required_features: tuple[str, ...] = field(default_factory=tuple)  # CPU flags the code needs
    arch: str | None = None  # CUDA arch, e.g. "sm_90"

    @property
    def vector_lanes(self) -> int:
        """float32 lanes of the widest vector register the code may use."""
        return 16 if "avx512f" in self.required_features else 8

    def to_json(self) -> dict:
        data = asdict(self)
        data["required_features"] = list(self.required_features)
        return data

    @staticmethod
    def from_json(data: dict) -> TargetSpec:
        return TargetSpec(
            name=data["name"],
            mcpu=data["mcpu"],
            num_cores=int(data["num_cores"]),
            required_features=tuple(data.get("required_features", ())),
            arch=data.get("arch"),
        )

    def host_target_dict(self) -> dict:
        return {
            "kind": "llvm",
            "mtriple": "x86_64-pc-linux-gnu",
            "mcpu": self.mcpu,
            "num-cores": self.num_cores,
        }

    def tvm_target(self):
        import tvm

        host = self.host_target_dict()
        if self.name == "cuda":
            return tvm.target.Target({"kind": "cuda", "arch": self.arch, "host": host})
        return tvm.target.Target(host)

    @property
    def device_type(self) -> str:
        return "cuda" if self.name == "cuda" else "cpu"


def resolve(name: str = "x86", *, mcpu: str | None = None, arch: str | None = None) -> TargetSpec:
    """Resolve a user-facing target name on the build machine."""
    import tvm
    from tvm.target import codegen

    if name not in TARGET_NAMES:
        raise TvmSoftmaxError(f"unknown target {name!r}: expected one of {', '.join(TARGET_NAMES)}")
    # CUDA artifacts run on another machine: their host code (argument unpacking, kernel launches)
    # is built for baseline x86-64-v2 unless asked otherwise, not for this build machine's CPU.
    cpu = mcpu or (CUDA_HOST_CPU if name == "cuda" else codegen.llvm_get_system_cpu())
    if not codegen.llvm_is_valid_cpu(cpu, "x86_64-pc-linux-gnu"):
        raise TvmSoftmaxError(f"LLVM does not know the CPU {cpu!r} (use e.g. x86-64-v3)")
    probe = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": cpu})
    features = tuple(f for f in _X86_FEATURES if codegen.llvm_cpu_has_features([f], probe))
    cores = os.cpu_count() or 1
    if name == "cuda":
        arch = arch or "sm_90"
        if arch not in CUDA_ARCHS:
            raise TvmSoftmaxError(f"unknown CUDA arch {arch!r}: expected one of {', '.join(CUDA_ARCHS)}")
        return TargetSpec("cuda", cpu, cores, features, arch)
    return TargetSpec("x86", cpu, cores, features)


def host_cpu_flags() -> set[str] | None:
    """CPU flags of the running host (from /proc/cpuinfo; None where that cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None
