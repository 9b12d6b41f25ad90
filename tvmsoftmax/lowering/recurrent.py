"""ONNX RNN, GRU and LSTM unrolled over their time steps into plain ONNX ops.

TVM 0.27's ONNX importer has none of the three, and the ONNX spec gives them no function body, so
each node is replaced here by the ops that compute it, step by step, with onnxruntime's semantics
(its CPU kernels, ``deep_cpu_lstm`` / ``deep_cpu_gru`` / ``rnn``):

* gate order in W, R and B as the spec: LSTM ``i o f c`` (peepholes ``i o f``), GRU ``z r h``;
* ``X W^T + Wb + Rb`` for every step at once (one MatMul), then per step ``+ H R^T``;
* ``clip`` bounds every gate's pre-activation (after bias and peephole), before its activation;
* LSTM ``input_forget``: ``f = 1 - i``; GRU ``linear_before_reset``: ``r * (H R_h^T + Rb_h)``
  instead of ``(r * H) R_h^T + Rb_h``;
* ``activations`` / ``activation_alpha`` / ``activation_beta``: alphas and betas are consumed in
  order by the activations that take them, with onnxruntime's defaults where the list runs out
  (LeakyRelu 0.01, HardSigmoid 0.2 / 0.5, Elu 1.0, others 0);
* ``sequence_lens``: batch b runs its first ``sequence_lens[b]`` steps (a reverse direction starts
  at its last valid step); Y is 0 past them and Y_h / Y_c hold the last valid step's state (0 for
  a row of length 0, whatever its initial state, as onnxruntime);
* ``layout`` 1 (batch first) for X, the initial states and every output.

The number of steps must be known (a static dim of X); with a symbolic one the node cannot be
unrolled, and a model with symbolic input dims is compiled per input shape instead.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ModelError

RECURRENT = ("RNN", "GRU", "LSTM")
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
# activation -> (takes alpha, takes beta), onnxruntime's rnn_helpers
_ACTIVATION_ARGS = {
    "affine": (True, True), "relu": (False, False), "leakyrelu": (True, False),
    "thresholdedrelu": (True, False), "tanh": (False, False), "scaledtanh": (True, True),
    "sigmoid": (False, False), "hardsigmoid": (True, True), "elu": (True, False),
    "softsign": (False, False), "softplus": (False, False),
}
_ACTIVATION_DEFAULTS = {"leakyrelu": (0.01, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}


def expand_recurrent(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every RNN / GRU / LSTM node of its main graph replaced by its unrolled ops (the
    model itself when it has none)."""
    from .frontend import value_infos

    if not any(n.op_type in RECURRENT and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    infos = value_infos(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type in RECURRENT and node.domain in ("", "ai.onnx"):
            nodes.extend(_Unroll(node, infos).nodes)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


class _Unroll:
    """The ops of one recurrent node (`nodes`), named after it."""

    def __init__(self, node: onnx.NodeProto, infos: dict):
        self.node, self.infos, self.nodes, self.count = node, infos, [], 0
        self.prefix = f"{node.name or node.op_type}/"
        self.kind = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.direction = attrs.get("direction", b"forward")
        self.direction = self.direction.decode() if isinstance(self.direction, bytes) else self.direction
        if self.direction not in ("forward", "reverse", "bidirectional"):
            self.fail(f"direction must be forward, reverse or bidirectional, got {self.direction!r}")
        self.layout = int(attrs.get("layout", 0))
        self.clip = float(attrs["clip"]) if "clip" in attrs else None
        self.input_forget = int(attrs.get("input_forget", 0))
        self.linear_before_reset = int(attrs.get("linear_before_reset", 0))
        inputs = list(node.input) + [""] * (8 - len(node.input))
        self.x, self.w, self.r, self.b, self.lens, self.h0 = inputs[:6]
        self.c0, self.p = (inputs[6], inputs[7]) if self.kind == "LSTM" else ("", "")
        directions = 2 if self.direction == "bidirectional" else 1
        self.dtype = self._elem_type(self.x)
        steps = self._dims(self.x)[self.layout] if self._dims(self.x) else None
        if not isinstance(steps, int):
            self.fail(f"needs a static sequence length (dim {self.layout} of X {self.x!r} is {steps!r}) "
                      "to unroll its time steps")
        if steps < 1:
            self.fail(f"has {steps} time steps (X {self.x!r}); at least 1 is needed")
        hidden = attrs.get("hidden_size")
        if hidden is None:
            r_dims = self._dims(self.r)
            hidden = r_dims[-1] if r_dims and isinstance(r_dims[-1], int) else None
        if hidden is None:
            self.fail("has no hidden_size and R's shape does not give it")
        self.hidden, self.steps = int(hidden), steps
        self.activations = self._activations(attrs, directions)
        self._build(directions)

    # ---- helpers ---------------------------------------------------------------------------
    def fail(self, what: str):
        raise ModelError(f"node {self.node.name!r} ({self.kind}) {what}")

    def _dims(self, name):
        from .frontend import dims_of

        info = self.infos.get(name)
        return dims_of(info) if info is not None else None

    def _elem_type(self, name) -> int:
        info = self.infos.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            return TensorProto.FLOAT
        return info.type.tensor_type.elem_type

    def op(self, op_type: str, inputs: list, **attrs) -> str:
        self.count += 1
        out = f"{self.prefix}{op_type}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype if dtype is not None else helper.tensor_dtype_to_np_dtype(self.dtype))
        self.count += 1
        out = f"{self.prefix}const_{self.count}"
        self.nodes.append(helper.make_node("Constant", [], [out], name=out,
                                           value=onnx.numpy_helper.from_array(array, out)))
        return out

    def index(self, value: int) -> str:
        return self.const(np.int64(value), np.int64)

    def axes(self, *values: int) -> str:
        return self.const(np.array(values, np.int64), np.int64)

    def columns(self, value: str, start: int, stop: int) -> str:
        """value[..., start:stop] (the last axis)."""
        return self.op("Slice", [value, self.axes(start), self.axes(stop), self.axes(-1)])

    def _activations(self, attrs: dict, directions: int) -> list:
        names = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
        per_direction = len(_DEFAULT_ACTIVATIONS[self.kind])
        if not names:
            names = _DEFAULT_ACTIVATIONS[self.kind] * directions
        elif len(names) == per_direction and directions == 2:
            names = names * 2
        if len(names) != per_direction * directions:
            self.fail(f"has {len(names)} activations, expected {per_direction * directions}")
        alphas = list(attrs.get("activation_alpha", []))
        betas = list(attrs.get("activation_beta", []))
        out = []
        for name in names:
            key = name.lower()
            if key not in _ACTIVATION_ARGS:
                self.fail(f"activation {name!r} is not one of {sorted(_ACTIVATION_ARGS)}")
            takes_alpha, takes_beta = _ACTIVATION_ARGS[key]
            default_alpha, default_beta = _ACTIVATION_DEFAULTS.get(key, (0.0, 0.0))
            alpha = (alphas.pop(0) if alphas else default_alpha) if takes_alpha else 0.0
            beta = (betas.pop(0) if betas else default_beta) if takes_beta else 0.0
            out.append((key, float(alpha), float(beta)))
        return out

    def activate(self, activation, value: str) -> str:
        key, alpha, beta = activation
        if key in ("relu", "tanh", "sigmoid", "softsign", "softplus"):
            return self.op({"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign",
                            "softplus": "Softplus"}[key], [value])
        if key in ("leakyrelu", "thresholdedrelu", "elu"):
            return self.op({"leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu", "elu": "Elu"}[key],
                           [value], alpha=alpha)
        if key == "hardsigmoid":
            return self.op("HardSigmoid", [value], alpha=alpha, beta=beta)
        if key == "affine":
            return self.op("Add", [self.op("Mul", [value, self.const(alpha)]), self.const(beta)])
        # scaledtanh: alpha * tanh(beta * x)
        return self.op("Mul", [self.op("Tanh", [self.op("Mul", [value, self.const(beta)])]), self.const(alpha)])

    def clipped(self, value: str) -> str:
        if self.clip is None:
            return value
        return self.op("Clip", [value, self.const(-self.clip), self.const(self.clip)])

    # ---- the unrolled recurrence -----------------------------------------------------------
    def _build(self, directions: int) -> None:
        gates, hidden = _GATES[self.kind], self.hidden
        x = self.op("Transpose", [self.x], perm=[1, 0, 2]) if self.layout else self.x  # [steps, batch, in]
        # A zero state is None (its terms are left out, no [batch, H] zeros: TVM cannot build
        # those for a symbolic batch); masked values broadcast this scalar.
        zero = self.const(0.0)
        if self.lens:  # [batch] -> [batch, 1] per step: step t runs where t < sequence_lens[b]
            lengths = self.op("Unsqueeze", [self.op("Cast", [self.lens], to=TensorProto.INT64), self.axes(1)])
        ys, hs, cs = [], [], []
        for d in range(directions):
            reverse = self.direction == "reverse" or d == 1
            w = self.op("Gather", [self.w, self.index(d)], axis=0)  # [G*H, in]
            r_t = self.op("Transpose", [self.op("Gather", [self.r, self.index(d)], axis=0)], perm=[1, 0])  # [H, G*H]
            xw = self.op("MatMul", [x, self.op("Transpose", [w], perm=[1, 0])])  # [steps, batch, G*H]
            rb_h = None
            if self.b:
                bias = self.op("Gather", [self.b, self.index(d)], axis=0)  # [2*G*H]
                wb, rb = self.columns(bias, 0, gates * hidden), self.columns(bias, gates * hidden, 2 * gates * hidden)
                if self.kind == "GRU":  # Rb_h is added with H R_h^T (inside the reset for lbr=1)
                    rb_h = self.columns(rb, 2 * hidden, 3 * hidden)
                    rb = self.op("Concat", [self.columns(rb, 0, 2 * hidden), self.const(np.zeros(hidden))], axis=0)
                xw = self.op("Add", [xw, self.op("Add", [wb, rb])])
            h = self._initial(self.h0, d)
            c = self._initial(self.c0, d)
            peep = self.op("Gather", [self.p, self.index(d)], axis=0) if self.p else None
            acts = self.activations[d * len(_DEFAULT_ACTIVATIONS[self.kind]):][:len(_DEFAULT_ACTIVATIONS[self.kind])]
            outputs = [None] * self.steps
            for t in (reversed(range(self.steps)) if reverse else range(self.steps)):
                x_t = self.op("Gather", [xw, self.index(t)], axis=0)  # [batch, G*H]
                new_h, new_c = self._step(x_t, h, c, r_t, rb_h, peep, acts)
                if self.lens:
                    mask = self.op("Less", [self.index(t), lengths])
                    outputs[t] = self.op("Where", [mask, new_h, zero])
                    h = self.op("Where", [mask, new_h, h or zero])
                    c = self.op("Where", [mask, new_c, c or zero]) if new_c is not None else None
                else:
                    outputs[t] = h = new_h
                    c = new_c
            if self.lens:  # onnxruntime: a row of length 0 ends in a zero state, not the initial one
                ran = self.op("Less", [self.index(0), lengths])
                h = self.op("Where", [ran, h, zero])
                c = self.op("Where", [ran, c, zero]) if c is not None else None
            y = self.op("Concat", [self.op("Unsqueeze", [o, self.axes(0)]) for o in outputs], axis=0)
            ys.append(self.op("Unsqueeze", [y, self.axes(1)]))  # [steps, 1, batch, H]
            hs.append(self.op("Unsqueeze", [h, self.axes(0)]))
            if c is not None:
                cs.append(self.op("Unsqueeze", [c, self.axes(0)]))
        outs = list(self.node.output) + [""] * 3
        for name, parts, perm in ((outs[0], ys, [2, 0, 1, 3]), (outs[1], hs, [1, 0, 2]), (outs[2], cs, [1, 0, 2])):
            if not name or not parts:
                continue
            value = self.op("Concat", parts, axis=0 if perm[0] != 2 else 1)
            if self.layout:
                value = self.op("Transpose", [value], perm=perm)
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"{self.prefix}{name}"))

    def _initial(self, name: str, d: int) -> str | None:
        if not name:
            return None
        return self.op("Gather", [name, self.index(d)], axis=1 if self.layout else 0)

    def _step(self, x_t, h, c, r_t, rb_h, peep, acts):
        """One step from state (h, c) (None: zero); returns the new (h, c)."""
        hidden = self.hidden

        def plus_recurrent(x_part, r_part):  # x + H R^T
            return x_part if h is None else self.op("Add", [x_part, self.op("MatMul", [h, r_part])])

        if self.kind == "RNN":
            return self.activate(acts[0], self.clipped(plus_recurrent(x_t, r_t))), None
        if self.kind == "LSTM":
            gates = plus_recurrent(x_t, r_t)
            part = {name: self.columns(gates, k * hidden, (k + 1) * hidden) for k, name in enumerate("iofc")}
            f_act, g_act, h_act = acts

            def peephole(value, k, state):
                if peep is None or state is None:
                    return value
                return self.op("Add", [value, self.op("Mul", [self.columns(peep, k * hidden, (k + 1) * hidden), state])])

            i = self.activate(f_act, self.clipped(peephole(part["i"], 0, c)))
            if self.input_forget:
                f = self.op("Sub", [self.const(1.0), i])
            else:
                f = self.activate(f_act, self.clipped(peephole(part["f"], 2, c)))
            candidate = self.activate(g_act, self.clipped(part["c"]))
            new_c = self.op("Mul", [i, candidate])
            if c is not None:
                new_c = self.op("Add", [self.op("Mul", [f, c]), new_c])
            o = self.activate(f_act, self.clipped(peephole(part["o"], 1, new_c)))
            return self.op("Mul", [o, self.activate(h_act, new_c)]), new_c
        # GRU
        f_act, g_act = acts
        r_zr = self.columns(r_t, 0, 2 * hidden)
        r_h = self.columns(r_t, 2 * hidden, 3 * hidden)
        zr = plus_recurrent(self.columns(x_t, 0, 2 * hidden), r_zr)
        z = self.activate(f_act, self.clipped(self.columns(zr, 0, hidden)))
        r = self.activate(f_act, self.clipped(self.columns(zr, hidden, 2 * hidden)))
        x_h = self.columns(x_t, 2 * hidden, 3 * hidden)
        # linear_before_reset: r * (H R_h^T + Rb_h); else (r * H) R_h^T + Rb_h
        terms = []
        if h is not None:
            terms.append(self.op("MatMul", [h, r_h] if self.linear_before_reset else [self.op("Mul", [r, h]), r_h]))
        if rb_h is not None:
            terms.append(rb_h)
        recurrent = terms[0] if len(terms) == 1 else self.op("Add", terms) if terms else None
        if recurrent is not None and self.linear_before_reset:
            recurrent = self.op("Mul", [r, recurrent])
        candidate_in = x_h if recurrent is None else self.op("Add", [x_h, recurrent])
        candidate = self.activate(g_act, self.clipped(candidate_in))
        # H' = (1 - z) * candidate + z * H
        new_h = self.op("Mul", [self.op("Sub", [self.const(1.0), z]), candidate])
        return (new_h if h is None else self.op("Add", [new_h, self.op("Mul", [z, h])])), None
