"""ONNX in: load, validate, bind input shapes, normalise exported graphs for TVM's importer.

Real torch exports (BERT, GPT-2, Llama) compute sizes at run time with Shape/Gather/Concat/
Range/Expand/Where subgraphs that TVM 0.27's `from_onnx` cannot import (`broadcast_to ... ndim`,
`Reshape expects ... known shape`, `'NoneType' object is not iterable` on Expand). `normalize`
binds the shapes the user gives, runs ONNX shape inference with data propagation, and folds
constant subgraphs (shape computations included) with onnxscript's optimizer, so those graphs
become static where the shapes are bound and keep symbolic dims where they are not.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import heapq
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import InputError, ModelError

@dataclass
class LoadedModel:
    """A validated model and where it came from."""

    proto: onnx.ModelProto
    source: str  # path or "<ModelProto>"
    sha256: str  # of the serialized source model


def _import_used_domains(proto: onnx.ModelProto) -> None:
    """Add version 1 of each domain the graph's nodes use without importing it, as onnxruntime
    assumes (its transformer optimizer's `optimize_model(..., opt_level=0).model` has
    com.microsoft nodes and no com.microsoft import; ONNX's checker refused it)."""
    imported = {o.domain for o in proto.opset_import}
    used = {n.domain for n in proto.graph.node} - {"", "ai.onnx"} - imported
    for domain in sorted(used):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def load_model(model) -> LoadedModel:
    """Read and validate an ONNX model (path, bytes or ModelProto); raise ModelError if unusable."""
    if isinstance(model, onnx.ModelProto):
        proto = copy.deepcopy(model)
        source = "<ModelProto>"
        raw = proto.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        raw = bytes(model)
        source = "<bytes>"
        proto = _parse(raw, source)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        source = str(path)
        if not path.is_file():
            raise ModelError(f"{source}: no such model file")
        raw = path.read_bytes()
        proto = _parse(raw, source)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            try:
                onnx.load_external_data_for_model(proto, str(path.parent))
            except (OSError, ValueError) as err:
                raise ModelError(f"{source}: cannot read its external weights: {err}") from None
    else:
        raise ModelError(f"expected a path, bytes or onnx.ModelProto, got {type(model).__name__}")
    if not proto.graph.node:
        raise ModelError(f"{source}: the graph has no nodes")
    _import_used_domains(proto)
    try:
        onnx.checker.check_model(_as_checkable(_topologically_sorted(proto)))  # normalize sorts it too
    except (onnx.checker.ValidationError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{source}: not a valid ONNX model: {first}") from None
    initialized = {t.name for t in proto.graph.initializer}
    for kind, values in (("input", [v for v in proto.graph.input if v.name not in initialized]),
                         ("output", proto.graph.output)):
        for value in values:
            which = value.type.WhichOneof("value")
            if which != "tensor_type" or value.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
                raise ModelError(
                    f"{source}: graph {kind} {value.name!r} has {which or 'no type'}, not a typed tensor: "
                    "compiled models take and return tensors"
                )
    _refuse_types_tvm_lacks(proto, source)
    _name_nodes(proto.graph)
    return LoadedModel(proto, source, hashlib.sha256(raw).hexdigest())


# Ops onnxruntime registers in the ONNX domain itself (contrib ops its transformer optimizer
# writes there): SimplifiedLayerNormalization (RMSNorm), and LayerNormalization into graphs of
# opsets before 17, where ONNX has none.
ORT_ONNX_DOMAIN_OPS = {"SimplifiedLayerNormalization", "LayerNormalization"}


def _as_checkable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model as ONNX's checker can accept it: onnxruntime's ONNX-domain contrib ops, which
    the checker finds unregistered, are checked as custom-domain ops (graph structure only), and
    graph outputs declared without a shape are left out of the check."""
    opset = default_opset(proto)
    nodes = [n for n in proto.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ORT_ONNX_DOMAIN_OPS
             and not (n.op_type == "LayerNormalization" and opset >= 17)]
    shapeless = [o for o in proto.graph.output if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")]
    if not nodes and not shapeless:
        return proto
    checkable = copy.deepcopy(proto)
    if nodes:
        for node in checkable.graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in ORT_ONNX_DOMAIN_OPS:
                node.domain = "tvmsoftmax.ort_onnx_domain"
        checkable.opset_import.append(helper.make_opsetid("tvmsoftmax.ort_onnx_domain", 1))
    if shapeless:
        # Graph outputs without a shape (onnxruntime runs them; ONNX's checker requires one): the
        # rest of the model is checked, the outputs get their shapes from inference later.
        kept = [o for o in checkable.graph.output if not (o.type.HasField("tensor_type")
                                                          and not o.type.tensor_type.HasField("shape"))]
        del checkable.graph.output[:]
        checkable.graph.output.extend(kept)
    return checkable


# Element types TVM 0.27 has no type for: it read them as its own float8 (other NaN encoding and
# exponent bias), so values came out silently wrong.
_TYPES_TVM_LACKS = {onnx.TensorProto.FLOAT8E4M3FNUZ: "float8e4m3fnuz", onnx.TensorProto.FLOAT8E5M2FNUZ: "float8e5m2fnuz"}


def _refuse_types_tvm_lacks(proto: onnx.ModelProto, source: str) -> None:
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        name = _TYPES_TVM_LACKS.get(value.type.tensor_type.elem_type)
        if name:
            raise ModelError(f"{source}: {value.name!r} is {name}, a type TVM does not have")
    for node in proto.graph.node:
        for attribute in node.attribute:
            if attribute.name in ("to", "output_dtype") and attribute.i in _TYPES_TVM_LACKS:
                raise ModelError(f"{source}: node {node.name or node.op_type!r} makes "
                                 f"{_TYPES_TVM_LACKS[attribute.i]}, a type TVM does not have")
    for tensor in proto.graph.initializer:
        if tensor.data_type in _TYPES_TVM_LACKS:
            raise ModelError(f"{source}: weight {tensor.name!r} is {_TYPES_TVM_LACKS[tensor.data_type]}, "
                             "a type TVM does not have")


def _parse(raw: bytes, source: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeWarning kinds
        raise ModelError(f"{source}: not an ONNX model (protobuf decode failed: {err})") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelError(f"{source}: not an ONNX model (no graph or opset; truncated file?)")
    return proto


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes stable names (Op_index) so errors and `inspect` can point at them."""
    used = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs a caller must feed (initializers listed as inputs are weights, not feeds)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def dims_of(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """Dims of a tensor value: ints, dim_param names, or '?' for an unnamed unknown dim."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    out: list[int | str] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            out.append(int(dim.dim_value))
        elif dim.dim_param:
            out.append(dim.dim_param)
        else:
            out.append("?")
    return out


def elem_dtype(value: onnx.ValueInfoProto) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name


def _inputs_named(model: onnx.ModelProto, names, what: str) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` to edit and its graph inputs by name, once every name is one of them."""
    inputs = {i.name: i for i in graph_inputs(model)}
    for name in names:
        if name not in inputs:
            raise InputError(f"{what.format(name)}, but the model's inputs are: {', '.join(inputs)}")
    model = copy.deepcopy(model)
    return model, {i.name: i for i in graph_inputs(model)}


def bind_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    """Fix the named inputs' dims (every other symbolic dim stays symbolic)."""
    if not shapes:
        return model
    model, inputs = _inputs_named(model, shapes, "--shape names input {!r}")
    for name, dims in shapes.items():
        value = inputs[name]
        current = dims_of(value)
        dims = [int(d) for d in dims]
        if current is not None and len(current) != len(dims):
            raise InputError(
                f"input {name!r} has rank {len(current)} ({current}), but the shape given is {dims}"
            )
        for index, size in enumerate(dims):
            if size < 0:
                raise InputError(f"input {name!r}: dim {index} must be >= 0, got {size}")
            if current is not None and isinstance(current[index], int) and current[index] != size:
                raise InputError(
                    f"input {name!r}: dim {index} is fixed to {current[index]} in the model, "
                    f"but the shape given is {dims}"
                )
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for size in dims:
            shape.dim.add().dim_value = size
    return model


def bind_constants(model: onnx.ModelProto, constants: dict | None) -> onnx.ModelProto:
    """Make the named graph inputs constants (initializers) with the given values: for inputs
    that TVM needs at compile time (reduction axes, TopK's k, Pad's pads, Resize's sizes, ...).
    A value must have the input's dtype (converted when numpy can do it without loss) and fit
    its declared dims."""
    if not constants:
        return model
    model, inputs = _inputs_named(model, constants, "a constant is given for {!r}")
    for name, value in constants.items():
        info = inputs[name]
        dtype = np.dtype(elem_dtype(info))
        array = np.asarray(value)
        if array.dtype != dtype:
            if array.size and not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise InputError(f"constant for input {name!r}: expected dtype {dtype}, got {array.dtype}")
            converted = array.astype(dtype)
            # integers must survive exactly (axes, counts); floats round to the input's precision
            if array.size and dtype.kind in "iub" and not np.array_equal(converted, array):
                raise InputError(f"constant for input {name!r}: {array.dtype} values do not fit {dtype}")
            array = converted
        dims = dims_of(info)
        if dims is not None and not dims and array.size == 1:
            array = array.reshape(())  # a scalar input given as one value
        if dims is not None and (len(dims) != array.ndim or any(
                isinstance(d, int) and d != n for d, n in zip(dims, array.shape))):
            raise InputError(f"constant for input {name!r}: expected shape {dims}, got {list(array.shape)}")
        model.graph.input.remove(info)
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return model


# Inputs of these ops (by position) that TVM 0.27's importer needs as constants: a graph input
# feeding one of them is a candidate for specialisation at run time (`compiler.compile_model`).
VALUE_INPUTS = {
    **{op: {1} for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                          "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "TopK",
                          "Split", "Upsample", "CumSum", "CumProd", "Squeeze", "Unsqueeze", "Tile",
                          "Expand", "Reshape", "Trilu", "CenterCropPad")},
    "Pad": {1, 2, 3}, "Resize": {1, 2, 3}, "Slice": {1, 2, 3, 4}, "NonMaxSuppression": {2, 3, 4},
    "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Dropout": {1, 2}, "OneHot": {1, 2},
    **{op: {0} for op in ("HannWindow", "HammingWindow", "BlackmanWindow")}, "AffineGrid": {1}, "Col2Im": {1, 2},
    "DFT": {1, 2}, "STFT": {1, 3}, "Loop": {0, 1},  # Loop: unrolled for a known trip count and condition
}


def value_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that some node reads where TVM's importer needs a constant (VALUE_INPUTS), then
    shape-like integer inputs (0-d, or 1-D of at most 8 elements: sizes, counts, lengths, shapes,
    which TVM needs as constants wherever they become a shape, e.g. through Cast, Range or Split
    in a function body)."""
    fed = {i.name for i in graph_inputs(model)}
    found: list[str] = []
    for node in model.graph.node:
        for index in sorted(VALUE_INPUTS.get(node.op_type, ())):
            if node.domain in ("", "ai.onnx") and index < len(node.input) and node.input[index] in fed \
                    and node.input[index] not in found:
                found.append(node.input[index])
    for value in graph_inputs(model):
        dims = dims_of(value)
        if value.name not in found and dims is not None and len(dims) <= 1 and all(
                isinstance(d, int) and d <= 8 for d in dims) and elem_dtype(value).startswith(("int", "uint")):
            found.append(value.name)
    return found


def subgraphs(node: onnx.NodeProto) -> list:
    """The graphs of a node's attributes (If's branches, Loop's and Scan's bodies)."""
    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attribute.graphs)
    return graphs


def node_reads(node: onnx.NodeProto) -> set:
    """Every value a node reads from its graph: its inputs, and the values its subgraphs (nested
    ones too) read from enclosing scopes without defining them. A value read only inside an If
    branch is as live as a node input: liveness, ordering and consumer tables need this set."""
    names = {name for name in node.input if name}
    for graph in subgraphs(node):
        defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        defined |= {o for n in graph.node for o in n.output if o}
        names |= {name for n in graph.node for name in node_reads(n) if name not in defined}
    return names


# Ops never folded: random ones, and those with subgraphs (the folder evaluates single nodes).
_NOT_FOLDED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan", "SequenceMap"}
FOLD_OUTPUT_LIMIT = 1 << 20  # elements: folding must not bloat the model


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Evaluate every standard-domain node whose inputs are all constants (onnx's reference
    evaluator) and replace its outputs by initializers; returns (model, nodes folded).

    onnxscript's folder deliberately leaves some ops alone (ConstantOfShape, for one), and every
    node downstream of them stays unfolded: torch's BERT export keeps a ConstantOfShape -> Equal ->
    Where -> Expand chain that TVM's importer then refuses (`broadcast_to ... ndim`).
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    opsets = {entry.domain or "": entry.version for entry in model.opset_import}
    values = {t.name: t for t in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    kept, folded = [], 0
    for node in model.graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NOT_FOLDED
            and node.input
            and all(name == "" or name in values for name in node.input)
            and not any(o in graph_outputs for o in node.output)
        )
        if not foldable:
            kept.append(node)
            continue
        try:
            evaluator = ReferenceEvaluator(node, opsets={"": opsets.get("", 1)})
            feeds = {name: numpy_helper.to_array(values[name]) for name in node.input if name}
            results = evaluator.run(None, feeds)
        except Exception:  # noqa: BLE001 - leave a node we cannot evaluate to TVM
            kept.append(node)
            continue
        if any(np.asarray(r).size > FOLD_OUTPUT_LIMIT for r in results):
            kept.append(node)
            continue
        for name, result in zip(node.output, results):
            values[name] = numpy_helper.from_array(np.asarray(result), name)
        folded += 1
    if not folded:
        return model, 0
    used = {name for node in kept for name in node_reads(node)} | graph_outputs
    del model.graph.node[:]
    model.graph.node.extend(kept)
    del model.graph.initializer[:]
    model.graph.initializer.extend(t for name, t in values.items() if name in used)
    return model, folded


def _onnxscript_optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's optimizer (constant folding, shape subgraphs included, and its rewrite rules);
    where its result is not a valid model (its rules wrote an opset-18 Split into an opset-17 model
    saved by onnxruntime), its constant folding alone; where that fails too, the model as is."""
    import onnxscript.optimizer
    from onnxscript import ir

    def full():
        return onnxscript.optimizer.optimize(copy.deepcopy(model), num_iterations=3)

    def folding_only():
        graph = ir.serde.deserialize_model(copy.deepcopy(model))
        onnxscript.optimizer.fold_constants(graph, onnx_shape_inference=True)
        onnxscript.optimizer.remove_unused_nodes(graph)
        return ir.serde.serialize_model(graph)

    failures = []
    # its folder logs each value the onnx reference evaluator could not compute (left unfolded)
    folder_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    for attempt in (full, folding_only):
        level = folder_log.level
        try:
            folder_log.setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                folded = _topologically_sorted(attempt())  # a rewrite may leave a node before its producer
            onnx.checker.check_model(_as_checkable(folded))
            return folded
        except Exception as err:  # noqa: BLE001 - an optimizer failure must not stop the compile
            failures.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
        finally:
            folder_log.setLevel(level)
    warnings.warn(f"onnxscript optimizer failed ({'; '.join(failures)}); using the model as is", stacklevel=2)
    return model


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference and constant folding (shape subgraphs included) for TVM's importer."""
    model = _weights_not_inputs(_topologically_sorted(model))
    model = _onnxscript_optimize(model)
    model, folded = fold_constants(model)
    if folded:  # what our folder settled may unlock more of onnxscript's
        model = _onnxscript_optimize(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        model = _constant_shapes(_contrib_shapes(model))
        if _static_shape_nodes(model):  # shapes known only now (after contrib ops): fold what they feed
            model, _ = fold_constants(model)
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
            model = _constant_shapes(_contrib_shapes(model))
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"ONNX shape inference failed ({err}); continuing without it", stacklevel=2)
    _empty_reductions(model)
    _patch_convolutions(model)
    _constant_tensors(model.graph)
    _name_nodes(model.graph)
    return model


def _patch_convolutions(model: onnx.ModelProto) -> None:
    """Rewrite, in place, each Conv whose kernel tiles its input exactly (kernel = strides, no
    padding, dilation or groups, static C/H/W divisible by the kernel: ViT's and Swin's patch
    embedding) as patches x flattened weights: Reshape [N, C, H/kh, kh, W/kw, kw] -> Transpose to
    [N, H/kh, W/kw, C, kh, kw] -> Reshape [N, patches, C*kh*kw] -> MatMul by the weights as a
    [C*kh*kw, M] constant [-> Add bias] -> Transpose/Reshape back to [N, M, H/kh, W/kw]. Each
    output sums over (c, ky, kx) in the convolution's order. TVM's convolution of such a kernel
    reads its input with a stride of the kernel width and vectorises over a few output columns
    (ViT-B/16: 14); the MatMul gets the register-tiled matmul schedule."""
    infos, weights = value_infos(model), {t.name: t for t in model.graph.initializer}
    nodes, changed = [], False
    for node in model.graph.node:
        replacement = _patch_matmul(node, infos, weights, model.graph)
        nodes.extend(replacement or [node])
        changed |= bool(replacement)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _patch_matmul(node, infos, weights, graph) -> list | None:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or node.input[1] not in weights:
        return None
    w = onnx.numpy_helper.to_array(weights[node.input[1]])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dims = dims_of(infos[node.input[0]]) if node.input[0] in infos else None
    if w.ndim != 4 or w.dtype not in (np.float32, np.float16) or dims is None or len(dims) != 4:
        return None
    m, c, kh, kw = w.shape
    _, channels, height, width = dims
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if (list(attrs.get("kernel_shape", [kh, kw])) != [kh, kw] or list(attrs.get("strides", [1, 1])) != [kh, kw]
            or any(attrs.get("pads", [0] * 4)) or any(d != 1 for d in attrs.get("dilations", [1, 1]))
            or attrs.get("group", 1) != 1 or auto_pad not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
            or (kh, kw) == (1, 1) or channels != c or not isinstance(height, int) or not isinstance(width, int)
            or height % kh or width % kw):
        return None
    rows, columns = height // kh, width // kw
    stem = f"{node.output[0]}__patches"

    def constant(name, value):
        graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(value), f"{stem}_{name}"))
        return f"{stem}_{name}"

    # Reshape targets: 0 copies the batch dim (it may be symbolic)
    split = constant("split_shape", np.array([0, c, rows, kh, columns, kw], np.int64))
    patches = constant("rows_shape", np.array([0, rows * columns, c * kh * kw], np.int64))
    image = constant("image_shape", np.array([0, m, rows, columns], np.int64))
    flat = constant("weights", w.reshape(m, c * kh * kw).T)
    out = [
        helper.make_node("Reshape", [node.input[0], split], [f"{stem}_split"]),
        helper.make_node("Transpose", [f"{stem}_split"], [f"{stem}_grouped"], perm=[0, 2, 4, 1, 3, 5]),
        helper.make_node("Reshape", [f"{stem}_grouped", patches], [f"{stem}_rows"]),
        helper.make_node("MatMul", [f"{stem}_rows", flat], [f"{stem}_product"]),
    ]
    product = f"{stem}_product"
    if bias:
        out.append(helper.make_node("Add", [product, bias], [f"{stem}_biased"]))
        product = f"{stem}_biased"
    out += [
        helper.make_node("Transpose", [product], [f"{stem}_channels"], perm=[0, 2, 1]),
        helper.make_node("Reshape", [f"{stem}_channels", image], [node.output[0]]),
    ]
    return out


def _static_shape_nodes(model: onnx.ModelProto) -> int:
    """Replace, in place, each Shape node whose input's dims are all known by an initializer (its
    start/end slice); returns how many. The folders ran before onnxruntime's symbolic inference gave
    the outputs of contrib ops (SimplifiedLayerNormalization, SkipLayerNormalization...) their
    shapes: an onnxruntime-optimised T5's position bias was still computed from Shape -> Range at
    run time, a tensor of unknown shape to TVM (its import failed)."""
    infos = value_infos(model)
    outputs = {o.name for o in model.graph.output}
    kept, replaced = [], 0
    for node in model.graph.node:
        dims = dims_of(infos[node.input[0]]) if node.op_type == "Shape" and node.input[0] in infos else None
        if (node.domain not in ("", "ai.onnx") or dims is None or not all(isinstance(d, int) for d in dims)
                or node.output[0] in outputs):
            kept.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        value = np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, node.output[0]))
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return replaced


def _topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The main graph's nodes in an order where each comes after the producers of its inputs (the
    models onnxruntime saves after optimising are not always in one; ONNX requires it, its
    optimizer and checker refuse them). Stable: an ordered graph stays as it is. Values read only
    inside subgraphs count as inputs too."""
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    producer = {o: index for index, n in enumerate(nodes) for o in n.output if o}
    waits = [{producer[i] for i in node_reads(n) if i in producer and i not in available} for n in nodes]
    if all(all(p < index for p in wait) for index, wait in enumerate(waits)):
        return model
    # Kahn's algorithm, the earliest ready node first: an ordered stretch keeps its order
    users: dict[int, list[int]] = {}
    for index, wait in enumerate(waits):
        for p in wait:
            users.setdefault(p, []).append(index)
    remaining = [len(wait) for wait in waits]
    ready = [index for index, count in enumerate(remaining) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(nodes[index])
        for user in users.get(index, []):
            remaining[user] -= 1
            if remaining[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        return model  # a cycle: the checker will say where
    model = copy.deepcopy(model)
    del model.graph.node[:]
    model.graph.node.extend(order)
    return model


def _contrib_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX's shape inference stops at com.microsoft ops (an onnxruntime-optimised model's
    SkipLayerNormalization, EmbedLayerNormalization, BiasGelu...): nothing after them has a shape,
    so no attention there could be recognised (its rank is unknown). onnxruntime's symbolic shape
    inference knows those ops; it runs only for models that have them, and where it fails the
    model stays as ONNX's inference left it."""
    if not any(node.domain not in ("", "ai.onnx") or node.op_type in ORT_ONNX_DOMAIN_OPS - {"LayerNormalization"}
               for node in model.graph.node):
        return model
    try:
        inferred = _ort_symbolic_shapes(model)
    except Exception as err:  # noqa: BLE001 - an inference failure must not stop the compile
        warnings.warn(f"onnxruntime's symbolic shape inference failed ({type(err).__name__}: {err}); "
                      "shapes after com.microsoft ops stay unknown", stacklevel=2)
        return model
    if inferred is None:
        return model
    # It may leave a type it does not know as undefined (SkipLayerNormalization's float32 mean
    # output): what the model declared stays, and an untyped inference is dropped.
    for declared, got in zip(model.graph.output, inferred.graph.output):
        if declared.type.tensor_type.elem_type:
            got.CopyFrom(declared)
    typed = [v for v in inferred.graph.value_info if v.type.tensor_type.elem_type]
    del inferred.graph.value_info[:]
    inferred.graph.value_info.extend(typed)
    return inferred


def _ort_symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference, keeping what it inferred where it could not infer
    everything. Its public `infer_shapes` then raises and, first, saves the partial model as
    `sym_shape_infer_temp.onnx` plus a uuid-named `.data` file into the current directory: a
    compile must not litter the caller's directory, and the shapes it did find are still useful
    (each is one it derived; the ones it could not stay unknown). The same steps as `infer_shapes`,
    without the save; if its internals change, the public call runs in a scratch directory."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    if max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0) < 7:
        return None  # it knows opset 7 and above only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inference = SymbolicShapeInference(2**31 - 1, True, True, 0)
        steps = ("_preprocess", "_infer_impl", "_update_output_from_vi")
        if not all(hasattr(inference, step) for step in steps) or not hasattr(inference, "run_"):
            with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
                return SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_


def _weights_not_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Initializers listed as graph inputs (IR version 3 requires it; exporters of opset <= 8 wrote
    them so) are weights here (`graph_inputs`): they leave the input list and the model becomes
    IR version 4, where that is valid. Else a weight that constant folding replaced (e.g. folded
    into a Transpose) stayed behind as an input the caller would have to feed."""
    weights = {t.name for t in model.graph.initializer}
    if not any(i.name in weights for i in model.graph.input):
        return model
    model = copy.deepcopy(model)
    kept = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)
    return model


_CONSTANT_FORMS = {
    "value_float": lambda a: np.array(a.f, np.float32),
    "value_floats": lambda a: np.array(list(a.floats), np.float32),
    "value_int": lambda a: np.array(a.i, np.int64),
    "value_ints": lambda a: np.array(list(a.ints), np.int64),
}


def _constant_tensors(graph: onnx.GraphProto) -> None:
    """Constant nodes in the `value_float(s)` / `value_int(s)` forms (exporters write them, and
    the constant folding above writes `value_ints` for a folded Shape) become the `value` tensor
    form, the only one TVM 0.27's importer reads ("no value in Constant"). Subgraphs included."""
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attribute = node.attribute[0]
            make = _CONSTANT_FORMS.get(attribute.name)
            if make is not None:
                value = onnx.numpy_helper.from_array(make(attribute), node.output[0])
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("value", value))
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _constant_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    _constant_tensors(sub)


def _constant_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make run-time Reshape/Expand targets constant where shape inference knows them.

    With symbolic dims left unbound, exporters' shape subgraphs (Concat(Gather(Shape(x)), ...))
    stay, and TVM's importer refuses a Reshape or Expand whose target is a computed tensor. When
    the inferred output dims are each static or the input's own dim at that position, the target
    can be written as a constant with Reshape's 0 (copy the input dim) and at most one -1 (infer),
    or Expand's 1 (keep the input dim): exact by the operators' definitions.
    """
    infos = value_infos(model)
    constants = {t.name for t in model.graph.initializer}
    changed = False
    for node in model.graph.node:
        if node.op_type not in ("Reshape", "Expand") or len(node.input) < 2 or node.input[1] in constants:
            continue
        source, result = infos.get(node.input[0]), infos.get(node.output[0])
        if source is None or result is None:
            continue
        in_dims, out_dims = dims_of(source), dims_of(result)
        if in_dims is None or out_dims is None or "?" in out_dims:
            continue
        target = _reshape_target(in_dims, out_dims) if node.op_type == "Reshape" else _expand_target(in_dims, out_dims)
        if node.op_type == "Reshape" and any(a.name == "allowzero" and a.i for a in node.attribute):
            target = None
        if target is None:
            continue
        name = f"{node.output[0]}__tvmsoftmax_shape"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(target, np.int64), name))
        node.input[1] = name
        changed = True
    if changed:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return model


# The value of a reduction over no elements, as onnxruntime gives it (ReduceMean: 0).
_EMPTY_REDUCTION = {"ReduceSum": 0, "ReduceMean": 0, "ReduceL1": 0, "ReduceL2": 0, "ReduceSumSquare": 0,
                    "ReduceProd": 1, "ReduceMax": "lowest", "ReduceMin": "highest",
                    "ReduceLogSum": -np.inf, "ReduceLogSumExp": -np.inf}


def _empty_reductions(model: onnx.ModelProto) -> None:
    """Reductions over an axis of length 0 become constants of the reduction's identity.

    TVM initialises a reduction in its first iteration, so over no elements the output is never
    written: it came back as whatever memory held (seen: -3.6e9, NaN). Needs static dims."""
    infos = value_infos(model)
    constants = {t.name: t for t in model.graph.initializer}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in _EMPTY_REDUCTION or node.domain not in ("", "ai.onnx"):
            continue
        source, result = infos.get(node.input[0]), infos.get(node.output[0])
        in_dims = dims_of(source) if source is not None else None
        out_dims = dims_of(result) if result is not None else None
        if not in_dims or out_dims is None or not all(isinstance(d, int) for d in out_dims):
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                continue
            axes = onnx.numpy_helper.to_array(constants[node.input[1]]).tolist()
        else:
            axes = list(attributes.get("axes", []))
        if not axes:
            if attributes.get("noop_with_empty_axes", 0):
                continue
            axes = list(range(len(in_dims)))
        if not any(in_dims[a % len(in_dims)] == 0 for a in axes):
            continue
        dtype = np.dtype(elem_dtype(result))
        fill = _EMPTY_REDUCTION[node.op_type]
        if fill in ("lowest", "highest"):
            if dtype.kind == "f":
                fill = -np.inf if fill == "lowest" else np.inf
            elif dtype.kind == "b":
                fill = fill == "highest"
            else:
                fill = getattr(np.iinfo(dtype), "min" if fill == "lowest" else "max")
        value = onnx.numpy_helper.from_array(np.full(out_dims, fill, dtype), node.output[0])
        constant = onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name, value=value)
        model.graph.node.remove(node)
        model.graph.node.insert(index, constant)


def _reshape_target(in_dims: list, out_dims: list) -> list[int] | None:
    target, unknown = [], 0
    for index, dim in enumerate(out_dims):
        if isinstance(dim, int):
            target.append(dim)
        elif index < len(in_dims) and in_dims[index] == dim:
            target.append(0)
        else:
            unknown += 1
            target.append(-1)
    return target if unknown <= 1 else None


def _expand_target(in_dims: list, out_dims: list) -> list[int] | None:
    offset = len(out_dims) - len(in_dims)
    target = []
    for index, dim in enumerate(out_dims):
        source = in_dims[index - offset] if index >= offset else None
        if isinstance(dim, int) and (source is None or source in (1, dim)):
            target.append(dim)
        elif source == dim:
            target.append(1)
        else:
            return None
    return target


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    table = {v.name: v for v in model.graph.value_info}
    table.update({v.name: v for v in model.graph.input})
    table.update({v.name: v for v in model.graph.output})
    return table
