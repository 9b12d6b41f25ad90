"""Pattern rewrite: find the Softmax/LogSoftmax sites of a model and mark them for our lowering.

Each site becomes one node of the private domain ``ai.tvmsoftmax`` (op ``SoftmaxSite``) that keeps
the source node's name and semantics as attributes; the Relax importer (`importer.py`) turns it into
one of our PrimFuncs. Nodes that are not rewritten stay as they are and go through TVM's own
importer; `inspect` reports why.

Forms (why each exists):
* Softmax/LogSoftmax opset 1 and 11 coerce the input to 2-D at ``axis`` (default 1): the row is
  everything from ``axis`` on.
* Softmax/LogSoftmax opset 13+ normalise along the one ``axis`` (default -1).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import onnx
from onnx import helper

from ..ops.softmax import ALGORITHMS
from .frontend import default_opset, dims_of, elem_dtype, value_infos

DOMAIN = "ai.tvmsoftmax"
SITE_OP = "SoftmaxSite"
ALGORITHM_CHOICES = ("auto",) + ALGORITHMS
SUPPORTED_DTYPES = ("float32", "float16")
# bfloat16 on CUDA only: on x86, TVM 0.27's vectoriser fails on the bfloat16 casts of our compute
# ("Let cannot bind the same var to two different values"), so such sites keep TVM's lowering.
DTYPES_BY_TARGET = {"x86": SUPPORTED_DTYPES, "cuda": SUPPORTED_DTYPES + ("bfloat16",)}


@dataclass
class Site:
    """One Softmax/LogSoftmax found in the model, and what it became."""

    id: str
    node: str
    op: str  # "Softmax" | "LogSoftmax"
    opset: int
    axis: int  # as the node says (default filled in), possibly negative
    coerce_2d: bool  # opset < 13 semantics
    shape: list | None  # input dims (ints / symbolic names) where known
    dtype: str | None
    requested: str  # algorithm asked for
    rewritten: bool = True
    reason: str = ""  # why not rewritten
    lowered: dict = field(default_factory=dict)  # algorithm, knobs, view (filled at import)
    not_attention: str = ""  # why this softmax was not fused into an attention site

    @property
    def form(self) -> str:
        return f"{self.op}-{'1/11 (2-D coerced)' if self.coerce_2d else '13'}"

    def to_json(self) -> dict:
        data = asdict(self)
        data["form"] = self.form
        return data


def row_view(dims: list, axis: int, coerce_2d: bool, product) -> list:
    """[outer, length, inner] of the rows a softmax normalises (see `ops.softmax`).

    `dims` are the input dims; `product` multiplies a list of them (ints, or TVM PrimExprs).
    Opset 13+: the row is dim `axis`; opsets 1/11: everything from `axis` on (inner = 1).
    """
    rank = len(dims)
    axis = axis + rank if axis < 0 else axis
    if rank == 0:
        return [product([]), product([]), product([])]
    if coerce_2d:
        return [product(dims[:axis]), product(dims[axis:]), product([])]
    return [product(dims[:axis]), product(dims[axis : axis + 1]), product(dims[axis + 1 :])]


def static_product(dims: list) -> int | None:
    """Product of int dims; None if any dim is symbolic."""
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def plan(site: Site, spec) -> tuple[str, object, list]:
    """(algorithm, knobs, static view) that the lowering will use for `site` on `spec`."""
    from ..schedules import choose_knobs

    view = row_view(site.shape, site.axis, site.coerce_2d, static_product) if site.shape else [None] * 3
    algorithm, knobs = choose_knobs(spec, site.requested, site.op == "LogSoftmax", view)
    return algorithm, knobs, view


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHM_CHOICES:
        from ..errors import TvmSoftmaxError

        raise TvmSoftmaxError(
            f"unknown algorithm {algorithm!r}: expected one of {', '.join(ALGORITHM_CHOICES)}"
        )


def find_sites(model: onnx.ModelProto, algorithm: str = "auto", dtypes=SUPPORTED_DTYPES) -> list[Site]:
    """Every Softmax/LogSoftmax of the main graph, with the reason where it cannot be ours."""
    _check_algorithm(algorithm)
    opset = default_opset(model)
    infos = value_infos(model)
    sites = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Softmax", "LogSoftmax"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        coerce = opset < 13
        axis = int(attrs.get("axis", 1 if coerce else -1))
        info = infos.get(node.input[0])
        shape = dims_of(info) if info is not None else None
        dtype = elem_dtype(info) if info is not None and info.type.tensor_type.elem_type else None
        site = Site(
            id=f"site{len(sites)}",
            node=node.name,
            op=node.op_type,
            opset=opset,
            axis=axis,
            coerce_2d=coerce,
            shape=shape,
            dtype=dtype,
            requested=algorithm,
        )
        if dtype is not None and dtype not in dtypes:
            site.rewritten = False
            site.reason = f"input dtype {dtype} (ours on this target: {', '.join(dtypes)}); TVM's lowering"
        elif shape is not None and not (-len(shape) <= axis < max(len(shape), 1)):
            site.rewritten = False
            site.reason = f"axis {axis} out of range for rank {len(shape)}"
        sites.append(site)
    return sites


def rewrite(model: onnx.ModelProto, algorithm: str = "auto", dtypes=SUPPORTED_DTYPES) -> tuple[onnx.ModelProto, list[Site]]:
    """Replace each rewritable site by an ``ai.tvmsoftmax.SoftmaxSite`` node."""
    sites = find_sites(model, algorithm, dtypes)
    by_node = {s.node: s for s in sites if s.rewritten}
    if not by_node:
        return model, sites
    model = copy.deepcopy(model)
    nodes = []
    for node in model.graph.node:
        site = by_node.get(node.name)
        if site is None or node.op_type not in ("Softmax", "LogSoftmax"):
            nodes.append(node)
            continue
        nodes.append(
            helper.make_node(
                SITE_OP,
                [node.input[0]],
                [node.output[0]],
                name=node.name,
                domain=DOMAIN,
                site=site.id,
                axis=site.axis,
                log=int(site.op == "LogSoftmax"),
                coerce_2d=int(site.coerce_2d),
                algorithm=algorithm,
            )
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, sites
