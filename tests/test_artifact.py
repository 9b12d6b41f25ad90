"""Artifacts: save/load round trip, manifest, atomic write, refusals, runtime-only loading."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import tvmsoftmax
from conftest import softmax_model
from tvmsoftmax.lowering.artifact import FORMAT_VERSION, MANIFEST


@pytest.fixture(scope="module")
def compiled():
    return tvmsoftmax.compile(softmax_model("Softmax", (2, 37), symbolic=True), algorithm="online")


def test_round_trip_and_manifest(compiled, tmp_path):
    path = compiled.save(tmp_path / "m.tvmsm")
    again = tvmsoftmax.load(path)
    x = np.random.default_rng(0).standard_normal((5, 41)).astype(np.float32)
    np.testing.assert_array_equal(again.run({"x": x})["y"], compiled.run({"x": x})["y"])
    manifest = again.manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["target"]["name"] == "x86" and manifest["tvm_version"].startswith("0.27")
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["d0", "d1"]}]
    (site,) = manifest["sites"]
    assert site["lowered"]["algorithm"] == "online" and "vector_lanes" in site["lowered"]["knobs"]
    assert len(manifest["source"]["sha256"]) == 64 and len(manifest["library_sha256"]) == 64


def _at_offset(x: np.ndarray, offset: int) -> np.ndarray:
    """A C-contiguous copy of x whose data starts `offset` bytes past a 64-byte boundary."""
    raw = np.empty(x.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def test_run_on_aligned_and_unaligned_inputs(compiled):
    # 64-byte aligned CPU inputs are passed to TVM without a copy; others are copied. Both give
    # the same result and leave the caller's array unchanged.
    x = np.random.default_rng(1).standard_normal((7, 300)).astype(np.float32) * 30
    want = compiled.run({"x": x.copy()})["y"]
    for offset in (0, 4, 16):
        fed = _at_offset(x, offset)
        assert fed.ctypes.data % 64 == offset
        np.testing.assert_array_equal(compiled.run({"x": fed})["y"], want)
        np.testing.assert_array_equal(fed, x)
    strided = np.repeat(x, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(compiled.run({"x": strided})["y"], want)
    readonly = _at_offset(x, 0)
    readonly.flags.writeable = False
    np.testing.assert_array_equal(compiled.run({"x": readonly})["y"], want)


def test_staged_inputs_are_reused_safely(compiled):
    # Unaligned inputs are copied into one staging buffer per input, reused across calls: a later
    # call (other values, other shape) must not change an earlier result, and calls from several
    # threads at once (serialised) each get their own answer.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(2)
    feeds = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 50), (3, 50), (6, 20), (3, 50))]
    want = [_softmax64(x) for x in feeds]
    got = [compiled.run({"x": _at_offset(x, 16)})["y"] for x in feeds]
    for result, expected in zip(got, want):
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-7)
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda x: compiled.run({"x": _at_offset(x, 16)})["y"], feeds * 4))
    for result, expected in zip(threaded, want * 4):
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-7)


def test_outputs_never_alias_inputs_constants_or_each_other():
    # An output the call allocates for itself alone is handed over without a copy; the others
    # (the input itself, a view of it, a constant, two views of one tensor) are copied, read off
    # the VM bytecode at compile time (manifest "owned_outputs"). Results survive later calls.
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Reshape", ["x", "shape"], ["b"]),
             helper.make_node("Identity", ["c"], ["cc"]), helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["rr"]), helper.make_node("Softmax", ["x"], ["s"])]
    dims = {"a": [2, 3], "b": [3, 2], "cc": [2, 2], "r": [2, 3], "rr": [3, 2], "s": [2, 3]}
    graph = helper.make_graph(
        nodes, "aliases", [helper.make_tensor_value_info("x", f32, [2, 3])],
        [helper.make_tensor_value_info(n, f32, d) for n, d in dims.items()],
        initializer=[numpy_helper.from_array(np.array([3, 2], np.int64), "shape"),
                     numpy_helper.from_array(np.ones((2, 2), np.float32), "c")])
    model = tvmsoftmax.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.manifest["owned_outputs"] == [False, False, False, False, False, True]
    x = _at_offset(np.arange(6, dtype=np.float32).reshape(2, 3) - 2, 0)  # zero-copy input
    first = model.run({"x": x})
    assert not first["s"].flags.owndata  # handed over, not copied
    for name, value in first.items():
        assert not np.shares_memory(value, x), name
        for other_name, other in first.items():
            assert other_name == name or not np.shares_memory(value, other), (name, other_name)
    kept = {name: value.copy() for name, value in first.items()}
    for value in first.values():
        value[...] = 7  # writing into one result changes nothing else
    again = model.run({"x": x})
    for name, value in again.items():
        np.testing.assert_array_equal(value, kept[name], err_msg=name)
    later = model.run({"x": x * 3})
    np.testing.assert_array_equal(later["r"], np.maximum(x * 3, 0))
    np.testing.assert_array_equal(again["s"], kept["s"])  # an earlier result is not reused


def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_save_is_atomic(compiled, tmp_path, monkeypatch):
    path = compiled.save(tmp_path / "m.tvmsm")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", broken)
    with pytest.raises(OSError):
        compiled.save(path)
    assert path.read_bytes() == before  # the old artifact is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tvmsm"]  # no temporary left


def _rewrite_manifest(src, dst, change):
    with zipfile.ZipFile(src) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    manifest = json.loads(members[MANIFEST])
    change(manifest)
    members[MANIFEST] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_refusals(compiled, tmp_path):
    good = compiled.save(tmp_path / "good.tvmsm")
    with pytest.raises(tvmsoftmax.ArtifactError, match="format version 99"):
        _rewrite_manifest(good, tmp_path / "v.tvmsm", lambda m: m.update(format_version=99))
        tvmsoftmax.load(tmp_path / "v.tvmsm")
    with pytest.raises(tvmsoftmax.ArtifactError, match="compiled for target 'x86', not 'cuda'"):
        tvmsoftmax.load(good, target="cuda")
    with pytest.raises(tvmsoftmax.ArtifactError, match=r"is for CUDA \(sm_90\), but .*(NVIDIA driver|no CUDA device)"):
        _rewrite_manifest(good, tmp_path / "c.tvmsm", lambda m: m["target"].update(name="cuda", arch="sm_90"))
        tvmsoftmax.load(tmp_path / "c.tvmsm")
    with pytest.raises(tvmsoftmax.ArtifactError, match="lacks"):
        _rewrite_manifest(good, tmp_path / "f.tvmsm", lambda m: m["target"].update(required_features=["avx1024"]))
        tvmsoftmax.load(tmp_path / "f.tvmsm")
    corrupted = tmp_path / "corrupt.tvmsm"
    with zipfile.ZipFile(good) as archive, zipfile.ZipFile(corrupted, "w") as out:
        out.writestr(MANIFEST, archive.read(MANIFEST))
        library = bytearray(archive.read("model.so"))
        library[len(library) // 2] ^= 0xFF
        out.writestr("model.so", bytes(library))
    with pytest.raises(tvmsoftmax.ArtifactError, match="checksum"):
        tvmsoftmax.load(corrupted)
    truncated = tmp_path / "truncated.tvmsm"
    truncated.write_bytes(good.read_bytes()[: 1000])
    with pytest.raises(tvmsoftmax.ArtifactError, match="corrupted"):
        tvmsoftmax.load(truncated)
    with pytest.raises(tvmsoftmax.ArtifactError, match="no such artifact"):
        tvmsoftmax.load(tmp_path / "missing.tvmsm")


def test_runtime_only_process(compiled, tmp_path):
    """A deployment host without TVM's compiler: TVM_USE_RUNTIME_LIB=1, compiler never loaded."""
    path = compiled.save(tmp_path / "m.tvmsm")
    x = np.random.default_rng(1).standard_normal((3, 37)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", compiled.run({"x": x})["y"])
    script = textwrap.dedent(f"""
        import numpy as np, tvmsoftmax
        model = tvmsoftmax.load({str(path)!r})
        got = model.run({{"x": np.load({str(tmp_path / 'x.npy')!r})}})["y"]
        assert np.array_equal(got, np.load({str(tmp_path / 'want.npy')!r}))
        maps = open("/proc/self/maps").read()
        assert "libtvm_runtime" in maps, "runtime not loaded?"
        assert "libtvm_compiler" not in maps and "libtvm.so" not in maps, "compiler was loaded"
        print("runtime-only ok")
    """)
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "runtime-only ok" in result.stdout


def test_aligned_copies_are_fed_without_a_copy(compiled):
    """`tvmsoftmax.aligned` gives a 64-byte-aligned C-contiguous copy; run hands it to TVM as is
    (no staging buffer is made for that input), with the same result as an unaligned feed."""
    x = _at_offset(np.random.default_rng(3).standard_normal((7, 300)).astype(np.float32), 16)
    fed = tvmsoftmax.aligned(x)
    assert fed.ctypes.data % 64 == 0 and fed.flags.c_contiguous and np.array_equal(fed, x)
    assert fed is not x and not np.shares_memory(fed, x)
    compiled._staging.clear()
    got = compiled.run({"x": fed})["y"]
    assert "x" not in compiled._staging
    np.testing.assert_array_equal(got, compiled.run({"x": x})["y"])
    assert "x" in compiled._staging  # the unaligned feed was staged
    transposed = tvmsoftmax.aligned(np.arange(12.0).reshape(3, 4).T)
    assert transposed.flags.c_contiguous and transposed.ctypes.data % 64 == 0
    np.testing.assert_array_equal(transposed, np.arange(12.0).reshape(3, 4).T)
