"""Run the CUDA that TVM generates for a PrimFunc on this CPU: a test harness, not a GPU.

No GPU is needed (none is here): the generated CUDA C++ is compiled by nvcc as *host* code with a
small shim, and every thread block runs as real concurrent threads (one std::thread per CUDA
thread), so ``__syncthreads`` is a real barrier of the block and the warp shuffles TVM emits
(``__shfl_down_sync``, ``__shfl_sync``, ...) exchange values between the 32 threads of a warp
through a warp barrier. ``__shared__`` arrays are static, so they are shared by the threads of the
block; blocks run one after another. Launch dimensions come from TVM's own lowering
(``thread_extent`` of each device kernel after SplitHostDevice), kernel arguments from the
kernel's parameters, and global workspaces (e.g. attention's packed K tiles) are allocated from
the PrimFunc's root buffers.

What it checks: indexing, thread mapping, register/shared scopes, barriers and shuffles of the
exact CUDA source a model ships; and, statically before the run, that no kernel has every thread
of a block store to one global or shared address (`uniform_global_stores`: a race that running blocks one at
a time exposes only by chance). What it cannot: timing, memory-model effects finer than a
barrier. Tensor cores (WMMA) are emulated at the API level: a fragment is a whole 16 x 16 tile
in every lane (see the shim), which checks how TVM's code uses fragments, not the hardware's lane
mapping. Static shapes only.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = r"""
#include <barrier>
#include <cstring>
#include <cmath>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <type_traits>
struct EmuDim { unsigned x = 0, y = 0, z = 0; };
static thread_local EmuDim emu_threadIdx, emu_blockIdx;
static EmuDim emu_blockDim, emu_gridDim;
static std::barrier<>* emu_block_barrier;
struct EmuWarp { std::barrier<>* bar; alignas(8) unsigned char slot[32][8]; };
static std::vector<EmuWarp*> emu_warps;
static inline int emu_tid() {
  return emu_threadIdx.x + emu_blockDim.x * (emu_threadIdx.y + emu_blockDim.y * emu_threadIdx.z);
}
template <class T> static T emu_shuffle(T v, int lane_from_width, int width, int mode) {
  // mode 0: index, 1: down, 2: up, 3: xor (CUDA's semantics within segments of `width` lanes)
  int tid = emu_tid(), lane = tid % 32;
  EmuWarp* w = emu_warps[tid / 32];
  std::memcpy(w->slot[lane], &v, sizeof(T));
  w->bar->arrive_and_wait();
  int base = (lane / width) * width, in = lane % width, src = -1;
  if (mode == 0) src = base + (lane_from_width % width);
  if (mode == 1) src = in + lane_from_width < width ? lane + lane_from_width : lane;
  if (mode == 2) src = in - lane_from_width >= 0 ? lane - lane_from_width : lane;
  if (mode == 3) src = base + ((in ^ lane_from_width) % width);
  T out; std::memcpy(&out, w->slot[src], sizeof(T));
  w->bar->arrive_and_wait();
  return out;
}
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __device__
#define __device__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __syncthreads() emu_block_barrier->arrive_and_wait()
#define __activemask() 0xffffffffu
#define __shfl_sync(mask, v, src, ...) emu_shuffle((v), (src), (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, 0)
#define __shfl_down_sync(mask, v, d, ...) emu_shuffle((v), (d), (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, 1)
#define __shfl_up_sync(mask, v, d, ...) emu_shuffle((v), (d), (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, 2)
#define __shfl_xor_sync(mask, v, d, ...) emu_shuffle((v), (d), (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, 3)
static inline float emu_int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline int emu_float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
static inline float emu_uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline unsigned emu_float_as_uint(float v) { unsigned i; std::memcpy(&i, &v, 4); return i; }
#define __int_as_float emu_int_as_float
#define __float_as_int emu_float_as_int
#define __uint_as_float emu_uint_as_float
#define __float_as_uint emu_float_as_uint
#define __expf expf
#define __logf logf
// WMMA (tensor cores): every lane holds the whole 16 x 16 tile of a fragment (the hardware's
// lane mapping is opaque to code that only uses the wmma API, as TVM's does), so loads, mma and
// stores are computed by each lane on its own copy; the lanes of a warp store identical values.
namespace emu_wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[rows * cols];
};
template <class Use, int M, int N, int K, class T, class L, class V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) { for (auto& e : f.x) e = float(T(v)); }
template <class Use, int M, int N, int K, class T, class L, class P>
void emu_load(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm, bool col) {
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r) for (int c = 0; c < F::cols; ++c)
    f.x[r * F::cols + c] = float(T(col ? p[c * ldm + r] : p[r * ldm + c]));
}
template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  emu_load(f, p, ldm, std::is_same_v<L, col_major>);
}
template <int M, int N, int K, class T, class P>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const P* p, unsigned ldm, layout_t l) {
  emu_load(f, p, ldm, l == mem_col_major);
}
template <int M, int N, int K, class T, class P>
void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
  for (int r = 0; r < M; ++r) for (int c = 0; c < N; ++c)
    p[l == mem_col_major ? c * ldm + r : r * ldm + c] = P(f.x[r * N + c]);
}
template <int M, int N, int K, class TD, class TA, class LA, class TB, class LB, class TC>
void mma_sync(fragment<accumulator, M, N, K, TD>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) {
    float sum = c.x[i * N + j];
    for (int k = 0; k < K; ++k) sum += a.x[i * K + k] * b.x[k * N + j];
    out[i * N + j] = sum;
  }
  for (int i = 0; i < M * N; ++i) d.x[i] = float(TD(out[i]));
}
}  // namespace emu_wmma
template <class F> static void emu_launch(EmuDim grid, EmuDim block, F kernel) {
  emu_gridDim = grid; emu_blockDim = block;
  int threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by)
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> bar(threads);
    emu_block_barrier = &bar;
    std::vector<std::barrier<>*> warp_bars;
    emu_warps.clear();
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      int n = std::min(32, threads - 32 * w);
      warp_bars.push_back(new std::barrier<>(n));
      emu_warps.push_back(new EmuWarp{warp_bars.back(), {}});
    }
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        emu_blockIdx = EmuDim{bx, by, bz};
        emu_threadIdx = EmuDim{unsigned(t % block.x), unsigned((t / block.x) % block.y),
                               unsigned(t / (block.x * block.y))};
        kernel();
      });
    }
    for (auto& th : pool) th.join();
    for (auto* w : emu_warps) { delete w->bar; delete w; }
    emu_warps.clear();
  }
}
static void* emu_read(const char* path, size_t bytes) {
  void* p = std::calloc(bytes ? bytes : 1, 1);
  if (FILE* f = std::fopen(path, "rb")) { size_t n = std::fread(p, 1, bytes, f); (void)n; std::fclose(f); }
  return p;
}
static void emu_write(const char* path, const void* p, size_t bytes) {
  FILE* f = std::fopen(path, "wb"); std::fwrite(p, 1, bytes, f); std::fclose(f);
}
"""

_C_TYPES = {"float32": "float", "float16": "half", "bfloat16": "nv_bfloat16", "bool": "bool",
            "int64": "int64_t", "int32": "int32_t"}


def _kernels(func, target):
    """[(name, [(param, dtype)], {tag: extent})] of the device kernels, in launch order."""
    import tvm
    from tvm.ir.instrument import pass_instrument

    @pass_instrument
    class Capture:
        def run_after_pass(self, mod, info):
            if info.name == "tirx.SplitHostDevice":
                self.mod = mod

    capture = Capture()
    with tvm.transform.PassContext(instruments=[capture]):
        executable = tvm.compile(tvm.IRModule({"main": func}), target)
    host = capture.mod["main"].script()
    order = re.findall(r'"(\w+_kernel(?:_\d+)?)"', host) or []
    kernels = {}
    for gvar, kernel in capture.mod.functions_items():
        name = gvar.name_hint
        if name == "main":
            continue
        params = [(re.sub(r"\W", "_", str(p.name)), re.search(r'T\.handle\("(\w+)"', str(p.ty)).group(1)) for p in kernel.params]
        extents = {tag: int(value) for tag, value in
                   re.findall(r'T\.launch_thread\("(\w+\.\w)", (?:T\.int64\()?(\d+)', kernel.script())}
        kernels[name] = (params, extents)
    for name, kernel in capture.mod.functions_items():
        if name.name_hint != "main" and (races := uniform_global_stores(kernel)):
            raise AssertionError(f"kernel {name.name_hint}: every thread of the block stores to the same global/"
                                 f"shared address (a race; guard the store by a thread index): {races}")
    seen = []
    for name in order:
        if name in kernels and name not in seen:
            seen.append(name)
    seen += [name for name in kernels if name not in seen]
    return executable, [(name, *kernels[name]) for name in seen]


def _vars(expr) -> set:
    from tvm.tirx.analysis import undefined_vars

    return set(undefined_vars(expr))


def _thread_extents(stmt, out: dict) -> dict:
    """{thread tag: launch extent} of a device kernel (the largest extent of each tag's bindings:
    TVM launches that many and does not guard a binding of a smaller extent)."""
    from tvm import tirx

    if isinstance(stmt, tirx.SeqStmt):
        for child in stmt.seq:
            _thread_extents(child, out)
    elif isinstance(stmt, tirx.IfThenElse):
        _thread_extents(stmt.then_case, out)
        _thread_extents(stmt.else_case, out)
    elif stmt is not None and hasattr(stmt, "body"):
        if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "thread_extent":
            tag = stmt.node.thread_tag
            out[tag] = max(out.get(tag, 1), int(stmt.value))
        _thread_extents(stmt.body, out)
    return out


def uniform_global_stores(kernel) -> list[tuple[str, list[str]]]:
    """[(buffer, [tags])]: stores to global or shared memory that all threads of a threadIdx tag
    (launch extent > 1) make to the same address, unguarded: neither the indices nor an enclosing
    condition depend on a binding of that tag with the full launch extent. A read-modify-write of
    that kind (a state written by "one thread" that is really every thread) is a race the
    emulator's block-at-a-time run catches only now and then, and a real GPU's warps always can."""
    from tvm import tirx

    launch = {tag: extent for tag, extent in _thread_extents(kernel.body, {}).items()
              if tag.startswith("threadIdx") and extent > 1}
    found = []

    def tags(dep, expr) -> set:
        return set().union(*[dep.get(v, set()) for v in _vars(expr)])

    def walk(stmt, dep: dict, guarded: set) -> None:
        # dep: var -> the thread tags its value depends on (full-extent bindings only)
        if stmt is None:
            return
        if isinstance(stmt, tirx.SeqStmt):
            for child in stmt.seq:
                walk(child, dep, guarded)
        elif isinstance(stmt, tirx.AttrStmt):
            if stmt.attr_key == "thread_extent":
                tag = stmt.node.thread_tag
                full = tag in launch and int(stmt.value) == launch[tag]
                dep = {**dep, stmt.node.var: {tag} if full else set()}
            walk(stmt.body, dep, guarded)
        elif isinstance(stmt, tirx.Bind):  # binds for the rest of its scope
            dep[stmt.var] = tags(dep, stmt.value)
        elif isinstance(stmt, tirx.For):
            walk(stmt.body, {**dep, stmt.loop_var: tags(dep, stmt.min) | tags(dep, stmt.extent)}, guarded)
        elif isinstance(stmt, tirx.IfThenElse):
            condition = guarded | tags(dep, stmt.condition)
            walk(stmt.then_case, dict(dep), condition)
            walk(stmt.else_case, dict(dep), condition)
        elif isinstance(stmt, tirx.BufferStore):
            if stmt.buffer.scope() in ("global", "shared", "shared.dyn"):
                used = guarded | set().union(*[tags(dep, index) for index in stmt.indices])
                if missing := sorted(set(launch) - used):
                    found.append((stmt.buffer.name, missing))
        elif hasattr(stmt, "body"):
            walk(stmt.body, dep, guarded)

    walk(kernel.body, {}, set())
    return found


def run_cuda_on_cpu(func, target, arrays: dict, outputs: list[str], workdir: str | None = None) -> dict:
    """Compile `func` (a scheduled CUDA PrimFunc with static shapes) for `target` with TVM, build
    its CUDA source for the CPU with the shim and run it on `arrays` (parameter name -> array).
    Returns {name: array} for `outputs`."""
    from tvmsoftmax.lowering import device_code

    executable, kernels = _kernels(func, target)
    (source,) = device_code.cuda_sources(executable.mod)
    at = source.index('extern "C" __global__')
    # static (block-wide) instead of __shared__; GNU alignment (EDG refuses alignas after static)
    kernels_source = re.sub(r"__shared__ alignas\((\d+)\)", r"static __attribute__((aligned(\1)))", source[at:])
    # Dynamic shared memory: a static array as large as any GPU's (228 KiB), block-wide too.
    kernels_source = re.sub(r"extern __shared__ __align__\((\d+)\) (\w+) (\w+)\[\];",
                            r"static __attribute__((aligned(\1))) \2 \3[228 * 1024];", kernels_source)
    kernels_source = kernels_source.replace("nvcuda::wmma::", "emu_wmma::")
    program = source[:at] + SHIM + kernels_source
    shapes = {str(p.name): ([int(d) for d in p.ty.shape], str(p.ty.dtype)) for p in func.params}
    for name, (shape, dtype) in _workspaces(func).items():
        shapes.setdefault(name, (shape, dtype))
    lines = ["int main() {"]
    for name, (shape, dtype) in shapes.items():
        count = int(np.prod(shape)) if shape else 1
        size = count * np.dtype(_np_dtype(dtype)).itemsize
        lines.append(f'  auto* {name}_buf = ({_C_TYPES[dtype]}*)emu_read("{name}.bin", {size});')
    for kernel, params, extents in kernels:
        args = ", ".join(f"{p.removesuffix('_ptr')}_buf" for p, _ in params)
        grid = ", ".join(str(extents.get(f"blockIdx.{a}", 1)) for a in "xyz")
        block = ", ".join(str(extents.get(f"threadIdx.{a}", 1)) for a in "xyz")
        lines.append(f"  emu_launch(EmuDim{{{grid}}}, EmuDim{{{block}}}, [&] {{ {kernel}({args}); }});")
    for name in outputs:
        shape, dtype = shapes[name]
        size = int(np.prod(shape)) * np.dtype(_np_dtype(dtype)).itemsize
        lines.append(f'  emu_write("{name}.out", {name}_buf, {size});')
    lines.append("  return 0;\n}\n")
    program += "\n".join(lines)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        (tmp / "kernel.cu").write_text(program)
        for name, value in arrays.items():
            shape, dtype = shapes[name]
            np.ascontiguousarray(value, dtype=_np_dtype(dtype)).reshape(shape).tofile(tmp / f"{name}.bin")
        nvcc = device_code.nvcc_path()
        build = subprocess.run(
            # -arch sm_90: nvcc's device pass still parses the file, and TVM's bfloat16 preamble
            # needs an arch >= 80 there; TVM's half/bfloat16 operator flags as for the fatbins.
            [nvcc, "-x", "cu", "-std=c++20", "-O1", "-arch=sm_90", *device_code._NVCC_FLAGS[1:],
             "-Xcompiler", "-pthread", "-o", str(tmp / "run"), str(tmp / "kernel.cu")],
            capture_output=True, text=True, check=False,
        )
        if build.returncode:
            raise RuntimeError("nvcc (host build of the CUDA source) failed:\n" + build.stderr[-4000:])
        done = subprocess.run([str(tmp / "run")], cwd=tmp, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode:
            raise RuntimeError(f"emulated kernels failed ({done.returncode}): {done.stderr[-2000:]}")
        out = {}
        for name in outputs:
            shape, dtype = shapes[name]
            out[name] = np.fromfile(tmp / f"{name}.out", dtype=_np_dtype(dtype)).reshape(shape)
        return out


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _workspaces(func) -> dict:
    """Root-level buffers of the PrimFunc (global workspaces the host allocates), by name."""
    out = {}
    text = re.sub(r"T\.int64\((\d+)\)", r"\1", func.script())
    pattern = r'^ +(\w+) = T\.(?:sblock_)?alloc_buffer\(\(([\d, ]*)\)(?:, "(\w+)")?(.*)$'
    for name, shape, dtype, rest in re.findall(pattern, text, re.MULTILINE):
        if "scope=" not in rest or 'scope="global"' in rest:
            out[name] = ([int(d) for d in shape.split(",") if d.strip()], dtype or "float32")
    return out
