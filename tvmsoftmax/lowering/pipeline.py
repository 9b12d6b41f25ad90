"""Relax -> executable: TVM's default per-target passes with our sites scheduled in between.

First `numerics.onnx_numerics` (float max/min reductions, half MatMul and LayerNormalization as
onnxruntime computes them), then, in order: library dispatch, LegalizeOps (the rest of the model
becomes TIR), op-pattern annotation and fusion (our PrimFuncs carry an opaque pattern, so they are
never fused into neighbours), `schedule_sites` (our schedule rules, by target), on CUDA dlight's
default GPU rules for every other kernel (they skip functions marked scheduled), on x86 the
generic rule with its weight packing folded at compile time, then TVM's dataflow lowering and
finalisation.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager

import tvm
from tvm import relax

from .._native import quiet_native_stderr
from ..errors import ModelError
from ..schedules import KNOB_TYPES, schedule_attention, schedule_softmax
from ..schedules._tir import STACK_SCRATCH_ATTR
from ..schedules.generic import PACKED_ATTR
from .attention_import import ATTENTION_ATTR
from .importer import KNOBS_ATTR, SITE_ATTR
from .numerics import onnx_numerics
from .targets import TargetSpec


def _map_primfuncs(name: str, select, schedule) -> tvm.transform.Pass:
    """Module pass: replace every PrimFunc for which select(func) holds by schedule(func)."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {
            gvar: schedule(func)
            for gvar, func in mod.functions_items()
            if isinstance(func, tvm.tirx.PrimFunc) and select(func)
        }
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass


def _has_attr(func, key: str) -> bool:
    return func.attrs is not None and key in func.attrs


def schedule_sites(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: apply our schedule rule to every PrimFunc that carries a site attribute."""
    cuda = spec.name == "cuda"
    knob_type = KNOB_TYPES["CudaSoftmaxKnobs" if cuda else "X86SoftmaxKnobs"]
    attention_knob_type = KNOB_TYPES["CudaAttentionKnobs" if cuda else "X86AttentionKnobs"]

    def schedule(func):
        knobs = json.loads(str(func.attrs[KNOBS_ATTR]))
        if _has_attr(func, ATTENTION_ATTR):
            kind = str(func.attrs[ATTENTION_ATTR])
            return schedule_attention(func, spec, kind, attention_knob_type(**knobs))
        return schedule_softmax(func, spec, knob_type(**knobs))

    return _map_primfuncs("tvmsoftmax.ScheduleSites", lambda f: _has_attr(f, SITE_ATTR), schedule)


def schedule_rest_x86(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: the generic x86 baseline rule for every PrimFunc nobody scheduled."""
    from ..schedules.generic import schedule_generic

    return _map_primfuncs(
        "tvmsoftmax.ScheduleRestX86",
        lambda f: not _has_attr(f, "tirx.is_scheduled"),
        lambda f: schedule_generic(f, spec.vector_lanes),
    )


@tvm.transform.module_pass(opt_level=0, name="tvmsoftmax.AttachLayoutFreeConstants")
def attach_layout_free_constants(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``layout_free_buffers`` (the parameters the generic rule may re-lay out) on each PrimFunc
    that every call passes a constant at some parameter: those indices. TVM's own
    AttachAttrLayoutFreeBuffers rebuilds every PrimFunc it visits, and a symbolic dim that only a
    buffer layout used came out undefined ("variables (present_length_0,) are used, but are not
    passed in as API arguments"); `with_attr` leaves the function as it is."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    constant_args: dict = {}  # PrimFunc GlobalVar -> parameter indices constant at every call so far

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir) and isinstance(expr.args[0], tvm.ir.GlobalVar) \
                and isinstance(expr.args[1], relax.Tuple):
            here = {i for i, a in enumerate(expr.args[1].fields) if isinstance(a, tvm.ir.expr.Constant)}
            gvar = expr.args[0]
            constant_args[gvar] = here if gvar not in constant_args else constant_args[gvar] & here

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    for gvar, indices in constant_args.items():
        func = mod[gvar]
        if indices and isinstance(func, tvm.tirx.PrimFunc) and not _has_attr(func, "layout_free_buffers"):
            mod[gvar] = func.with_attr("layout_free_buffers", sorted(indices))
    return mod


@tvm.transform.module_pass(opt_level=0, name="tvmsoftmax.SplitWeightPrepacks")
def split_weight_prepacks(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """TVM's SplitLayoutRewritePreproc on the functions the generic rule packed (`PACKED_ATTR`):
    each becomes a re-layout function of its weights and a compute function on the packed ones,
    and its calls a call of each. The pass visits every PrimFunc and stops at any whose root holds
    a statement without a block (our site kernels), so it gets a module of the Relax functions
    and the packed PrimFuncs only; the other PrimFuncs are put back unchanged."""
    packed = {gvar for gvar, func in mod.functions_items()
              if isinstance(func, tvm.tirx.PrimFunc) and _has_attr(func, PACKED_ATTR)}
    if not packed:
        return mod
    others = {gvar: func for gvar, func in mod.functions_items()
              if isinstance(func, tvm.tirx.PrimFunc) and gvar not in packed}
    subset = tvm.IRModule({gvar: func for gvar, func in mod.functions_items() if gvar not in others},
                          attrs=mod.attrs)
    result = relax.transform.SplitLayoutRewritePreproc()(subset)
    for gvar, func in others.items():
        result[gvar] = func
    return result


PREPACK_SUFFIX = "_weight_prepack"  # SplitLayoutRewritePreproc's name for a re-layout function


@tvm.transform.module_pass(opt_level=0, name="tvmsoftmax.FoldWeightPrepacks")
def fold_weight_prepacks(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Every call of a weight re-layout function (`PREPACK_SUFFIX`, made by
    SplitLayoutRewritePreproc from the generic rule's packing blocks) on constants is run now, at
    compile time, and replaced by its result; the artifact then holds the packed weights, not the
    originals. Only those calls: TVM's FoldConstant would fold any constant computation, however
    large its result (a materialised mask, an expanded table)."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    built: dict = {}

    def folded(call):
        if not (isinstance(call, relax.Call) and call.op.same_as(call_tir)
                and isinstance(call.args[0], tvm.ir.GlobalVar)
                and call.args[0].name_hint.endswith(PREPACK_SUFFIX)
                and isinstance(call.args[1], relax.Tuple)
                and all(isinstance(a, tvm.ir.expr.Constant) for a in call.args[1].fields)):
            return None
        name = call.args[0].name_hint
        if name not in built:
            func = mod[call.args[0]].with_attr("global_symbol", "main")
            # Run here, on the compiling host: plain x86-64 code, whatever CPU the model is
            # compiled for (an AVX-512 target's copy loop would fault on an AVX2 host).
            host = tvm.target.Target({"kind": "llvm"})
            built[name] = tvm.compile(tvm.IRModule({"main": func.with_attr("target", host)}), target=host)
        out_type = call.ty
        device = tvm.cpu()
        inputs = [tvm.runtime.tensor(a.value.numpy(), device) for a in call.args[1].fields]
        output = tvm.runtime.empty([int(d) for d in out_type.shape], out_type.dtype, device)
        built[name]["main"](*inputs, output)
        return relax.const(output.numpy(), out_type.dtype)

    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        changed, blocks = False, []
        for block in func.body.blocks:
            bindings = []
            for binding in block.bindings:
                value = folded(binding.value) if isinstance(binding, relax.VarBinding) else None
                if value is not None:
                    binding, changed = relax.VarBinding(binding.var, value), True
                bindings.append(binding)
            kind = relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else relax.BindingBlock
            blocks.append(kind(bindings, block.span))
        if changed:
            mod[gvar] = _with_blocks(func, blocks)
    return mod


def _with_blocks(func: relax.Function, blocks: list) -> relax.Function:
    """`func` with its body's binding blocks replaced by `blocks` (same result expression), normalised."""
    body = relax.SeqExpr(blocks, func.body.body, func.body.span)
    return relax.BlockBuilder().normalize(
        relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span))


def _passes(spec: TargetSpec) -> list:
    if spec.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
        from tvm.s_tir import dlight as dl

        legalize = backend.legalize_passes(spec.tvm_target())
        # The last legalize pass is dlight's ApplyDefaultSchedule: our sites go first.
        fusion, rest_rules = legalize[:-1], [
            dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(), dl.gpu.Fallback(),
            )
        ]
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend

        # Constant weights of a matmul are re-laid out in panels by the generic rule (a block
        # marked for it); SplitLayoutRewritePreproc makes that block a call of its own and
        # fold_weight_prepacks runs it at compile time, so the artifact holds the packed weights.
        fusion, rest_rules = backend.legalize_passes(spec.tvm_target()), [
            attach_layout_free_constants,
            schedule_rest_x86(spec),
            split_weight_prepacks,
            fold_weight_prepacks,
            relax.transform.DeadCodeElimination(),
        ]
    target = spec.tvm_target()
    return (
        backend.library_dispatch_passes(target)
        + fusion
        + [symbols_defined_before_use]
        # Reshapes (the 3-D views before our sites among them) become views of the same memory
        # here, before any schedule: TVM runs this pass after dlight/our generic rule, when a
        # scheduled reshape no longer matches and stays a copy kernel. Then the reshape kernels
        # nothing calls any more are dropped.
        + [relax.transform.RewriteDataflowReshape(), relax.transform.DeadCodeElimination()]
        + [schedule_sites(spec)]
        + rest_rules  # everything that is not a site: dlight on CUDA, the generic rule on x86
        + backend.dataflow_lower_passes(target)
        + backend.finalize_passes(target)
    )


@relax.transform.function_pass(opt_level=0, name="tvmsoftmax.SymbolsDefinedBeforeUse")
class _SymbolsDefinedBeforeUse:
    """Every binding after the `match_cast` that defines a symbolic dim it uses: TVM 0.27's FuseOps
    orders a dataflow block by its data dependences only, and a kernel whose output shape is a
    run-time value (GroupQueryAttention's present length; ONNX Size/Slice/Reshape chains) could
    land before the match_cast that reads that value ("PrimExpr ... has not been computed" at
    build: apache/tvm#20195, fixed upstream by #20333, not in 0.27). A stable topological sort of
    each block by data and symbol dependences; a block in order is left as it is."""

    def transform_function(self, func, _mod, _ctx):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            return func
        blocks = [self._sorted(block) if isinstance(block, relax.DataflowBlock) else block
                  for block in func.body.blocks]
        if all(new.same_as(old) for new, old in zip(blocks, func.body.blocks)):
            return func
        return _with_blocks(func, blocks)

    @staticmethod
    def _sorted(block):
        bindings = list(block.bindings)
        producer, definer = {}, {}
        for index, binding in enumerate(bindings):
            producer[binding.var] = index
            if isinstance(binding, relax.MatchCast):
                for var in relax.analysis.definable_tir_vars_in_type(binding.ty):
                    definer.setdefault(var, index)
        if not definer:
            return block
        needs = []
        for index, binding in enumerate(bindings):
            used = set(relax.analysis.tir_vars_in_type(binding.var.ty))
            if isinstance(binding.value, relax.Call):
                for arg in binding.value.args:
                    if isinstance(arg, relax.ShapeExpr):
                        used |= {v for value in arg.values for v in tvm.tirx.analysis.undefined_vars(value)}
                    elif tvm.ir.is_prim_expr(arg):  # a prim value (TVM 0.27 keeps it a PrimExpr)
                        used |= set(tvm.tirx.analysis.undefined_vars(arg))
            deps = {producer[v] for v in relax.analysis.free_vars(binding.value) if v in producer}
            deps |= {definer[v] for v in used if v in definer and definer[v] != index}
            needs.append(sorted(deps))
        if all(d < index for index, deps in enumerate(needs) for d in deps):
            return block
        order, state = [], [0] * len(bindings)  # 0: not placed, 1: its dependences pending, 2: placed
        for start in range(len(bindings)):
            stack = [start]
            while stack:  # depth-first, iteratively (a block may hold thousands of bindings)
                index = stack[-1]
                if state[index] == 2:
                    stack.pop()
                    continue
                pending = [d for d in needs[index] if state[d] != 2]
                if not pending:
                    state[index] = 2
                    order.append(index)
                    stack.pop()
                    continue
                if state[index] == 1:  # back after its dependences, and one is still not placed
                    raise ModelError("a cycle of symbolic shape definitions in the Relax program")
                state[index] = 1
                stack.extend(reversed(pending))
        return relax.DataflowBlock([bindings[i] for i in order], block.span)


symbols_defined_before_use = _SymbolsDefinedBeforeUse()


STACK_ARRAY_BYTES = 32 << 10  # one buffer at most (TVM itself keeps those under 1 KiB on the stack)
STACK_FUNCTION_BYTES = 128 << 10  # all of one function's (worker threads have 8 MiB stacks)


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="tvmsoftmax.StackScratch")
def stack_scratch(func, _mod, _ctx):
    """Block buffers of CPU functions marked `STACK_SCRATCH_ATTR` become stack arrays (LLVM
    allocas in the entry of the parallel task's function) instead of TVMBackendAllocWorkspace
    calls: the flash kernel allocated 7 per query block, 2.5% of its time at (1,12,128,64).
    Runs before LowerTVMBuiltin, which leaves buffers annotated ``disable_lower_builtin`` alone.
    Only fixed-size buffers in global or local scope (register blocks of 1 KiB, which TVM's own
    rule misses by a byte), each and all together bounded as above."""
    import tvm_ffi

    target = func.attrs.get("target") if func.attrs is not None else None
    if not _has_attr(func, STACK_SCRATCH_ATTR) or target is None or target.kind.name != "llvm":
        return func
    budget = [STACK_FUNCTION_BYTES]

    def to_stack(alloc):
        buffer = alloc.buffer
        if buffer.scope() not in ("global", "local") or not all(isinstance(d, tvm.tirx.IntImm) for d in buffer.shape):
            return alloc
        dtype = tvm.DataType(buffer.dtype)
        nbytes = dtype.bits // 8 * dtype.lanes  # vector-typed buffers: their elements are vectors
        for dim in buffer.shape:
            nbytes *= int(dim)
        if nbytes > STACK_ARRAY_BYTES or nbytes > budget[0]:
            return alloc
        budget[0] -= nbytes
        annotations = {**alloc.annotations, "disable_lower_builtin": tvm.tirx.IntImm("bool", 1)}
        return tvm.tirx.AllocBuffer(buffer, annotations)

    return func.with_body(tvm_ffi.structural_map(func.body, (tvm.tirx.AllocBuffer, to_stack)))


def _tir_pipeline():
    """TVM's default TIR pipeline (s_tir) with `stack_scratch` before the host finalisation."""
    from tvm.tirx import compilation_pipeline

    passes, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("s_tir")
    return passes, (lambda: tvm.transform.Sequential([stack_scratch, finalize_host()])), finalize_device


TIR_PIPELINE = "tvmsoftmax"
tvm.tirx.compilation_pipeline.PIPELINE_MAP[TIR_PIPELINE] = _tir_pipeline


def build(mod: tvm.IRModule, spec: TargetSpec) -> tvm.runtime.Executable:
    """Compile a Relax module (with site PrimFuncs) for `spec`."""
    target = spec.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name="tvmsoftmax.Pipeline")
    def pipeline(module: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(_passes(spec))(module)

    if spec.name == "cuda":
        from .device_code import install_fatbins

        install_fatbins({})  # a CUDA-enabled TVM compiles kernels at build: with our nvcc flags
    mod = onnx_numerics(relax.transform.DecomposeOpsForInference()(mod))
    with quiet_native_stderr(), vector_math():
        return tvm.compile(mod, target=target, relax_pipeline=pipeline, tir_pipeline=TIR_PIPELINE)


_BUILDING = threading.local()
_TVM_RULES: dict = {}


def _vector_rule(op_name: str):
    """LLVM lowering of `op_name` while `vector_math` is active: float32 (scalar or vector) becomes
    plain arithmetic that stays in vector registers (`ops.exp`), instead of ``llvm.exp`` /
    ``llvm.tanh``, which LLVM turns into one glibc call per lane (TVM's Sigmoid lowers to exp
    too: an unrolled LSTM spent 20% of its time in expf; erf, GELU's, half of a BERT's MLP kernel).
    tanh also gains relative accuracy near 0 (TVM's, from exponentials, was 1% off at 1e-6). Other
    dtypes, and builds not ours, keep TVM's rule."""
    from ..ops.exp import _dtype, fast_erf, fast_exp, fast_tanh

    ours = {"tirx.exp": fast_exp, "tirx.tanh": fast_tanh, "tirx.erf": fast_erf}[op_name]

    def lower(call):
        if getattr(_BUILDING, "active", False) and _dtype(call).split("x")[0] == "float32":
            return ours(call.args[0])
        rule = _TVM_RULES[op_name]  # None for erf: TVM lowers it by its default (extern call) rule
        return rule(call) if rule is not None else call

    return lower


@contextmanager
def vector_math():
    """Our exp, tanh and erf lowerings for the LLVM builds inside this context (this thread only). The
    rules are registered once, above TVM's, and defer to TVM's outside the context."""
    for op_name in ("tirx.exp", "tirx.tanh", "tirx.erf"):
        if op_name not in _TVM_RULES:
            _TVM_RULES[op_name] = tvm.ir.Op.get(op_name).get_attr("llvm.FLowerIntrinsic")
            tvm.tirx.op.register_intrin_lowering(op_name, "llvm", f=_vector_rule(op_name), level=99)
    previous = getattr(_BUILDING, "active", False)
    _BUILDING.active = True
    try:
        yield
    finally:
        _BUILDING.active = previous
