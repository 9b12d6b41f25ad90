"""Runtime bundles: what a deployment host without TVM's compiler needs to run artifacts.

`write_bundle` writes a folder (atomically: a temporary sibling renamed into place) holding

* ``artifacts/``: the artifacts (``*.tvmsm``) as given;
* ``cases/``: optional check cases, one ``.npz`` per case with its inputs (``in.NAME``) and the
  reference outputs computed on the build machine (``out.NAME``), named in ``bundle.json``;
* ``python/``: TVM's Python package without its compiler library (``libtvm_compiler.so``, about
  250 MB) and without sources/headers, TVM FFI's package for the host's Python version, and the
  `tvmsoftmax` package (its loader needs only TVM's runtime);
* ``run.py``: a runner (`tvmsoftmax.bundle_runner`) that puts ``python/`` first on the path, sets
  ``TVM_USE_RUNTIME_LIB=1`` and runs, checks and times the artifacts;
* ``bundle.json``: the Python version the bundle is for, versions, artifacts, cases.

For CUDA artifacts, ``python/tvm/lib`` also gets the CUDA runtime library (``libcudart.so.13``)
from this machine's toolkit; the artifacts carry their kernels compiled (fatbins), so the GPU host
needs no compiler. The host needs Python (the version given), numpy and, for CUDA artifacts, an NVIDIA driver; TVM's
FFI package is compiled per Python version, so for another version than this one its wheel is
taken from ``ffi_wheel`` or downloaded with pip (``pip download apache-tvm-ffi==<this version>``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import TvmSoftmaxError

BUNDLE_FORMAT = "tvmsoftmax-bundle"
BUNDLE_VERSION = 1

# Parts of TVM's Python package a runtime-only process never loads.
_TVM_SKIP_DIRS = {"3rdparty", "src", "include", "web", "__pycache__", "exec", "testing", "topi", "relax",
                  "s_tir", "meta_schedule", "dlight", "contrib", "micro", "autotvm", "auto_scheduler"}
_TVM_SKIP_LIBS = {"libtvm_compiler.so", "libtvm.so"}


def _package_dir(name: str) -> Path:
    module = __import__(name)
    return Path(module.__file__).parent


def _copy_tree(src: Path, dst: Path, skip_dirs=frozenset(), skip_files=frozenset()) -> None:
    def ignore(folder, names):
        rel = Path(folder).relative_to(src)
        out = {n for n in names if n in skip_files or n.endswith(".pyc")}
        if rel == Path("."):
            out |= {n for n in names if n in skip_dirs}
        else:
            out |= {n for n in names if n == "__pycache__"}
        return out

    shutil.copytree(src, dst, ignore=ignore)


def _this_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _ffi_wheel_for(python: str, ffi_wheel: Path | None, scratch: Path) -> Path:
    if ffi_wheel is not None:
        return Path(ffi_wheel)
    from importlib.metadata import version

    pin = f"apache-tvm-ffi=={version('apache-tvm-ffi')}"
    tag = python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(scratch), pin]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(scratch.glob(f"apache_tvm_ffi-*cp{tag}*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no matching wheel"])[-1]
        raise TvmSoftmaxError(
            f"bundle for Python {python}: TVM's FFI package is compiled per Python version and pip could not "
            f"download {pin} for cp{tag} ({reason}); "
            "download that wheel elsewhere and pass it with --ffi-wheel"
        )
    return wheels[0]


def _python_tree(dest: Path, python: str, ffi_wheel: Path | None, scratch: Path) -> None:
    _copy_tree(_package_dir("tvm"), dest / "tvm", _TVM_SKIP_DIRS, _TVM_SKIP_LIBS)
    if python == _this_python() and ffi_wheel is None:
        _copy_tree(_package_dir("tvm_ffi"), dest / "tvm_ffi", {"include", "cmake", "__pycache__"})
    else:
        wheel = _ffi_wheel_for(python, ffi_wheel, scratch)
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith("tvm_ffi/")
                       and not m.startswith(("tvm_ffi/include/", "tvm_ffi/cmake/"))]
            archive.extractall(dest, members)
    package = Path(__file__).parent
    _copy_tree(package, dest / "tvmsoftmax", {"__pycache__"})


def _carry_cudart(lib_dir: Path) -> None:
    """Put the CUDA runtime library TVM's CUDA runtime links against (``libcudart.so.13``, under
    1 MB) beside it: found through its ``$ORIGIN`` run path on a host that has only the driver."""
    from .lowering.device_code import CUDART, cudart_path

    found = cudart_path()
    if found is None:
        raise TvmSoftmaxError(
            f"bundle: CUDA artifacts need {CUDART} beside TVM's CUDA runtime and it was not "
            "found under the CUDA toolkit (nvcc on PATH, CUDA_HOME, CUDA_PATH or /usr/local/cuda)"
        )
    shutil.copy2(found, lib_dir / CUDART)  # `found` is the versioned file the soname points at


def write_bundle(out, artifacts, *, cases: dict | None = None, python: str | None = None,
                 ffi_wheel=None, extra: dict | None = None) -> Path:
    """Write a runtime bundle to the folder `out` (replaced if it is a bundle already).

    artifacts: paths of ``*.tvmsm`` files. cases: case name -> {"artifact": file name,
    "inputs": {name: array}, "outputs": {name: array}, plus any JSON-able fields}.
    """
    from . import __version__
    from .lowering.artifact import read_manifest

    out = Path(out)
    python = python or _this_python()
    artifacts = [Path(a) for a in artifacts]
    if not artifacts:
        raise TvmSoftmaxError("bundle: no artifacts given")
    manifests = {a.name: read_manifest(a) for a in artifacts}
    if len(manifests) != len(artifacts):
        raise TvmSoftmaxError("bundle: two artifacts have the same file name")
    if out.exists() and not (out / "bundle.json").is_file():
        raise TvmSoftmaxError(f"{out}: exists and is not a tvmsoftmax bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        stage = Path(scratch) / "bundle"
        (stage / "artifacts").mkdir(parents=True)
        for a in artifacts:
            shutil.copy2(a, stage / "artifacts" / a.name)
        case_index = {}
        if cases:
            (stage / "cases").mkdir()
            for name, case in cases.items():
                if case["artifact"] not in manifests:
                    raise TvmSoftmaxError(f"bundle: case {name!r} names artifact {case['artifact']!r}, not in the bundle")
                arrays = {f"in.{k}": np.asarray(v) for k, v in case["inputs"].items()}
                arrays |= {f"out.{k}": np.asarray(v) for k, v in case.get("outputs", {}).items()}
                np.savez(stage / "cases" / f"{name}.npz", **arrays)
                case_index[name] = {k: v for k, v in case.items() if k not in ("inputs", "outputs")}
        _python_tree(stage / "python", python, ffi_wheel, Path(scratch))
        if any(m["target"]["name"] == "cuda" for m in manifests.values()):
            _carry_cudart(stage / "python" / "tvm" / "lib")
        shutil.copy2(Path(__file__).parent / "bundle_runner.py", stage / "run.py")
        import tvm

        meta = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "python": python,
            "tvmsoftmax_version": __version__, "tvm_version": tvm.__version__,
            "artifacts": {n: {"target": m["target"], "inputs": m["inputs"], "outputs": m["outputs"],
                              "sites": m.get("sites", [])}
                          for n, m in manifests.items()},
            "cases": case_index, **(extra or {}),
        }
        (stage / "bundle.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            old = Path(scratch) / "old"
            os.replace(out, old)
        os.replace(stage, out)
    return out


def bundle_size(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def reference_case(artifact, model, *, shapes: dict | None = None, seed: int = 0) -> dict:
    """A check case for `artifact`: seeded inputs for the ONNX `model` it was compiled from (input
    name -> dims for inputs with symbolic dims) and onnxruntime's outputs (graph optimisations
    off), with the per-dtype tolerances of `tvmsoftmax check`."""
    from .lowering.check import DEFAULT_TOLERANCES, make_inputs, onnxruntime_session
    from .lowering.frontend import bind_shapes, load_model

    proto = bind_shapes(load_model(model).proto, shapes)
    inputs = make_inputs(proto, seed=seed)
    session = onnxruntime_session(proto)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, inputs)))
    dtypes = {str(v.dtype) for v in outputs.values()}
    rtol, atol = max((DEFAULT_TOLERANCES.get(d, DEFAULT_TOLERANCES["float32"]) for d in dtypes), default=(1e-5, 1e-5))
    return {"artifact": Path(artifact).name, "inputs": inputs, "outputs": outputs, "rtol": rtol, "atol": atol,
            "reference": "onnxruntime (graph optimisations off)", "seed": seed}
