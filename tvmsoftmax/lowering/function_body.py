"""A node replaced by its ONNX function body (the definition the ONNX spec gives as plain ops).

Used where a node has no lowering of its own, or TVM 0.27's importer gets it wrong, but its schema
defines it as a function: ONNX `Attention` with what we do not fuse (``qk_matmul_output``, sliding
windows) becomes the spec's own MatMul/Softmax/... body, which TVM imports, with our Softmax
sites inside; the nodes `TVM_FALLS_SHORT` names and ONNX ops TVM does not know (`falls_short`)
likewise. The body is the one onnx builds for this node (context-dependent functions depend on the node's attributes and input types), for the
newest function version not above the model's opset.
"""

from __future__ import annotations

import copy

import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TypeProto


# op type -> which of its nodes TVM 0.27's ONNX importer computes wrongly (each has a body).
TVM_FALLS_SHORT = {
    # TVM computes Y only: its Mean and InvStdDev outputs are scalar placeholders.
    "LayerNormalization": lambda node: any(node.output[1:]),
    # TVM's converter fails (InternalError: dimension mismatch) unless the axis is the last.
    "RMSNormalization": lambda node: next((a.i for a in node.attribute if a.name == "axis"), -1) != -1,
}


from .control_flow import rename_free  # noqa: E402


class NoFunctionBody(Exception):
    """The node's schema has no function body for this opset (the message says why)."""


def expand(node: NodeProto, opset: int, input_types: list[TypeProto | None]) -> list[NodeProto]:
    """The nodes of `node`'s function body, wired to its inputs and outputs; internal values and
    node names are prefixed with the node's name so they cannot collide with the graph's."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError as err:
        raise NoFunctionBody(f"no schema for {node.op_type} at opset {opset}: {err}") from None
    attributes = {a.name: a for a in node.attribute}
    for name, spec in schema.attributes.items():  # the body refers to defaults by name too
        if name not in attributes and spec.default_value.name:
            attributes[name] = spec.default_value
    with_defaults = NodeProto()
    with_defaults.CopyFrom(node)
    del with_defaults.attribute[:]
    with_defaults.attribute.extend(attributes.values())
    function = _function(schema, opset, with_defaults, input_types)
    prefix = f"{node.name or node.op_type}/"
    rename = {"": ""}
    for formal, actual in zip(function.input, list(node.input) + [""] * len(function.input)):
        rename[formal] = actual
    for formal, actual in zip(function.output, list(node.output) + [""] * len(function.output)):
        rename[formal] = actual or prefix + formal
    # values the body makes are prefixed; any other name a body node reads is the graph's own (an
    # inlined subgraph attribute, e.g. FlexAttention's score_mod, may read the outer scope)
    internal = {o for inner in function.node for o in inner.output}
    nodes = []
    for index, inner in enumerate(function.node):
        new = NodeProto()
        new.CopyFrom(inner)
        new.name = f"{prefix}{inner.op_type}_{index}"
        del new.input[:], new.output[:], new.attribute[:]
        new.input.extend(rename.setdefault(i, prefix + i if i in internal else i) for i in inner.input)
        new.output.extend(rename.setdefault(o, prefix + o) for o in inner.output)
        for attribute in inner.attribute:
            if attribute.ref_attr_name:
                if attribute.ref_attr_name not in attributes:
                    continue  # an optional attribute the node does not set
                resolved = AttributeProto()
                resolved.CopyFrom(attributes[attribute.ref_attr_name])
                resolved.name = attribute.name
                new.attribute.append(resolved)
            else:
                new.attribute.append(attribute)
        for attribute in new.attribute:  # a subgraph (e.g. a Scan body) reads the body's values
            for graph in ([attribute.g] if attribute.type == AttributeProto.GRAPH else
                          list(attribute.graphs) if attribute.type == AttributeProto.GRAPHS else []):
                rename_free(graph, rename)
        nodes.append(new)
    return nodes


def _versions(schema, opset: int) -> tuple[list, list]:
    """(static, context-dependent) function versions of `schema` not above `opset`."""
    return ([v for v in schema.function_opset_versions if v <= opset],
            [v for v in schema.context_dependent_function_opset_versions if v <= opset])


def _function(schema, opset: int, node: NodeProto, input_types) -> FunctionProto:
    static, dependent = _versions(schema, opset)
    if not static and not dependent:
        raise NoFunctionBody(f"{node.op_type} has no function body at opset {opset}")
    function = FunctionProto()
    if dependent and (not static or max(dependent) >= max(static)):
        types = [(t or TypeProto()).SerializeToString() for t in input_types]
        body = schema.get_context_dependent_function_with_opset_version(max(dependent), node.SerializeToString(), types)
    else:
        body = schema.get_function_with_opset_version(max(static))
    function.ParseFromString(body)
    if not function.node:
        raise NoFunctionBody(f"onnx built no {node.op_type} body for this node")
    return function


def expand_nodes(model: onnx.ModelProto, names: set) -> onnx.ModelProto:
    """`model` (a copy) with the nodes named in `names` replaced by their ONNX function bodies
    (a node whose body cannot be built, e.g. one with subgraphs, is kept)."""
    from .frontend import default_opset, value_infos

    model = copy.deepcopy(model)
    infos = value_infos(model)
    opsets = _opsets(model, default_opset(model))
    nodes = []
    for node in model.graph.node:
        try:
            if node.name not in names:
                raise NoFunctionBody("not asked for")
            nodes.extend(expand(node, opsets.get(node.domain, opsets[""]),
                                [infos[i].type if i in infos else None for i in node.input]))
        except NoFunctionBody:  # kept: the importer refuses it, naming the node, if TVM cannot
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


# ONNX ops with a lowering of their own here (never replaced by their bodies up front).
OURS = {"Attention"}


def falls_short(model: onnx.ModelProto) -> set:
    """Names of the nodes to replace by their function bodies: those `TVM_FALLS_SHORT` names, and
    those of an ONNX op TVM's importer does not know at all but whose schema defines a body at
    the model's opset (RotaryEmbedding, SoftmaxCrossEntropyLoss, CenterCropPad, ...)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    from .frontend import default_opset

    known = set(onnx_frontend._get_convert_map())
    opsets = _opsets(model, default_opset(model))
    out = set()
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            if node.op_type in OURS:
                continue
            if TVM_FALLS_SHORT.get(node.op_type, lambda _: False)(node) or (
                    node.op_type not in known and _has_body(node.op_type, opsets[""], "")):
                out.add(node.name)
        elif node.domain in BODY_DOMAINS and _has_body(node.op_type, opsets.get(node.domain, 1), node.domain):
            out.add(node.name)
    return out


# Other ONNX domains whose ops are expanded to their bodies (TVM knows none of them): the preview
# domain's FlexAttention (score_mod/prob_mod subgraphs inlined into its body by onnx).
BODY_DOMAINS = ("ai.onnx.preview",)


def _opsets(model: onnx.ModelProto, default: int) -> dict:
    """Opset version per domain ("" is the default domain's)."""
    versions = {o.domain: o.version for o in model.opset_import}
    versions[""] = versions["ai.onnx"] = default
    return versions


def _has_body(op_type: str, opset: int, domain: str = "") -> bool:
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return False
    return any(_versions(schema, opset))
