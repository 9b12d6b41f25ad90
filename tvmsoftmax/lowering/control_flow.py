"""ONNX Scan and Loop unrolled into plain ONNX ops (TVM 0.27's importer has neither).

Each iteration's body is inlined with its values renamed (``<node>/<iteration>/<name>``); values
the body reads from the enclosing graph keep their names, in nested subgraphs too.

* ``Scan`` (opset 9 on): the sequence length is the static dim of the scan inputs along their
  ``scan_input_axes``; iteration t reads slice t (``T - 1 - t`` for a reverse input) of each scan
  input, the states carry over, and each scan output stacks its per-iteration values along its
  ``scan_output_axes`` (in reverse order for a reverse output).
* ``Loop``: unrolled when it runs a known number of iterations: the trip count is a constant (an
  initializer, a Constant, or a graph input compiled per value, `frontend.VALUE_INPUTS`), the
  condition is absent or constant, and the body's ``cond_out`` is its ``cond_in`` (directly or
  through an Identity) or a constant true; a false condition runs no iteration. Scan outputs stack
  along a new first axis.

Scan / Loop nodes inside an unrolled body are unrolled in turn. Anything else (opset-8 Scan with
its batch axis, a symbolic sequence length, a data-dependent exit, more than `MAX_ITERATIONS`
iterations or `MAX_NODES` unrolled nodes) is left as it is, and the importer refuses the node by
name.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, helper, numpy_helper

from .frontend import node_reads, subgraphs

MAX_ITERATIONS = 1024  # unrolled bodies per node: beyond this the model would be too large
MAX_NODES = 100_000  # iterations x body nodes per node, likewise


class CannotUnroll(Exception):
    """The node's iteration count is not known at compile time (the message says why)."""


def unroll_control_flow(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (a copy) with every Scan / Loop of its main graph that can be unrolled replaced by
    its iterations, nested ones (inside an unrolled body) too (the model itself when there is
    none)."""
    for _ in range(4):  # each pass unrolls one level of nesting
        unrolled = _unroll_once(model)
        if unrolled is model:
            break
        model = unrolled
    return model


def all_defined(model: onnx.ModelProto) -> bool:
    """Whether every value the main graph's nodes read is defined in it (an unrolled body whose
    outer values an optimizer dropped is not)."""
    graph = model.graph
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output}
    return all(i in defined for n in graph.node for i in node_reads(n))


def _unroll_once(model: onnx.ModelProto) -> onnx.ModelProto:
    from .frontend import default_opset, value_infos

    if not any(n.op_type in ("Scan", "Loop") and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    if default_opset(model) < 9 and any(n.op_type == "Scan" for n in model.graph.node):
        return model  # opset-8 Scan has a batch axis and sequence_lens: not unrolled
    model = onnx.ModelProto.FromString(model.SerializeToString())
    try:  # the sequence lengths of Scan inputs
        infos = value_infos(onnx.shape_inference.infer_shapes(model, data_prop=True))
    except Exception:  # noqa: BLE001 - without shapes only what is declared is known
        infos = value_infos(model)
    constants = _constants(model.graph)
    opset = default_opset(model)
    nodes, changed = [], False
    for node in model.graph.node:
        try:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Scan", "Loop"):
                raise CannotUnroll("not a Scan or Loop")
            unroll = _unroll_scan if node.op_type == "Scan" else _unroll_loop
            nodes.extend(unroll(node, infos, constants, opset))
            changed = True
        except CannotUnroll:
            nodes.append(node)
    if not changed:
        return model
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _constants(graph: GraphProto) -> dict:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _attribute(node: NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


class _Builder:
    """New nodes with fresh names under `prefix`, in the model's opset."""

    def __init__(self, prefix: str, opset: int):
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[NodeProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def add(self, op: str, inputs: list, output: str | None = None, **attrs) -> str:
        output = output or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.fresh(op), **attrs))
        return output

    def constant(self, value) -> str:
        return self.add("Constant", [], value=numpy_helper.from_array(np.asarray(value)))


def inline(body: GraphProto, bindings: dict, prefix: str) -> tuple[list[NodeProto], list[str]]:
    """The nodes of `body` with its inputs bound to the names in `bindings` (body input name ->
    value name) and its own values renamed under `prefix`; returns (nodes, the names of its
    outputs). Values the body reads from outside it keep their names."""
    rename = dict(bindings)
    nodes = []
    for tensor in body.initializer:
        name = prefix + tensor.name
        rename[tensor.name] = name
        nodes.append(helper.make_node("Constant", [], [name], name=name + "/const", value=tensor))
    for index, node in enumerate(body.node):
        new = NodeProto()
        new.CopyFrom(node)
        new.name = f"{prefix}{node.name or node.op_type}_{index}"
        del new.input[:], new.output[:]
        new.input.extend(rename.get(i, i) if i else "" for i in node.input)
        for output in node.output:
            rename[output] = prefix + output if output else ""
        new.output.extend(rename[o] for o in node.output)
        for graph in subgraphs(new):
            rename_free(graph, rename)
        nodes.append(new)
    return nodes, [rename.get(o.name, o.name) for o in body.output]


def rename_free(graph: GraphProto, rename: dict) -> None:
    """Rename, in place, the values `graph` (a subgraph) reads from enclosing scopes (those it
    does not define itself), in its nested subgraphs too."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name and name not in defined and name in rename:
                node.input[position] = rename[name]
        for nested in subgraphs(node):
            rename_free(nested, {k: v for k, v in rename.items() if k not in defined})
        defined.update(o for o in node.output if o)
    for output in graph.output:
        if output.name not in defined and output.name in rename:
            output.name = rename[output.name]


def _rank(info) -> int | None:
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return len(info.type.tensor_type.shape.dim)


def _stack(build: _Builder, values: list[str], axis: int, output: str) -> None:
    if build.opset >= 13:
        axes = build.constant(np.array([axis], np.int64))
        expanded = [build.add("Unsqueeze", [v, axes]) for v in values]
    else:  # axes an attribute before opset 13
        expanded = [build.add("Unsqueeze", [v], axes=[axis]) for v in values]
    build.add("Concat", expanded, output, axis=axis)


def _unroll_scan(node: NodeProto, infos: dict, constants: dict, opset: int) -> list[NodeProto]:
    from .frontend import dims_of

    body = _attribute(node, "body")
    scans = int(_attribute(node, "num_scan_inputs"))
    states = len(node.input) - scans
    outputs = len(body.output) - states
    in_dirs = list(_attribute(node, "scan_input_directions", [0] * scans))
    out_dirs = list(_attribute(node, "scan_output_directions", [0] * outputs))
    in_axes = list(_attribute(node, "scan_input_axes", [0] * scans))
    out_axes = list(_attribute(node, "scan_output_axes", [0] * outputs))
    lengths = set()
    for j, name in enumerate(node.input[states:]):
        dims = dims_of(infos[name]) if name in infos else None
        if dims is None or not isinstance(dims[in_axes[j] % len(dims)], int):
            raise CannotUnroll(f"scan input {name!r}: sequence length unknown")
        in_axes[j] %= len(dims)
        lengths.add(dims[in_axes[j]])
    if len(lengths) != 1 or not 0 < next(iter(lengths)) <= MAX_ITERATIONS:
        raise CannotUnroll(f"scan lengths {sorted(lengths)}")
    length = lengths.pop()
    if length * len(body.node) > MAX_NODES:
        raise CannotUnroll(f"{length} iterations of {len(body.node)} nodes")
    build = _Builder(f"{node.name or 'Scan'}/", opset)
    current = list(node.input[:states])
    per_step: list[list[str]] = [[] for _ in range(outputs)]
    for t in range(length):
        bindings = {body.input[i].name: current[i] for i in range(states)}
        for j, name in enumerate(node.input[states:]):
            index = build.constant(np.array(t if in_dirs[j] == 0 else length - 1 - t, np.int64))
            bindings[body.input[states + j].name] = build.add("Gather", [name, index], axis=in_axes[j])
        inlined, results = inline(body, bindings, f"{build.prefix}{t}/")
        build.nodes.extend(inlined)
        current = results[:states]
        for k in range(outputs):
            per_step[k].append(results[states + k])
    for i, name in enumerate(node.output[:states]):
        if name:
            build.add("Identity", [current[i]], name)
    for k, name in enumerate(node.output[states:states + outputs]):
        if not name:
            continue
        rank = _rank(body.output[states + k])
        if rank is None and out_axes[k] < 0:
            raise CannotUnroll(f"scan output {k}: rank unknown for axis {out_axes[k]}")
        axis = out_axes[k] % (rank + 1) if out_axes[k] < 0 else out_axes[k]
        _stack(build, per_step[k] if out_dirs[k] == 0 else per_step[k][::-1], axis, name)
    return build.nodes


def _passes_condition(body: GraphProto) -> bool:
    """Whether the body's cond_out is always true when its cond_in is (its cond_in, an Identity of
    it, or a constant true)."""
    cond_in, cond_out = body.input[1].name, body.output[0].name
    producers = {o: n for n in body.node for o in n.output}
    while True:
        if cond_out == cond_in:
            return True
        node = producers.get(cond_out)
        if node is None:
            return False
        if node.op_type == "Identity":
            cond_out = node.input[0]
            continue
        if node.op_type == "Constant":
            value = _attribute(node, "value")
            return value is not None and bool(numpy_helper.to_array(value).all())
        return False


def _unroll_loop(node: NodeProto, infos: dict, constants: dict, opset: int) -> list[NodeProto]:
    body = _attribute(node, "body")
    inputs = list(node.input) + [""] * (2 - len(node.input))
    trip, cond = inputs[0], inputs[1]
    if trip and trip not in constants:
        raise CannotUnroll("trip count not a constant")
    if cond and cond not in constants:
        raise CannotUnroll("condition not a constant")
    if not _passes_condition(body):
        raise CannotUnroll("the body's condition may turn false")
    if cond and not bool(np.asarray(constants[cond]).all()):
        iterations = 0
    elif trip:
        iterations = int(np.asarray(constants[trip]).reshape(()))
    else:
        raise CannotUnroll("no trip count and a condition that never turns false")
    if not 0 <= iterations <= MAX_ITERATIONS or iterations * len(body.node) > MAX_NODES:
        raise CannotUnroll(f"{iterations} iterations of {len(body.node)} nodes")
    carried = len(node.input) - 2
    scans = len(body.output) - 1 - carried
    if iterations == 0 and scans:
        raise CannotUnroll("no iteration: the scan outputs' shapes are unknown")
    build = _Builder(f"{node.name or 'Loop'}/", opset)
    current = list(node.input[2:])
    true = build.constant(np.array(True))
    per_step: list[list[str]] = [[] for _ in range(scans)]
    for t in range(iterations):
        bindings = {body.input[0].name: build.constant(np.array(t, np.int64)), body.input[1].name: true}
        bindings.update({body.input[2 + i].name: current[i] for i in range(carried)})
        inlined, results = inline(body, bindings, f"{build.prefix}{t}/")
        build.nodes.extend(inlined)
        current = results[1:1 + carried]
        for k in range(scans):
            per_step[k].append(results[1 + carried + k])
    for i, name in enumerate(node.output[:carried]):
        if name:
            build.add("Identity", [current[i]], name)
    for k, name in enumerate(node.output[carried:carried + scans]):
        if name:
            _stack(build, per_step[k], 0, name)
    return build.nodes
