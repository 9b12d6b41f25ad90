"""The deployable artifact and the runnable model.

An artifact is one file (a zip archive, conventionally ``*.tvmsm``) holding

* ``model.so``: the compiled library (TVM Relax VM executable, exported with g++), and
* ``manifest.json``: format version, tvmsoftmax/TVM versions, target (with the CPU features the
  code needs), inputs and outputs (dtypes, shapes with symbolic dims by name), every rewritten
  site with its algorithm and schedule knobs, sha256 of the source model and of the library;
* for CUDA, ``kernels/<sha256 of the CUDA source>.fatbin``: the device code compiled by nvcc on
  the build machine (`device_code`), listed with its checksum under ``cuda_kernels``.

`save` writes a temporary file beside the destination and renames it over (atomic). `load` checks
the format version, the library's sha256 and that this host can run the target, and needs only
TVM's runtime (it works with ``TVM_USE_RUNTIME_LIB=1`` and without the compiler library): this
module imports nothing from TVM's compiler.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from .._atomic import atomic_path
from .._native import quiet_native_stderr
from ..errors import ArtifactError, InputError

FORMAT = "tvmsoftmax-artifact"
FORMAT_VERSION = 1
LIBRARY = "model.so"
MANIFEST = "manifest.json"


class CompiledModel:
    """A compiled model: `run` it, `save` it, read its `manifest`."""

    def __init__(self, vm_module, manifest: dict, *, executable=None, fatbins: dict | None = None):
        import tvm
        import tvm_ffi
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler

        self.manifest = manifest
        self._executable = executable
        self._fatbins = dict(fatbins or {})
        device_type = "cuda" if manifest["target"]["name"] == "cuda" else "cpu"
        self.device = tvm.cuda(0) if device_type == "cuda" else tvm.cpu(0)
        self._on_cpu = device_type != "cuda"
        self._vm = VirtualMachine(vm_module, self.device)
        self._main = self._vm["main"]  # looked up once (a lookup per call cost ~2.5 us)
        self._from_dlpack = tvm_ffi.from_dlpack  # (an import statement per input cost ~0.2 us)
        # Per input name: a reusable 64-byte-aligned host buffer and its TVM tensor (see
        # `_device_tensor`). A run holds the lock from staging to copying the outputs out: the VM
        # is not reentrant, and a staged input must not change under a running call.
        self._staging: dict[str, tuple[np.ndarray, object]] = {}
        self._accepted_signature: tuple | None = None  # inputs' (dtype, shape) that passed `_check_inputs`
        self._lock = threading.Lock()

    # ---- description -------------------------------------------------------------------------
    @property
    def executable(self):
        """The TVM Executable when compiled in this process (None when loaded from an artifact)."""
        return self._executable

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    @property
    def sites(self) -> list[dict]:
        return self.manifest["sites"]

    @property
    def target(self) -> dict:
        return self.manifest["target"]

    # ---- running -----------------------------------------------------------------------------
    def _prepare(self, feeds: dict) -> list:
        check_feed_names(feeds, [spec["name"] for spec in self.inputs])
        values = [np.asarray(feeds[spec["name"]]) for spec in self.inputs]
        # The checks below cost microseconds per input in Python; the (dtype, shape) of every
        # input that passed them last time is remembered and compared in C.
        signature = tuple((value.dtype, value.shape) for value in values)
        if signature != self._accepted_signature:
            self._check_inputs(values)
            self._accepted_signature = signature
        return [self._device_tensor(spec["name"], value) for spec, value in zip(self.inputs, values)]

    def _check_inputs(self, values: list) -> None:
        """Each input's dtype and rank, its fixed dims, and symbolic dims equal across inputs."""
        bound: dict[str, int] = {}
        for spec, value in zip(self.inputs, values):
            name = spec["name"]
            if value.dtype.name != spec["dtype"]:
                raise InputError(
                    f"input {name!r}: expected dtype {spec['dtype']}, got {value.dtype.name}"
                )
            dims = spec["shape"]
            if dims is None:
                continue
            if value.ndim != len(dims):
                raise InputError(
                    f"input {name!r}: expected rank {len(dims)} {dims}, got shape {list(value.shape)}"
                )
            for index, (want, got) in enumerate(zip(dims, value.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise InputError(
                            f"input {name!r}: dim {index} must be {want} (shape {dims}), got {got}"
                        )
                elif want in bound and bound[want] != got:
                    raise InputError(
                        f"input {name!r}: dim {index} ({want}) is {got} here but "
                        f"{bound[want]} in another input"
                    )
                else:
                    bound[want] = got

    def _device_tensor(self, name: str, value: np.ndarray):
        """The input as a TVM tensor. On the CPU: the array itself when TVM may use it
        (C-contiguous, writeable (DLPack has no read-only flag here), 64-byte aligned, as TVM's
        kernels assume; the kernels only read inputs); else a copy into this input's staging
        buffer, allocated aligned once per shape and reused (numpy's large arrays are 16-byte
        aligned: a fresh TVM tensor per call cost a page-faulting allocation plus a copy, ~0.7 ms
        for 4.7 MB of attention inputs)."""
        if not self._on_cpu or value.dtype.kind not in "iuf" or not value.size:
            import tvm

            # bool, and ml_dtypes' bfloat16/float8 (numpy kind "V"), are not DLPack-importable
            return tvm.runtime.tensor(np.require(value, requirements="C"), self.device)  # 0-d stays 0-d
        if value.flags.c_contiguous and value.flags.writeable:
            # Imported unchecked, then its pointer tested: numpy's ctypes.data cost ~0.8 us per
            # input and tvm.runtime.from_dlpack's own check raises (~16 us) on the usual 16-byte
            # alignment, where the copy below is wanted anyway.
            try:
                tensor = self._from_dlpack(value, require_alignment=0, require_contiguous=True)
            except (BufferError, RuntimeError, TypeError, ValueError):  # a dtype DLPack cannot express
                tensor = None
            if tensor is not None and tensor.data_ptr() % 64 == 0:
                return tensor
        staged = self._staging.get(name)
        if staged is None or staged[0].shape != value.shape or staged[0].dtype != value.dtype:
            buffer = _aligned_empty(value.shape, value.dtype)
            staged = self._staging[name] = (buffer, self._from_dlpack(buffer, require_alignment=64))
        np.copyto(staged[0], value)
        return staged[1]

    def _invoke(self, args):
        return self._main(*args)

    @staticmethod
    def _flatten(result) -> list:
        if hasattr(result, "numpy"):
            return [result]
        out = []
        for item in result:
            out.extend(CompiledModel._flatten(item))
        return out

    def _to_numpy(self, result) -> list[np.ndarray]:
        """The outputs as numpy arrays. On the CPU an output the manifest marks as owned (a
        tensor this call allocated that no other output, input or constant shares, see
        `owned_outputs`) is handed over without a copy (DLPack: the array keeps the tensor alive,
        as onnxruntime's outputs do); every other one is copied."""
        owned = self.manifest.get("owned_outputs") if self._on_cpu else None
        values = self._flatten(result)
        out = []
        for index, tensor in enumerate(values):
            if owned is not None and len(owned) == len(values) and owned[index]:
                try:
                    out.append(np.from_dlpack(tensor))
                    continue
                except (BufferError, RuntimeError, TypeError, ValueError):  # e.g. bfloat16
                    pass
            out.append(tensor.numpy())
        return out

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run on numpy feeds (name -> array); returns name -> array for every model output
        (arrays of their own: nothing aliases the inputs or the model). Calls from several threads
        are serialised."""
        with self._lock:
            values = self._to_numpy(self._invoke(self._prepare(feeds)))
        names = [spec["name"] for spec in self.outputs]
        return dict(zip(names, values))

    def time(self, feeds: dict, *, repeat: int = 20, warmup: int = 3) -> list[float]:
        """Seconds per run (inputs already on the device), `repeat` samples."""
        with self._lock:
            return self._time(feeds, repeat, warmup)

    def _time(self, feeds, repeat, warmup):
        args = self._prepare(feeds)
        for _ in range(warmup):
            self._invoke(args)
        self.device.sync()
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            self._invoke(args)
            self.device.sync()
            samples.append(time.perf_counter() - start)
        return samples

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the artifact to `path` atomically (temporary file + rename)."""
        if self._executable is None:
            raise ArtifactError("this model was loaded from an artifact; copy that file instead")
        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="tvmsoftmax-") as scratch:
            library = Path(scratch) / LIBRARY
            with quiet_native_stderr():
                self._executable.export_library(str(library))
            payload = library.read_bytes()
            manifest = dict(self.manifest)
            manifest["library_sha256"] = hashlib.sha256(payload).hexdigest()
            with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
                archive.writestr(LIBRARY, payload)
                for entry in manifest.get("cuda_kernels", ()):
                    archive.writestr(entry["member"], self._fatbins[entry["source_sha256"]])
        self.manifest = manifest
        return path


def owned_outputs(bytecode: str, count: int) -> list[bool] | None:
    """Which of `main`'s `count` outputs are tensors the call allocates for that output alone,
    read off the VM bytecode (`Executable.as_text()`): an output is owned when, through
    `vm.builtin.reshape` views, it comes from a `vm.builtin.alloc_tensor` that no other output
    comes from. Inputs, constants, anything else, and any control flow: not owned (None when the
    bytecode is not understood at all)."""
    import re

    lines = bytecode.split("@main:", 1)[-1].split("\n@", 1)[0].strip().splitlines()
    root: dict[str, str | None] = {}  # register -> the alloc_tensor register it views, if any
    tuples: dict[str, list] = {}  # register -> roots of a make_tuple's elements
    returned = None
    call = re.compile(r"call\s+(\S+)\s+in:\s*(.*?)\s*dst:\s*(%\S+)$")
    for line in lines:
        line = line.strip()
        match = call.match(line)
        if match:
            name, dst = match.group(1), match.group(3)
            args = [a.strip() for a in match.group(2).split(",") if a.strip()]
            tuples.pop(dst, None)
            if name == "vm.builtin.alloc_tensor":
                root[dst] = dst
            elif name == "vm.builtin.reshape" and args:
                root[dst] = root.get(args[0])
            else:
                root[dst] = None  # null_value, packed calls returning tensors, ...
                if name == "vm.builtin.make_tuple":
                    tuples[dst] = [root.get(a) for a in args]
            continue
        if line.startswith("ret"):
            register = line.split()[-1]
            returned = tuples.get(register, [root.get(register)])
            break
        if line:
            return None  # control flow (If), or a form this reader does not know
    if returned is None or len(returned) != count:
        return None
    return [r is not None and returned.count(r) == 1 for r in returned]


def check_feed_names(feeds, expected: list[str]) -> None:
    """InputError unless `feeds` is a dict with exactly the `expected` input names."""
    if not isinstance(feeds, dict):
        raise InputError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown input(s) {', '.join(map(repr, extra))}")
        raise InputError(f"{'; '.join(parts)}; the model's inputs are: {', '.join(expected)}")


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is 64-byte aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def read_manifest(path) -> dict:
    """The manifest of an artifact, checked for format and version (no TVM needed)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(MANIFEST))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as err:
        raise ArtifactError(f"{path}: not a tvmsoftmax artifact or corrupted ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a tvmsoftmax artifact (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {manifest.get('format_version')} is not supported "
            f"by this tvmsoftmax (it reads version {FORMAT_VERSION}); recompile the model"
        )
    return manifest


def _check_host(path, manifest: dict, expected_target: str | None) -> None:
    from .targets import host_cpu_flags

    target = manifest["target"]
    if expected_target is not None and target["name"] != expected_target:
        raise ArtifactError(
            f"{path}: artifact was compiled for target {target['name']!r}, not {expected_target!r}"
        )
    flags = host_cpu_flags()
    needed = set(target.get("required_features", ()))
    if flags is not None and not needed <= flags:
        raise ArtifactError(
            f"{path}: compiled for CPU {target['mcpu']} and needs {', '.join(sorted(needed - flags))}, "
            "which this host lacks; recompile on (or for) this host"
        )
    if target["name"] == "cuda":
        import tvm

        from .device_code import load_cuda_runtime

        try:
            load_cuda_runtime()  # runtime-only TVM does not load device backends by itself
        except ArtifactError as err:
            raise ArtifactError(f"{path}: artifact is for CUDA ({target.get('arch')}), but {err}") from None
        if not tvm.cuda(0).exist:
            raise ArtifactError(f"{path}: artifact is for CUDA ({target.get('arch')}), but this host has no CUDA device")


def load(path, *, target: str | None = None) -> CompiledModel:
    """Load an artifact written by `CompiledModel.save` (TVM runtime only)."""
    import tvm

    manifest = read_manifest(path)
    _check_host(path, manifest, target)
    with zipfile.ZipFile(path) as archive:
        try:
            payload = archive.read(LIBRARY)
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            raise ArtifactError(f"{path}: corrupted artifact, cannot read its library ({err})") from None
        fatbins = _read_fatbins(path, archive, manifest)
    if hashlib.sha256(payload).hexdigest() != manifest.get("library_sha256"):
        raise ArtifactError(f"{path}: corrupted artifact (library checksum does not match its manifest)")
    if fatbins:
        from .device_code import install_fatbins

        install_fatbins(fatbins)  # before the library: loading it asks for the kernels' binaries
    with tempfile.TemporaryDirectory(prefix="tvmsoftmax-load-") as scratch:
        library = Path(scratch) / LIBRARY
        library.write_bytes(payload)
        try:
            with quiet_native_stderr():
                module = tvm.runtime.load_module(str(library))
        except Exception as err:  # noqa: BLE001
            raise ArtifactError(f"{path}: cannot load its library: {err}") from None
    return CompiledModel(module, manifest)


def _read_fatbins(path, archive: zipfile.ZipFile, manifest: dict) -> dict[str, bytes]:
    """source sha256 -> fatbin for the CUDA kernels the artifact carries, checksums checked."""
    fatbins = {}
    for entry in manifest.get("cuda_kernels", ()):
        try:
            blob = archive.read(entry["member"])
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            raise ArtifactError(f"{path}: corrupted artifact, cannot read {entry['member']} ({err})") from None
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{path}: corrupted artifact ({entry['member']} does not match its checksum)")
        fatbins[entry["source_sha256"]] = blob
    return fatbins
