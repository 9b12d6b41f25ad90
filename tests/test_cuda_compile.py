"""CUDA cross-compilation on a host without a GPU: every algorithm compiles for sm_90 and sm_80,
the generated source has the intended structure, and nvcc accepts it."""

import re

import pytest
import tvm
from conftest import softmax_model

import tvmsoftmax
from tvmsoftmax.lowering import device_code
from tvmsoftmax.models import build

ALGORITHMS = ["three-pass", "three-pass-recompute", "two-pass", "online"]


def assert_built_by_nvcc(compiled, source: str) -> None:
    """With nvcc here, compiling built this source into the artifact's fatbin for the target's arch
    (`device_code.compile_fatbins` raises when nvcc rejects the source)."""
    if device_code.nvcc_path() is None:
        return
    (entry,) = compiled.manifest["cuda_kernels"]
    assert entry["source_sha256"] == device_code.source_sha256(source)
    assert entry["arch"] == compiled.target["arch"] and entry["bytes"] > 0


def cuda_source(compiled) -> str:
    host = compiled.executable.mod.imports[0]
    (device,) = [m for m in host.imports if m.kind == "cuda"]
    return device.inspect_source()


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_site_kernel_structure(algorithm, op, arch):
    compiled = tvmsoftmax.compile(softmax_model(op, (64, 1000)), target="cuda", arch=arch, algorithm=algorithm)
    assert compiled.target["arch"] == arch
    (site,) = compiled.sites
    assert site["lowered"]["algorithm"] == algorithm
    source = cuda_source(compiled)
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(', source)
    ours = {k for k in kernels if k.startswith("tvmsoftmax_site0")}
    assert len(ours) == 1, kernels  # one kernel per site: every pass of a row inside one block
    # and nothing else: the 3-D view before the site is a view, the result is written in the
    # input's shape (no reshape copy kernel after it, though it is the graph's output)
    assert set(kernels) == ours, kernels
    assert "__shared__" in source and "threadIdx.x" in source and "blockIdx.x" in source
    assert "expf" not in source  # our polynomial exp, not the library call
    assert len(source) < 200_000
    assert_built_by_nvcc(compiled, source)


@pytest.mark.parametrize("algorithm,passes", [("online", 1), ("two-pass", 1), ("three-pass-recompute", 2)])
def test_few_long_rows_split_across_blocks(algorithm, passes):
    """(1, 2^26): 256 blocks of one row, 16384-element chunks (4-wide loads), instead of one
    block. Per reduction pass: a kernel over the chunks (state per chunk in global memory) and a
    one-warp merge kernel (the online / two-pass merge of the chunk states); then the output
    kernel over the chunks again. Every kernel reads the input at most once."""
    compiled = tvmsoftmax.compile(softmax_model("Softmax", (1, 1 << 26)), target="cuda", algorithm=algorithm)
    (site,) = compiled.sites
    assert site["lowered"]["knobs"] == {"threads": 256, "rows_per_block": 1, "vector": 4, "splits": 256, "ragged": False}
    source = cuda_source(compiled)
    definitions = re.findall(r'__launch_bounds__\((\d+)\) (tvmsoftmax_site0\w*)\([^)]*\) \{(.*?)\n\}', source, re.DOTALL)
    assert [int(threads) for threads, _, _ in definitions] == [256, 32] * passes + [256]
    for _, name, body in definitions:
        # one 16-byte read per element (the source repeats a load per use; nvcc merges them)
        assert len(set(re.findall(r"\*\(float4\*\)\(A_ptr \+ (.*?)\);", body))) <= 1, name
    assert "split_state" in source
    assert_built_by_nvcc(compiled, source)
    many_rows = tvmsoftmax.compile(softmax_model("Softmax", (4096, 32000)), target="cuda", algorithm=algorithm)
    assert many_rows.sites[0]["lowered"]["knobs"]["splits"] == 1  # enough rows: a block per row


def test_three_pass_long_rows_refused_clearly():
    with pytest.raises(tvmsoftmax.TvmSoftmaxError, match="shared memory.*use three-pass-recompute"):
        tvmsoftmax.compile(softmax_model("Softmax", (4, 100_000)), target="cuda", algorithm="three-pass")


def test_whole_model_cross_compiles(tmp_path):
    compiled = tvmsoftmax.compile(build("gpt2"), target="cuda", shapes={"input_ids": [1, 32], "attention_mask": [1, 32]})
    assert sum(s["rewritten"] for s in compiled.sites) == 2
    path = compiled.save(tmp_path / "gpt2-cuda.tvmsm")
    manifest = tvmsoftmax.lowering.artifact.read_manifest(path)
    assert manifest["target"]["name"] == "cuda" and manifest["target"]["arch"] == "sm_90"
    with pytest.raises(tvmsoftmax.TvmSoftmaxError, match="GPU"):
        compiled.run({})


@pytest.mark.parametrize("algorithm", ["three-pass-recompute", "two-pass", "online"])
def test_short_rows_get_a_warp_each(algorithm):
    # 300-element rows: a warp per row, 4 rows per 128-thread block (threadIdx.y), the row's 32
    # partial states in shared memory per row; rows that 4 does not divide: one warp per block.
    compiled = tvmsoftmax.compile(softmax_model("Softmax", (4096, 300)), target="cuda", algorithm=algorithm)
    (site,) = compiled.sites
    assert site["lowered"]["knobs"] == {"threads": 32, "rows_per_block": 4, "vector": 1, "splits": 1, "ragged": False}
    source = cuda_source(compiled)
    assert re.search(r"__launch_bounds__\(128\) tvmsoftmax_site0", source)
    assert "threadIdx.y" in source and re.search(r"__shared__ alignas\(\d+\) float \w+_partial\w*\[128\]", source)
    odd = tvmsoftmax.compile(softmax_model("Softmax", (77, 300)), target="cuda", algorithm=algorithm)
    assert odd.sites[0]["lowered"]["knobs"] == {"threads": 32, "rows_per_block": 1, "vector": 1, "splits": 1, "ragged": False}
    assert_built_by_nvcc(compiled, source)
    assert_built_by_nvcc(odd, cuda_source(odd))


def test_artifact_carries_one_fatbin_per_cuda_module(tmp_path):
    """Cross-compiled CUDA kernels are built by nvcc here and stored in the artifact; at load the
    CUDA runtime's compile request is answered with exactly that fatbin (no compiler there)."""
    import zipfile

    import tvm_ffi

    from tvmsoftmax.lowering.artifact import _read_fatbins

    if device_code.nvcc_path() is None:
        pytest.skip("needs nvcc")
    compiled = tvmsoftmax.compile(softmax_model("LogSoftmax", (64, 1000)), target="cuda", arch="sm_80")
    path = compiled.save(tmp_path / "m.tvmsm")
    (source,) = device_code.cuda_sources(compiled.executable.mod)
    (entry,) = compiled.manifest["cuda_kernels"]
    assert entry["source_sha256"] == device_code.source_sha256(source) and entry["arch"] == "sm_80"
    with zipfile.ZipFile(path) as archive:
        fatbins = _read_fatbins(path, archive, compiled.manifest)
        blob = archive.read(entry["member"])
    assert blob[:4] == bytes.fromhex("50ed55ba") and len(blob) == entry["bytes"]
    device_code.install_fatbins(fatbins)
    assert bytes(tvm_ffi.get_global_func("tvm_callback_cuda_compile")(source)) == blob
    tampered = dict(compiled.manifest, cuda_kernels=[dict(entry, sha256="0" * 64)])
    with zipfile.ZipFile(path) as archive, pytest.raises(tvmsoftmax.ArtifactError, match="does not match its checksum"):
        _read_fatbins(path, archive, tampered)


@pytest.mark.parametrize("dtype,vector_type", [("float32", "float4"), ("float16", "half4"), ("bfloat16", "nv_bfloat164")])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_long_rows_vector_loads_register_states_cooperative_tree(algorithm, dtype, vector_type):
    """Rows cut into whole steps of threads x 4: each thread reads 4 elements per access (16 bytes
    in float32), keeps its 4 partial states in registers, and the block halves the row's states
    in shared memory together (a level per barrier, not every thread merging all of them)."""
    compiled = tvmsoftmax.compile(softmax_model("Softmax", (64, 4096), dtype=dtype), target="cuda", algorithm=algorithm)
    assert compiled.sites[0]["lowered"]["knobs"] == {"threads": 256, "rows_per_block": 1, "vector": 4, "splits": 1, "ragged": False}
    source = cuda_source(compiled)
    kernel = source[source.index("void __launch_bounds__(256) tvmsoftmax_site0"):]
    kernel = kernel[:kernel.index("\n}\n")]
    (inp, out) = re.search(r"\((?:float|half|nv_bfloat16)\* __restrict__ (\w+), (?:float|half|nv_bfloat16)\* __restrict__ (\w+)\)", kernel).groups()
    assert re.search(rf"\*\({vector_type}\*\)\({out} \+", kernel) or re.search(rf"\*\({vector_type}\*\)\({out}", kernel)
    assert re.search(rf"\*\({vector_type}\*\)\({inp}", kernel), "no vector load of the input"
    local_arrays = [int(n) for n in re.findall(r"^\s+alignas\(\d+\) (?:float|half|nv_bfloat16) \w+_local_ptr\[(\d+)\];", kernel, re.MULTILINE)]
    assert local_arrays and max(local_arrays) <= 4, local_arrays  # registers, not local memory
    assert re.search(r"if \(\(\(int\)threadIdx\.x\) < 128\)", kernel)  # a tree level on half the threads
    assert_built_by_nvcc(compiled, source)


def test_bfloat16_sites_on_cuda_only():
    """bfloat16 Softmax is ours on CUDA (read as float32, accumulated in float32, cast back); on
    x86 TVM 0.27 cannot vectorise its casts, so the site keeps TVM's lowering and says why."""
    model = softmax_model("LogSoftmax", (8, 1000), dtype="bfloat16")
    (site,) = tvmsoftmax.compile(model, target="cuda").sites
    assert site["rewritten"] and site["dtype"] == "bfloat16"
    (site,) = tvmsoftmax.compile(model, target="x86").sites
    assert not site["rewritten"] and "bfloat16" in site["reason"] and "TVM's lowering" in site["reason"]


FAMILY_SHAPES = {"vit": {"pixel_values": [2, 3, 32, 32]}}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_family_attention_fused_on_cuda(family):
    """Every attention site of each transformer family becomes one flash kernel on CUDA too (the
    rest of the model through dlight), and nvcc builds the whole module."""
    model = build(family)
    shapes = FAMILY_SHAPES.get(family) or {i.name: [2, 16] for i in model.graph.input}
    compiled = tvmsoftmax.compile(model, target="cuda", shapes=shapes)
    attention = [s for s in compiled.sites if s.get("kind") == "attention"]
    assert len(attention) == 2 and all(s["lowered"]["strategy"] == "flash" for s in attention), attention
    source = cuda_source(compiled)
    flash = re.findall(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (tvmsoftmax_attention\d+_flash_kernel\w*)\(', source)
    assert len(set(flash)) == 4 and {threads for threads, _ in flash} == {"256", "128"}  # K packing + flash, per site
    assert_built_by_nvcc(compiled, source)


def _flash_kernel_source(spec, dims, knobs=None):
    from tvmsoftmax.lowering.targets import resolve
    from tvmsoftmax.ops.attention import flash_attention
    from tvmsoftmax.schedules import cuda_attention

    knobs = knobs or cuda_attention.choose("auto", dims, spec)[1]
    func = cuda_attention.schedule_flash(flash_attention(spec, knobs.tiling(), dims), knobs)
    executable = tvm.compile(tvm.IRModule({"main": func}), resolve("cuda").tvm_target())
    (source,) = device_code.cuda_sources(executable.mod)
    body = re.search(r"flash_attention_kernel_1\([^)]*\) \{", source)
    return source, source[body.start():source.index("\n}\n", body.start())], knobs


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_flash_kernel_structure(dtype):
    """On CUDA cores (float32, and 16-bit inputs with the float32 operand knob): Q, the packed K
    tile and V in shared memory; the scores, the output accumulator and the running max/sum in
    registers (small local arrays); the row max and sum as warp shuffles; one 128-thread block per
    (batch, head, 32 query rows); nothing of size Sq x Skv anywhere."""
    from tvmsoftmax.ops.attention import AttentionSpec
    from tvmsoftmax.schedules.cuda_attention import CudaAttentionKnobs

    spec = AttentionSpec(q_heads=12, kv_heads=4, head_size=64, v_head_size=64, dtype=dtype, scale=0.125, causal=2)
    _, kernel, knobs = _flash_kernel_source(spec, {"batch": 1, "q_len": 512, "kv_len": 512}, CudaAttentionKnobs())
    assert "wmma" not in kernel
    shared = dict(re.findall(r"__shared__ alignas\(\d+\) \w+ (\w+)_ptr\[(\d+)\];", kernel))
    assert {"key_tiles_shared", "q_rows_shared", "v_tile_shared"} <= set(shared), shared
    assert re.search(r"v_tile_shared_ptr\[[^\]]+\] = v_ptr\[", kernel), "V tile is not copied to shared memory"
    local = dict(re.findall(r"alignas\(\d+\) float (\w+)_local_ptr\[(\d+)\];", kernel))
    assert {"acc", "m", "l", "dots"} <= set(local) and max(map(int, local.values())) <= 16, local
    assert kernel.count("__shfl_down_sync") >= 10 and "__syncthreads" in kernel
    assert max(int(n) for n in shared.values()) < 512 * 512 and knobs.query_block == 32


# float16: 72 s here (nvcc builds it for two archs), so in the slow set; bfloat16 stays in the default one
@pytest.mark.parametrize("dtype,head", [pytest.param("float16", 64, marks=pytest.mark.slow), ("bfloat16", 128)])
def test_flash_tensor_core_structure(dtype, head):
    """16-bit inputs: both inner products on tensor cores. WMMA fragments of the input dtype
    (matrix_a, matrix_b) with float32 accumulators, one mma_sync site each for Q K^T and P V
    (16-deep steps in loops), the scores and the tile's P V stored from the fragments to shared
    memory, the 16-bit operands in dynamic shared memory; the softmax still in registers with warp
    shuffles; nvcc builds it for sm_80 and sm_90. (Run through the CPU emulator for numerics:
    test_cuda_emulated.)"""
    from tvmsoftmax.ops.attention import AttentionSpec

    spec = AttentionSpec(q_heads=12, kv_heads=4, head_size=head, v_head_size=head, dtype=dtype, scale=0.125, causal=2)
    source, kernel, knobs = _flash_kernel_source(spec, {"batch": 1, "q_len": 512, "kv_len": 512})
    assert knobs.tensor_cores and knobs.operand_dtype == dtype
    c_type = {"float16": "half", "bfloat16": "nv_bfloat16"}[dtype]
    for use in ("matrix_a", "matrix_b"):
        assert re.search(rf"fragment<nvcuda::wmma::{use}, 16, 16, 16, {c_type}, nvcuda::wmma::row_major>", kernel), use
    assert re.search(r"fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>", kernel)
    assert kernel.count("nvcuda::wmma::mma_sync(") == 2
    assert kernel.count("nvcuda::wmma::store_matrix_sync(") == 2 and "nvcuda::wmma::fill_fragment(" in kernel
    assert "extern __shared__" in kernel and "buf_dyn_shmem" in kernel
    assert kernel.count("__shfl_down_sync") >= 10
    if device_code.nvcc_path() is not None:
        for arch in ("sm_80", "sm_90"):
            device_code.nvcc_fatbin(source, arch)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_flash_symbolic_lengths_compile(dtype):
    """Batch and both lengths symbolic: Q's rows, the packed K tile and the V tile still in shared
    memory (the compute's copies clamp rows past the lengths: static tiles), on CUDA cores
    (float32) and on tensor cores (float16); nvcc builds both."""
    from tvmsoftmax.ops.attention import AttentionSpec

    spec = AttentionSpec(q_heads=8, kv_heads=8, head_size=64, v_head_size=64, dtype=dtype, causal=2)
    source, kernel, knobs = _flash_kernel_source(spec, {"batch": None, "q_len": None, "kv_len": None})
    if knobs.tensor_cores:
        assert kernel.count("nvcuda::wmma::mma_sync(") == 2 and "buf_dyn_shmem" in kernel
    else:
        assert all(f"{name}_shared_ptr[" in kernel for name in ("key_tiles", "q_rows", "v_tile"))
    assert knobs.tensor_cores == (dtype == "float16")
    if device_code.nvcc_path() is not None:
        device_code.nvcc_fatbin(source, "sm_90")


def test_materialized_attention_on_cuda_compiles():
    model = build("bert")
    compiled = tvmsoftmax.compile(model, target="cuda", attention="materialized",
                                  shapes={i.name: [2, 16] for i in model.graph.input})
    attention = [s for s in compiled.sites if s.get("kind") == "attention"]
    assert [s["lowered"]["strategy"] for s in attention] == ["materialized"] * 2
    assert_built_by_nvcc(compiled, cuda_source(compiled))
