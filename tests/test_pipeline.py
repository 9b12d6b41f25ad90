"""Our Relax passes around TVM's pipeline (`tvmsoftmax.lowering.pipeline`)."""

import numpy as np
import tvm
from tvm import relax, tirx

from tvmsoftmax.lowering.pipeline import symbols_defined_before_use


def _module_with_length_from_data():
    """main(x: int64 [1]) -> zeros [x[0]]: a run-time length becomes symbolic dim n by match_cast."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1], "int64"))
    n = tirx.Var("n", "int64")
    with bb.function("main", [x]):
        with bb.dataflow():
            shape = bb.emit(relax.op.tensor_to_shape(x))
            bb.match_cast(shape, relax.ShapeType([n]))
            zeros = bb.emit(relax.op.zeros(relax.ShapeExpr([n]), "float32"))
            out = bb.emit_output(relax.op.add(zeros, relax.const(1.0, "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _names(mod):
    return [b.var.name for b in mod["main"].body.blocks[0].bindings]


def test_symbol_definition_moves_before_its_use():
    """The order TVM 0.27's FuseOps can leave (apache/tvm#20195): a binding whose shape uses n
    before the match_cast that defines n. The pass restores definition-before-use and keeps
    every other binding where it was."""
    mod = _module_with_length_from_data()
    ordered = _names(mod)
    block = mod["main"].body.blocks[0]
    bindings = list(block.bindings)
    definer = next(i for i, b in enumerate(bindings) if isinstance(b, relax.MatchCast))
    user = definer + 1  # the zeros of shape [n]
    assert [v.name for v in relax.analysis.tir_vars_in_type(bindings[user].var.ty)] == ["n"]
    swapped = bindings[:]
    swapped.insert(definer, swapped.pop(user))  # the use first
    func = mod["main"]
    broken = tvm.IRModule({"main": relax.Function(
        func.params, relax.SeqExpr([relax.DataflowBlock(swapped)], func.body.body), func.ret_ty, func.is_pure, func.attrs)})
    assert _names(broken) != ordered
    fixed = symbols_defined_before_use(broken)
    assert _names(fixed) == ordered
    assert relax.analysis.check_well_formed(fixed)
    assert fixed["main"].body.ty is not None
    exe = tvm.compile(fixed, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(np.array([5], np.int64), tvm.cpu())).numpy()
    np.testing.assert_array_equal(got, np.ones(5, np.float32))


def test_ordered_block_is_left_as_it_is():
    mod = _module_with_length_from_data()
    assert symbols_defined_before_use(mod)["main"].same_as(mod["main"])
