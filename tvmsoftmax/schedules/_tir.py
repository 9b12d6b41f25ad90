"""Small TIR helpers shared by the schedule rules."""

from __future__ import annotations

from tvm import s_tir, tirx


# PrimFunc attribute set by a CPU schedule: its block buffers (scores tiles, running states) may be
# stack arrays instead of TVM workspace allocations; `lowering.pipeline.TIR_PIPELINE` honours it.
STACK_SCRATCH_ATTR = "tvmsoftmax.stack_scratch"


def static_extent(expr) -> int | None:
    """The value of a constant extent or dim; None when it is symbolic."""
    return int(expr) if isinstance(expr, (int, tirx.IntImm)) else None


def reduce_loop_index(sch: s_tir.Schedule, block, loops) -> int:
    """Index in `loops` (the innermost loops of `block`, directly around it) of the one that
    drives the block's reduction axis: a block's axes need not be in its loops' order."""
    realize = sch.get(loops[-1]).body
    used = []
    for iv, value in zip(realize.block.iter_vars, realize.iter_values):
        if iv.iter_type == tirx.IterVar.CommReduce:
            used += tirx.analysis.undefined_vars(value, [])
    (index,) = [i for i, loop in enumerate(loops) if any(sch.get(loop).loop_var.same_as(v) for v in used)]
    return index


def named_root_blocks(sch: s_tir.Schedule) -> list[tuple[str, object]]:
    """(name, block) of the blocks directly under the root block, in program order."""
    root = sch.get_sblock("root")
    return [(sch.get(b).name_hint, b) for b in sch.get_child_blocks(root)]


def all_blocks(sch: s_tir.Schedule) -> dict:
    """name -> block for every block of the function (the names of our compute are unique)."""
    out = {}

    def visit(block):
        out[sch.get(block).name_hint] = block
        for child in sch.get_child_blocks(block):
            visit(child)

    visit(sch.get_sblock("root"))
    return out


def inline_output_view(func):
    """`func` with the block named `ops.softmax.OUTPUT_VIEW` (the result in the input's shape)
    inlined into the block that computes the result; unchanged if there is none."""
    from ..ops.softmax import OUTPUT_VIEW

    sch = s_tir.Schedule(func)
    if OUTPUT_VIEW not in [name for name, _ in named_root_blocks(sch)]:
        return func
    sch.reverse_compute_inline(sch.get_sblock(OUTPUT_VIEW))
    return sch.mod["main"]
