"""Runtime bundles: artifacts + TVM's runtime without its compiler + a runner, checked in a fresh
process that takes TVM from the bundle and never loads the compiler."""

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from conftest import softmax_model

import tvmsoftmax
from tvmsoftmax.deploy import bundle_size, reference_case, write_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    model = softmax_model("LogSoftmax", (3, 300), symbolic=True)
    artifact = tvmsoftmax.compile(model, algorithm="online").save(tmp / "logsoftmax.tvmsm")
    case = reference_case(artifact, model, shapes={"x": [6, 257]})
    path = write_bundle(tmp / "out", [artifact], cases={"logsoftmax-6x257": case})
    return path, case


def _run(args, **kw):
    return subprocess.run([sys.executable, "-I", *args], capture_output=True, text=True, timeout=600, check=False, **kw)


def test_layout_and_size(bundle):
    path, case = bundle
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert list(meta["artifacts"]) == ["logsoftmax.tvmsm"] and "logsoftmax-6x257" in meta["cases"]
    assert (path / "python" / "tvm" / "lib" / "libtvm_runtime.so").is_file()
    assert not list(path.rglob("libtvm_compiler.so")) and not list(path.rglob("libtvm.so"))
    assert case["inputs"]["x"].shape == (6, 257) and case["outputs"]["y"].shape == (6, 257)
    assert bundle_size(path) < 40 * 2**20, bundle_size(path) / 2**20  # vs ~300 MB for TVM installed


def test_runner_checks_in_a_runtime_only_process(bundle, tmp_path):
    path, _ = bundle
    report = tmp_path / "report.json"
    result = _run([str(path / "run.py"), "check", "--time", "3", "--json", str(report)])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    (entry,) = json.loads(report.read_text())
    assert entry["ok"] and entry["outputs"]["y"]["max_abs_err"] < 1e-5 and entry["median_s"] > 0
    probe = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(path)!r})
        import run
        meta = run.open_bundle({str(path)!r})
        report = run.run_case(meta, "logsoftmax-6x257")
        import tvm
        maps = open("/proc/self/maps").read()
        assert tvm.__file__.startswith({str(path)!r}), tvm.__file__
        assert "libtvm_compiler" not in maps and "libtvm_runtime" in maps
        print("ok", report["ok"])
    """)
    result = _run(["-c", probe])
    assert result.returncode == 0 and "ok True" in result.stdout, result.stderr[-3000:]


def test_runner_reports_a_wrong_reference(bundle, tmp_path):
    # The check fails (exit 1) when the outputs differ from the reference beyond tolerance.
    path, case = bundle
    wrong = dict(case, outputs={"y": case["outputs"]["y"] + np.float32(1e-3)})
    other = write_bundle(tmp_path / "wrong", [path / "artifacts" / "logsoftmax.tvmsm"], cases={"wrong": wrong})
    result = _run([str(other / "run.py"), "check"])
    assert result.returncode == 1 and "FAIL wrong" in result.stdout, result.stdout + result.stderr[-2000:]


def test_refusals(bundle, tmp_path):
    path, _ = bundle
    not_bundle = tmp_path / "folder"
    not_bundle.mkdir()
    (not_bundle / "keep.txt").write_text("x")
    with pytest.raises(tvmsoftmax.TvmSoftmaxError, match="not a tvmsoftmax bundle"):
        write_bundle(not_bundle, [path / "artifacts" / "logsoftmax.tvmsm"])
    assert (not_bundle / "keep.txt").read_text() == "x"
    with pytest.raises(tvmsoftmax.TvmSoftmaxError, match="not in the bundle"):
        write_bundle(tmp_path / "b", [path / "artifacts" / "logsoftmax.tvmsm"],
                     cases={"c": {"artifact": "other.tvmsm", "inputs": {}}})
    assert not (tmp_path / "b").exists()


def test_gpu_check_script_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu_check.py, both steps, with --target x86 / --device cpu: the same code path a
    GPU host runs (bundle, reference checks against onnxruntime, timings against torch)."""
    pytest.importorskip("torch")
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    bundle_dir = tmp_path / "gpu-bundle"
    result = subprocess.run([sys.executable, str(script), "prepare", str(bundle_dir), "--target", "x86",
                             "--shapes", "3x1000", "--algorithms", "online", "--attention-shapes", "1x2x64x32c"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = tmp_path / "gpu_check.json"
    result = _run([str(script), "run", str(bundle_dir), "--out", str(out), "--device", "cpu"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and len(report["checks"]) == 2 * 2 * 3 + 2 + 2  # ops x dtypes x cases + attention + GQA
    assert {c["case"] for c in report["checks"]} >= {"attention-check-1x2x200x64-causal", "attention-check-2x3x77x32",
                                                    "gqa-check-decode-ragged-batch", "gqa-check-first-prompt"}
    (shape_rows) = [t for t in report["timings"] if t["shape"] == [3, 1000]]
    assert len(shape_rows) == 4
    for t in shape_rows:
        tol = 1e-5 if t["dtype"] == "float32" else 2e-3
        for kind in ("online", "online (static)"):  # the symbolic-dims artifact and the static one
            assert t["algorithms"][kind]["max_abs_err_vs_torch64"] < tol * (10 if t["op"] == "LogSoftmax" else 1)
    (attention,) = report["attention"]
    assert attention["shape"] == [1, 2, 64, 32] and attention["causal"]
    assert attention["max_abs_err_vs_sdpa_float32"] < 2e-3 and attention["median_s"] > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit (nvcc) to build CUDA kernels")
def test_cuda_bundle_carries_compiled_kernels_and_cudart(tmp_path):
    """A CUDA bundle needs no compiler on the GPU host: the artifact holds nvcc's fatbin per CUDA
    module, the bundle holds libcudart beside TVM's CUDA runtime; on this GPU-less host the runner
    (runtime-only TVM) refuses with the reason (no driver) instead of a missing-backend error."""
    artifact = tvmsoftmax.compile(softmax_model("Softmax", (8, 512)), target="cuda").save(tmp_path / "s.tvmsm")
    path = write_bundle(tmp_path / "gpu", [artifact])
    lib = path / "python" / "tvm" / "lib"
    assert (lib / "libtvm_runtime_cuda.so").is_file() and (lib / "libcudart.so.13").is_file()
    manifest = json.loads(zipfile.ZipFile(artifact).read("manifest.json"))
    assert manifest["target"]["required_features"] == []  # host side portable: x86-64-v2
    (entry,) = manifest["cuda_kernels"]
    assert zipfile.ZipFile(artifact).read(entry["member"])[:4] == bytes.fromhex("50ed55ba")  # fatbin magic
    probe = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(path)!r})
        import run
        meta = run.open_bundle({str(path)!r})
        try:
            run.load_artifact(meta, "s.tvmsm")
        except Exception as err:
            print(type(err).__name__, err)
    """)
    result = _run(["-c", probe])
    assert "ArtifactError" in result.stdout and "is for CUDA (sm_90)" in result.stdout, result.stdout + result.stderr[-2000:]
