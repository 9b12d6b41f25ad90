"""The generic x86 rule for the non-softmax kernels really schedules them (a silent fallback to
the unscheduled kernel once made whole models 25x slower), and keeps results exact."""

import re

import numpy as np
import pytest
import tvm
from tvm import te, topi

from tvmsoftmax.schedules.generic import schedule_generic


def _build_and_run(func, spec, arrays, out_shape):
    executable = tvm.compile(tvm.IRModule({"main": func}), spec.tvm_target())
    out = tvm.runtime.empty(out_shape, "float32", tvm.cpu())
    executable["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize("columns", [64, 24])
def test_matmul_is_parallel_vectorised_and_exact(x86_spec, columns):
    """Register tiles of rows x vectors of columns, also where the columns are a multiple of half
    or a quarter of the vector width only (24) (a rule that raised once left matmuls scalar: the
    rule is all-or-nothing per block, so this checks its result, not just that it ran)."""
    a = te.placeholder((2, 48, 32), "float32", name="a")
    b = te.placeholder((2, 32, columns), "float32", name="b")
    c = topi.nn.batch_matmul(a, b, transpose_b=False)
    func = te.create_prim_func([a, b, c])
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    script = scheduled.script()
    assert "T.parallel" in script and "T.vectorized" in script
    assert '"local"' in script  # register tiles: accumulators in a block-local buffer
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 48, 32)).astype(np.float32), rng.standard_normal((2, 32, columns)).astype(np.float32)
    got = _build_and_run(scheduled, x86_spec, [x, y], (2, 48, columns))
    np.testing.assert_allclose(got, x @ y, rtol=1e-5, atol=1e-5)
    # each output's sum in the same order as the unscheduled kernel's: the same bits
    np.testing.assert_array_equal(got, _build_and_run(func, x86_spec, [x, y], (2, 48, columns)))


def _elementwise(shape, spec):
    a = te.placeholder(shape, "float32", name="a")
    c = te.compute(shape, lambda i, j: a[i, j] * 2.0 + 1.0, name="c")
    return schedule_generic(te.create_prim_func([a, c]), spec.vector_lanes)


def test_elementwise_is_parallel_vectorised(x86_spec):
    scheduled = _elementwise((256, 512), x86_spec)
    script = scheduled.script()
    assert "T.parallel" in script and "T.vectorized" in script
    x = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
    np.testing.assert_array_equal(_build_and_run(scheduled, x86_spec, [x], (256, 512)), x * 2 + 1)


def test_small_blocks_run_on_one_thread(x86_spec):
    """Below PARALLEL_MIN_ITERATIONS a parallel launch costs more than the work: vectorised, serial."""
    from tvmsoftmax.schedules.generic import PARALLEL_MIN_ITERATIONS

    assert 64 * 128 < PARALLEL_MIN_ITERATIONS <= 256 * 512
    scheduled = _elementwise((64, 128), x86_spec)
    script = scheduled.script()
    assert "T.parallel" not in script and "T.vectorized" in script
    x = np.random.default_rng(2).standard_normal((64, 128)).astype(np.float32)
    np.testing.assert_array_equal(_build_and_run(scheduled, x86_spec, [x], (64, 128)), x * 2 + 1)


def test_convolution_is_vectorised_over_output_columns_and_exact(x86_spec):
    """A convolution (three reduction loops: channels x kernel window) gets the matmul treatment:
    reductions outside the output-column loop, which vectorises by the widest of lanes, lanes/2,
    lanes/4 that divides the width (56 on 16 lanes: 8), or whole when narrower than a vector (14).
    Each output's sum keeps its order, so the result equals the unscheduled kernel's bit for bit.
    (Left scalar, the onnx package's VGG-19 ran in 9.3 s here; now 0.4 s.)"""
    for width, stride in ((14, 1), (56, 1), (4, 2)):
        data = te.placeholder((1, 8, width * stride, width * stride), "float32", name="data")
        kernel = te.placeholder((16, 8, 3, 3), "float32", name="kernel")
        out = topi.nn.conv2d_nchw(data, kernel, stride, 1, 1)
        func = te.create_prim_func([data, kernel, out])
        scheduled = schedule_generic(func, x86_spec.vector_lanes)
        script = scheduled.script()
        vectorised = width % 4 == 0 or width < x86_spec.vector_lanes
        assert ("T.vectorized" in script) == vectorised, (width, script)
        rng = np.random.default_rng(width)
        arrays = [rng.standard_normal([int(d) for d in t.shape]).astype(np.float32) for t in (data, kernel)]
        shape = tuple(int(d) for d in out.shape)
        got = _build_and_run(scheduled, x86_spec, arrays, shape)
        np.testing.assert_array_equal(got, _build_and_run(func, x86_spec, arrays, shape))


def test_a_failing_register_tiling_falls_back_to_the_plain_rule(x86_spec, monkeypatch):
    """Where register tiling raises half-way, the block gets the plain rule (parallel, vectorised),
    not the unscheduled scalar kernel (a tiling bug once left every matmul scalar)."""
    from tvmsoftmax.schedules import generic

    def broken(sch, block, spatial, reduce, lanes, parallel, *rest):
        sch.split(spatial[-1], [None, lanes])  # a change, then a failure
        raise RuntimeError("tiling failed")

    monkeypatch.setattr(generic, "_register_tiled", broken)
    a = te.placeholder((2, 48, 32), "float32", name="a")
    b = te.placeholder((2, 32, 64), "float32", name="b")
    c = topi.nn.batch_matmul(a, b, transpose_b=False)
    func = te.create_prim_func([a, b, c])
    script = schedule_generic(func, x86_spec.vector_lanes).script()
    assert "T.vectorized" in script and '"local"' not in script


def test_matmul_rows_not_a_multiple_of_the_tile_keep_whole_tiles(x86_spec):
    """197 rows (ViT's tokens, a prime): register tiles of the full height with a predicated last
    tile, not 1-row tiles (which ran a ViT-base MLP matmul at a fifth of the speed); same bits as
    the unscheduled kernel."""
    from tvmsoftmax.schedules.generic import register_tile

    a = te.placeholder((197, 32), "float32", name="a")
    b = te.placeholder((32, 64), "float32", name="b")
    c = topi.matmul(a, b)
    func = te.create_prim_func([a, b, c])
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    script = scheduled.script()
    rows, _ = register_tile(x86_spec.vector_lanes, 64 // x86_spec.vector_lanes)
    assert f"T.unroll({rows})" in script and "T.where" in script and '"local"' in script
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((197, 32)).astype(np.float32), rng.standard_normal((32, 64)).astype(np.float32)
    got = _build_and_run(scheduled, x86_spec, [x, y], (197, 64))
    np.testing.assert_allclose(got, x.astype(np.float64) @ y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got, _build_and_run(func, x86_spec, [x, y], (197, 64)))


@pytest.mark.parametrize("lanes,registers", [(16, 32), (8, 16), (4, 16)])
@pytest.mark.parametrize("column_vectors", [None, 48, 6, 3, 1])
def test_register_tile_fits_the_register_file(lanes, registers, column_vectors):
    """Accumulators (rows x vectors), the other operand's vectors and a broadcast fit in the
    vector registers (AVX-512: 32; AVX2/SSE: 16): a tile that spills ran at a third of the speed.
    The vectors divide the output's; fewer of them, more rows, up to 12 (each row a broadcast)."""
    from tvmsoftmax.schedules.generic import register_tile

    rows, vectors = register_tile(lanes, column_vectors)
    assert rows * vectors + vectors + 1 <= registers
    assert rows >= 6 and rows <= 12  # and not so small that loads outnumber FMAs
    if column_vectors is not None:  # as many accumulators as the preferred tile, or 12 rows
        preferred_rows, preferred_vectors = register_tile(lanes)
        assert column_vectors % vectors == 0
        assert rows * vectors == preferred_rows * preferred_vectors or rows == 12


def test_elementwise_chains_become_one_loop_nest(x86_spec):
    """GELU-like chains of elementwise kernels (one intermediate buffer each, a pass over memory
    each, which cost BERT's MLP a third of its time) are computed in one loop nest; a producer
    that a larger consumer would recompute (a broadcast) stays a block of its own. Same bits."""
    x = te.placeholder((64, 256), "float32", name="x")
    v = te.placeholder((256,), "float32", name="v")
    scaled = te.compute((64, 256), lambda i, j: x[i, j] * 0.5, name="scaled")
    erf = te.compute((64, 256), lambda i, j: te.erf(scaled[i, j]), name="erf")
    table = te.compute((256,), lambda j: te.exp(v[j]), name="table")  # broadcast over rows below
    out = te.compute((64, 256), lambda i, j: (erf[i, j] + 1.0) * x[i, j] + table[j], name="out")
    func = te.create_prim_func([x, v, out])
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    script = scheduled.script()
    assert 'T.sblock("scaled")' not in script and 'T.sblock("erf")' not in script
    assert 'T.sblock("table")' in script and 'T.sblock("out")' in script
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal(256).astype(np.float32)
    got = _build_and_run(scheduled, x86_spec, [a, b], (64, 256))
    np.testing.assert_array_equal(got, _build_and_run(func, x86_spec, [a, b], (64, 256)))


def test_intermediates_named_like_the_output_are_inlined_too(x86_spec):
    """topi names every product "T_multiply": in Relax's GELU, 0.5 * x * (1 + erf(x / sqrt 2)), the
    first product shares its name with the output. Buffers are told apart by identity, so the
    whole chain is still one loop nest (by name it stayed 3 passes and its erf pass ran
    scalar: ONNX Gelu over [197, 3072] took 3.2 ms, onnxruntime 0.24). Same bits."""
    x = te.placeholder((64, 256), "float32", name="x")
    gelu = topi.multiply(topi.multiply(x, 0.5), topi.add(1.0, topi.erf(topi.multiply(x, 0.7071067811865476))))
    func = te.create_prim_func([x, gelu])
    assert str(func.params[1].name) == "T_multiply" and func.script().count('T.sblock("T_multiply') == 3
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    script = scheduled.script()
    assert script.count("T.sblock(") == 2, script  # the root and one loop nest
    assert "T.vectorized" in script
    a = (np.random.default_rng(4).standard_normal((64, 256)) * 3).astype(np.float32)
    got = _build_and_run(scheduled, x86_spec, [a], (64, 256))
    np.testing.assert_array_equal(got, _build_and_run(func, x86_spec, [a], (64, 256)))


def _compile_packed(model, **options):
    """tvmsoftmax.compile(model, **options), asserting that the weights were packed at compile
    time: the program after our fold calls the packed kernel and no re-layout function."""
    from tvm.ir.instrument import pass_instrument

    import tvmsoftmax

    @pass_instrument
    class Capture:
        def run_after_pass(self, mod, info):
            if info.name == "tvmsoftmax.FoldWeightPrepacks":
                self.main = mod["main"].script(show_meta=False)

    capture = Capture()
    with tvm.transform.PassContext(instruments=[capture]):
        compiled = tvmsoftmax.compile(model, **options)
    assert "_prepacked" in capture.main and "_weight_prepack" not in capture.main
    return compiled


def test_constant_weights_are_packed_once_at_compile_time(tmp_path):
    """A MatMul by a constant: the generic rule reads the weights as column panels, the re-layout
    is run once at compile time (no re-layout call left in the program, the packed constant in
    its place), and the outputs are the same bits as without packing, and onnxruntime's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import tvmsoftmax
    from tvmsoftmax.schedules import generic

    rng = np.random.default_rng(4)
    weights = rng.standard_normal((96, 128)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Relu", ["y0"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 50, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 50, 128])],
        [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 50, 96)).astype(np.float32)
    packed = _compile_packed(model)
    got = next(iter(packed.run({"x": x}).values()))
    original = generic._packed_weights
    generic._packed_weights = lambda *args: None
    try:
        plain = tvmsoftmax.compile(model)
    finally:
        generic._packed_weights = original
    np.testing.assert_array_equal(got, next(iter(plain.run({"x": x}).values())))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_matmul_with_symbolic_rows_gets_register_tiles(x86_spec):
    """Rows of a symbolic extent (a dynamic sequence length): the same register tiles with a
    predicated last tile; right for a length that is and one that is not a multiple of the tile."""
    rows = tvm.tirx.Var("rows", "int64")
    a = te.placeholder((rows, 32), "float32", name="a")
    b = te.placeholder((32, 64), "float32", name="b")
    c = topi.matmul(a, b)
    func = te.create_prim_func([a, b, c])
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    assert '"local"' in scheduled.script() and "T.where" in scheduled.script()
    executable = tvm.compile(tvm.IRModule({"main": scheduled}), x86_spec.tvm_target())
    rng = np.random.default_rng(5)
    y = rng.standard_normal((32, 64)).astype(np.float32)
    for count in (24, 77):
        x = rng.standard_normal((count, 32)).astype(np.float32)
        out = tvm.runtime.empty((count, 64), "float32", tvm.cpu())
        executable["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
        np.testing.assert_allclose(out.numpy(), x.astype(np.float64) @ y, rtol=1e-5, atol=1e-5)


def test_long_reductions_are_summed_in_blocks_as_accurately_as_onnxruntime(x86_spec):
    """K = 3072 (BERT's second MLP matmul): summed in blocks of K_BLOCK terms, each from zero, then
    the blocks' sums (MLAS's k blocking). One running float32 sum was 6x further from float64 than
    onnxruntime's MatMul (and a 12-layer GPT-2 failed its check for it); now as far, or less."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tvmsoftmax.schedules.generic import K_BLOCK

    rows, depth, columns = 24, 3072, 64
    assert depth > K_BLOCK
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((rows, depth)) + 1.0).astype(np.float32)  # a mean: errors accumulate
    w = (rng.standard_normal((depth, columns)) * 0.05).astype(np.float32)
    a = te.placeholder((rows, depth), "float32", name="a")
    b = te.placeholder((depth, columns), "float32", name="b")
    func = te.create_prim_func([a, b, topi.matmul(a, b)])
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    assert "_rf" in scheduled.script()  # the per-block partial sums
    got = _build_and_run(scheduled, x86_spec, [x, w], (rows, columns))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, depth])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, columns])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = x.astype(np.float64) @ w.astype(np.float64)
    ours_error, their_error = np.abs(got - exact).max(), np.abs(theirs - exact).max()
    assert ours_error <= 1.5 * their_error, (ours_error, their_error)


def _matmul_bias(rows, depth, columns):
    a = te.placeholder((rows, depth), "float32", name="a")
    b = te.placeholder((depth, columns), "float32", name="b")
    bias = te.placeholder((columns,), "float32", name="bias")
    product = topi.matmul(a, b)
    out = te.compute((rows, columns), lambda i, j: product[i, j] + bias[j], name="biased")
    return te.create_prim_func([a, b, bias, out])


@pytest.mark.parametrize("depth", [96, 600], ids=["one-k-block", "k-blocks"])
def test_matmul_epilogue_runs_in_the_tile(x86_spec, depth):
    """The bias add after a tiled matmul of one k block is computed per register tile from its
    accumulators (`_fuse_epilogue`): no pass of its own over the product. With K past K_BLOCK
    (k blocks) it keeps a pass of its own (fused, LLVM held the running totals in registers
    across blocks and spilled the accumulators). Rows that are not a multiple of the tile's
    (52 = 8 x 6 + 4) give a predicated last tile. Results as the unscheduled kernel's (one k
    block: the same bits; k blocks: float32-close to float64)."""
    from tvm import s_tir

    rows, columns = 52, 64
    func = _matmul_bias(rows, depth, columns)
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    sch = s_tir.Schedule(scheduled)
    product = "T_matmul_rf_update" if depth > 256 else "T_matmul_update"
    outermost = {name: sch.get(sch.get_loops(sch.get_sblock(name))[0]) for name in ("biased", product)}
    assert outermost["biased"].same_as(outermost[product]) == (depth <= 256)  # inside the matmul's tile loop
    rng = np.random.default_rng(8)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    w = rng.standard_normal((depth, columns)).astype(np.float32)
    bias = rng.standard_normal(columns).astype(np.float32)
    got = _build_and_run(scheduled, x86_spec, [x, w, bias], (rows, columns))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w + bias, rtol=1e-4, atol=1e-4)
    if depth <= 256:
        np.testing.assert_array_equal(got, _build_and_run(func, x86_spec, [x, w, bias], (rows, columns)))


@pytest.mark.parametrize("rows, depth, columns", [(64, 128, 64), (126, 768, 256), (52, 600, 64)],
                         ids=["predicated-tile", "whole-tiles-k-blocks", "predicated-k-blocks"])
def test_matmul_inner_loops_keep_their_accumulators_in_registers(x86_spec, rows, depth, columns):
    """Every loop of a matmul + bias (a basic block that branches back to itself) with at least 8
    FMAs (the inner loops: one per k block where LLVM unrolls them) stores nothing: its
    accumulators stay in registers. Broken
    once by an epilogue that walked the accumulators in a loop (an array in memory, the inner
    loop read-modified-wrote it: 20% slower), once by the bias fused into a tile with k blocks
    and rows a multiple of 6 (the middle block of three spilled: 2.2x slower)."""
    func = _matmul_bias(rows, depth, columns)
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    executable = tvm.compile(tvm.IRModule({"main": scheduled}), x86_spec.tvm_target())
    modules = executable.mod._collect_from_import_tree(lambda m: m.kind == "llvm")
    asm = "".join(module.inspect_source("asm") for module in modules)
    # single-block loops: from a label to the branch back to it (the code after is the exit's)
    pieces = re.split(r"\n(\.?L?[\w.$]+):", asm)
    back = [(text, re.search(rf"\sj\w+\s+{re.escape(label)}\b", text)) for label, text in zip(pieces[1::2], pieces[2::2])]
    loops = [text[:jump.end()] for text, jump in back if jump]
    hot = [text for text in loops if len(re.findall(r"vfmadd\w*ps", text)) >= 8]
    assert hot
    for text in hot:
        stores = re.findall(r"vmov\w*ps\s+%[xyz]mm\d+,\s*[^%\n]*\(", text)
        assert not stores, stores


def test_weights_pack_at_compile_time_for_another_cpu():
    """Compiling for a CPU this host may not be (AVX-512 code on an AVX2 host): the packing runs
    here, so it is built for plain x86-64, not for the target (whose code would fault here)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(7).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 64])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _compile_packed(model, mcpu="skylake-avx512")


@pytest.mark.parametrize("keepdims", [True, False])
def test_row_reductions_sum_in_vector_lanes(x86_spec, keepdims):
    """A reduction along contiguous memory (LayerNorm's float64 sums, ReduceMean/Max over the last
    axis) runs as `lanes` vector partial results per row (rfactor), not one serial chain; the
    LayerNorm's second sum, which also reads the mean, is a row reduction too, not a matmul
    (keepdims' [rows, 1]). Results against float64 NumPy (LayerNorm within 2e-6); a sum whose row
    length the lanes do not divide (100) stays serial; ONNX's max from -inf (`ops.reduction`:
    TVM's integer max over order-preserving keys, which rfactor knows) in lanes too, with a NaN
    anywhere in a row giving NaN; all exact."""
    from tvmsoftmax.ops.normalization import layer_norm
    from tvmsoftmax.ops.reduction import reduce_max

    lanes = x86_spec.vector_lanes
    rng = np.random.default_rng(5)
    x_np = (rng.standard_normal((64, 768)) * 3 + 100).astype(np.float32)
    x = te.placeholder((64, 768), "float32", name="x")
    g, b = te.placeholder((768,), "float32", name="g"), te.placeholder((768,), "float32", name="b")
    norm = schedule_generic(te.create_prim_func([x, g, b, layer_norm(x, g, b, [-1], 1e-5, True, True)]), lanes)
    script = norm.script()
    assert script.count("T.vectorized(%d)" % lanes) >= 3  # both sums' partial results and the output
    assert "sum_rf" in script and "squares_rf" in script
    ones, zeros = np.ones(768, np.float32), np.zeros(768, np.float32)
    executable = tvm.compile(tvm.IRModule({"main": norm}), x86_spec.tvm_target())
    out = tvm.runtime.empty((64, 768), "float32", tvm.cpu())
    executable["main"](*(tvm.runtime.tensor(a) for a in (x_np, ones, zeros)), out)
    wide = x_np.astype(np.float64)
    centred = wide - wide.mean(-1, keepdims=True)
    want = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5)
    assert np.abs(out.numpy() - want).max() < 2e-6

    shape = (64, 1) if keepdims else (64,)
    for length in (768, 100):
        y_np = rng.integers(-8, 8, (64, length)).astype(np.float32)  # sums exact in any order
        y = te.placeholder((64, length), "float32", name="y")
        total = schedule_generic(te.create_prim_func([y, topi.sum(y, axis=-1, keepdims=keepdims)]), lanes)
        assert ("_rf" in total.script()) == (length % lanes == 0)
        np.testing.assert_array_equal(_build_and_run(total, x86_spec, [y_np], shape), y_np.sum(-1, keepdims=keepdims))
        top = schedule_generic(te.create_prim_func([y, reduce_max(y, [-1], keepdims)]), lanes)
        assert ("_rf" in top.script()) == (length % lanes == 0) and "T.max" in top.script()
        y_np[3, length // 2] = np.nan
        y_np[5, :] = -np.inf
        np.testing.assert_array_equal(_build_and_run(top, x86_spec, [y_np], shape), y_np.max(-1, keepdims=keepdims))


def test_column_panels_are_grouped_to_fit_l2_outside_the_row_tiles(x86_spec):
    """A matmul's column panels are visited in groups that fit `PANEL_GROUP_BYTES`, every row tile
    per group (the weights read from memory once per call), the group loop outermost and parallel
    with the row tiles; results stay exact (the same sums in the same order)."""
    from tvmsoftmax.schedules.generic import PANEL_GROUP_BYTES, panel_group, register_tile

    assert panel_group(24, 768 * 32 * 4) == 2  # [768, 3072] weights: 2 panels of 96 KiB
    assert panel_group(24, 3072 * 32 * 4) == 1  # a panel over PANEL_GROUP_BYTES: one at a time
    assert panel_group(7, 1024) == 7 and panel_group(7, PANEL_GROUP_BYTES // 2) == 1  # divisors only
    a = te.placeholder((40, 64), "float32", name="a")
    b = te.placeholder((64, 4096), "float32", name="b")
    c = topi.matmul(a, b)
    func = te.create_prim_func([a, b, c])
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    lanes = x86_spec.vector_lanes
    tile_rows, tile_vectors = register_tile(lanes, 4096 // lanes)
    panels = 4096 // (tile_vectors * lanes)
    groups = panels // panel_group(panels, 64 * tile_vectors * lanes * 4)
    assert groups > 1
    row_tiles = -(-40 // tile_rows)  # the last one predicated
    assert f"T.parallel({groups * row_tiles})" in scheduled.script()  # groups x row tiles, fused
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((40, 64)).astype(np.float32), rng.standard_normal((64, 4096)).astype(np.float32)
    got = _build_and_run(scheduled, x86_spec, [x, y], (40, 4096))
    np.testing.assert_array_equal(got, _build_and_run(func, x86_spec, [x, y], (40, 4096)))


@pytest.mark.parametrize("keepdims", [True, False])
def test_column_reductions_vectorise_over_the_output(x86_spec, keepdims):
    """ReduceSum / ReduceMean over axis 0 of [rows, columns]: the reduction loop outside the output's
    columns, which are vectorised (each column was a scalar chain of strided loads: 0.72 ms over
    [197, 3072] against onnxruntime's 0.09); each output's terms in the same order: the same bits
    as the unscheduled kernel, and NumPy's sum exactly on integer-valued data."""
    lanes = x86_spec.vector_lanes
    rng = np.random.default_rng(9)
    y_np = rng.integers(-8, 8, (197, 4 * lanes)).astype(np.float32)
    y = te.placeholder(y_np.shape, "float32", name="y")
    func = te.create_prim_func([y, topi.sum(y, axis=0, keepdims=keepdims)])
    scheduled = schedule_generic(func, lanes)
    script = scheduled.script()
    assert "T.vectorized" in script
    shape = (1, 4 * lanes) if keepdims else (4 * lanes,)
    got = _build_and_run(scheduled, x86_spec, [y_np], shape)
    np.testing.assert_array_equal(got, y_np.sum(0, keepdims=keepdims))
    z_np = rng.standard_normal((197, 4 * lanes)).astype(np.float32)
    np.testing.assert_array_equal(_build_and_run(scheduled, x86_spec, [z_np], shape),
                                  _build_and_run(func, x86_spec, [z_np], shape))


@pytest.mark.parametrize("shape,perm", [((37, 64), (1, 0)), ((2, 24, 5, 40), (0, 2, 3, 1)), ((20, 3, 18), (2, 1, 0))])
def test_transpositions_walk_square_tiles(x86_spec, shape, perm):
    """A Transpose whose input's contiguous axis becomes an outer one of the output is copied in
    `TRANSPOSE_TILE`-square tiles, that axis innermost (predicated where the tile does not divide:
    37, 5 x 40, 18, 20); a permutation that keeps the last axis in place keeps the plain rule. The
    copy is exact."""
    from tvmsoftmax.schedules.generic import TRANSPOSE_TILE

    x = te.placeholder(shape, "float32", name="x")
    func = te.create_prim_func([x, topi.transpose(x, perm)])
    scheduled = schedule_generic(func, x86_spec.vector_lanes)
    tiles = re.compile(rf"T\.grid\([^)]*\b{TRANSPOSE_TILE}, {TRANSPOSE_TILE}\)")  # two tile loops innermost
    assert tiles.search(scheduled.script())
    x_np = np.random.default_rng(10).standard_normal(shape).astype(np.float32)
    out_shape = tuple(shape[p] for p in perm)
    np.testing.assert_array_equal(_build_and_run(scheduled, x86_spec, [x_np], out_shape), x_np.transpose(perm))
    keeps_last = (1, 0, *range(2, len(shape))) if len(shape) > 2 else (0, 1)
    kept = te.create_prim_func([x, topi.transpose(x, keeps_last)])
    assert not tiles.search(schedule_generic(kept, x86_spec.vector_lanes).script())
