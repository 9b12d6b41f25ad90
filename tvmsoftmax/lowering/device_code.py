"""CUDA device code: compiled to fatbins on the build machine, found again at load on the GPU host.

TVM 0.27's pip wheel has no CUDA runtime in its compiler process, so `tvm.compile` leaves each CUDA
module as *source* (a fallback module whose serialised format is ``cuda``); the CUDA runtime
(``libtvm_runtime_cuda.so``) compiles such a module when it is loaded, through the global callback
``tvm_callback_cuda_compile`` -- a compiler (nvcc, or NVRTC through cuda-python) on the GPU host.

We do not want a compiler on the deployment host, nor kernels built with other flags than the ones
we tested. So:

* at compile time, `compile_fatbins` runs nvcc on every CUDA module's source (SASS for the
  target's arch plus its PTX, so a newer GPU can JIT it; no fast-math: our exp is our own and
  denormals/IEEE division stay as in the reference) and the artifact stores the fatbins keyed by
  the sha256 of the source;
* at load time, `install_fatbins` registers a ``tvm_callback_cuda_compile`` that answers the
  runtime's compile request with the stored fatbin of that exact source (and only when a source
  is unknown compiles it with nvcc, or says clearly that it cannot).

`load_cuda_runtime` loads TVM's CUDA runtime library explicitly: in runtime-only mode
(``TVM_USE_RUNTIME_LIB=1``) ``import tvm`` does not load device backends.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from ..errors import ArtifactError, TvmSoftmaxError

# nvcc flags TVM itself passes (half/bfloat16 operators on), without its default --use_fast_math.
_NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
]

# sha256(source) -> fatbin, for every CUDA artifact loaded in this process.
_FATBINS: dict[str, bytes] = {}
_CALLBACK_INSTALLED = False


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def cuda_sources(module) -> list[str]:
    """The CUDA source of every CUDA module imported (at any depth) by `module` that is still
    source (a real CUDA module, compiled by a CUDA-enabled TVM, has none to give)."""
    sources, stack = [], [module]
    while stack:
        current = stack.pop()
        if current.kind == "cuda":
            source = current.inspect_source("cuda")
            if source:
                sources.append(str(source))
        stack.extend(current.imports)
    return sources


def _toolkit_roots() -> list[Path]:
    """Where the CUDA toolkit may be: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda (in that order)."""
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    return roots + [Path("/usr/local/cuda")]


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = [root / "bin" / "nvcc" for root in _toolkit_roots()]
    return next((str(c) for c in candidates if c.is_file()), None)


CUDART = "libcudart.so.13"  # the CUDA runtime soname libtvm_runtime_cuda.so needs


def cudart_path() -> Path | None:
    """The toolkit's CUDA runtime library (the one TVM's CUDA runtime links against)."""
    found = nvcc_path()
    roots = ([Path(found).resolve().parent.parent] if found else []) + _toolkit_roots()
    candidates = [root / sub / CUDART for root in roots for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def nvcc_fatbin(source: str, arch: str) -> bytes:
    """Compile CUDA source to a fatbin holding SASS for `arch` (e.g. ``sm_90``) and its PTX."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise TvmSoftmaxError(
            "compiling for CUDA needs nvcc (CUDA toolkit) on this machine to build the kernels: "
            "put it on PATH or set CUDA_HOME"
        )
    number = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="tvmsoftmax-nvcc-") as scratch:
        src = Path(scratch) / "kernels.cu"
        out = Path(scratch) / "kernels.fatbin"
        src.write_text(source)
        command = [nvcc, "--fatbin", *_NVCC_FLAGS,
                   "-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]",
                   "-o", str(out), str(src)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise TvmSoftmaxError(f"nvcc failed on the generated CUDA kernels for {arch}:\n{result.stderr[-4000:]}")
        return out.read_bytes()


def compile_fatbins(module, arch: str) -> dict[str, bytes]:
    """sha256(source) -> fatbin for every CUDA module of `module` that is still source.

    Without nvcc here the kernels stay source only (a warning says so): the GPU host then needs
    nvcc to build them when the artifact is loaded."""
    sources = cuda_sources(module)
    if sources and nvcc_path() is None:
        warnings.warn(
            "nvcc not found: the CUDA kernels are stored as source and will be compiled when the "
            "artifact is loaded, which needs nvcc on the GPU host", stacklevel=3,
        )
        return {}
    return {source_sha256(s): nvcc_fatbin(s, arch) for s in sources}


def _device_arch() -> str:
    import tvm

    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


def _compile_request(source, *_args) -> bytes:
    """``tvm_callback_cuda_compile``: the stored fatbin of this source, else nvcc for this GPU."""
    source = str(source)
    key = source_sha256(source)
    if key in _FATBINS:
        return _FATBINS[key]
    if nvcc_path() is None:
        raise RuntimeError(
            f"tvmsoftmax: a CUDA module (source sha256 {key[:12]}) has no compiled kernels in its "
            "artifact and this host has no nvcc to build them; recompile the artifact on a machine "
            "with nvcc (the CUDA toolkit)"
        )
    binary = nvcc_fatbin(source, _device_arch())
    _FATBINS[key] = binary
    return binary


def install_fatbins(fatbins: dict[str, bytes]) -> None:
    """Make the CUDA runtime use these fatbins when it loads modules with the same sources."""
    global _CALLBACK_INSTALLED
    import tvm_ffi

    _FATBINS.update(fatbins)
    if not _CALLBACK_INSTALLED:
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_request, override=True)
        _CALLBACK_INSTALLED = True


def load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library (``libtvm_runtime_cuda.so``) if it is not loaded yet.

    Raises ArtifactError with the loader's reason when it cannot be loaded (no NVIDIA driver:
    ``libcuda.so.1``; no CUDA runtime: ``libcudart.so.13``)."""
    import tvm_ffi
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS or tvm_ffi.get_global_func(
        "ffi.Module.load_from_bytes.cuda", allow_missing=True
    ) is not None:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, FileNotFoundError, RuntimeError) as err:
        raise ArtifactError(
            f"cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so): {err}; a CUDA artifact needs "
            "an NVIDIA driver (libcuda.so.1) and the CUDA runtime (libcudart.so.13) on this host"
        ) from None
