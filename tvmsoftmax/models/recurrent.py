"""Stacked recurrent networks (RNN, GRU, LSTM) in the form ``torch.onnx.export`` writes for
``torch.nn.LSTM(..., num_layers=L, bidirectional=True)``: one ONNX recurrent node per layer with
its weights as initializers (gate order already ONNX's), and between layers the [steps, directions,
batch, hidden] output reshaped to [steps, batch, directions * hidden] by Transpose + Reshape
(``Squeeze`` of the direction axis when there is one direction)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def stacked(op: str = "LSTM", *, layers: int = 2, bidirectional: bool = True, steps: int | str = 64,
            batch: int | str = 4, inputs: int = 32, hidden: int = 48, seed: int = 0) -> onnx.ModelProto:
    """`layers` recurrent `op` nodes over X [steps, batch, inputs] -> Y [steps, batch, dirs * hidden].
    `steps` and `batch` are ints (static) or names (symbolic dims)."""
    if op not in GATES:
        raise ValueError(f"unknown recurrent op {op!r}; expected one of {', '.join(GATES)}")
    rng = np.random.default_rng(seed)
    dirs = 2 if bidirectional else 1
    gates = GATES[op]
    nodes, inits = [], []

    def weight(name, shape, fan):
        bound = 1.0 / np.sqrt(fan)  # torch's default initialisation range
        inits.append(numpy_helper.from_array(rng.uniform(-bound, bound, shape).astype(np.float32), name))
        return name

    x, width = "X", inputs
    for layer in range(layers):
        names = [x, weight(f"W{layer}", (dirs, gates * hidden, width), hidden),
                 weight(f"R{layer}", (dirs, gates * hidden, hidden), hidden),
                 weight(f"B{layer}", (dirs, 2 * gates * hidden), hidden)]
        attrs = {"hidden_size": hidden, "direction": "bidirectional" if bidirectional else "forward"}
        if op == "GRU":
            attrs["linear_before_reset"] = 1  # torch's GRU
        y = f"Y{layer}"
        nodes.append(helper.make_node(op, names, [y], name=f"{op.lower()}_{layer}", **attrs))
        out = f"H{layer}"
        if bidirectional:
            nodes.append(helper.make_node("Transpose", [y], [f"{y}_t"], perm=[0, 2, 1, 3]))
            shape = f"shape{layer}"
            inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), shape))
            nodes.append(helper.make_node("Reshape", [f"{y}_t", shape], [out]))
        else:
            axes = f"axes{layer}"
            inits.append(numpy_helper.from_array(np.array([1], np.int64), axes))
            nodes.append(helper.make_node("Squeeze", [y, axes], [out]))
        x, width = out, dirs * hidden
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, f"{op.lower()}_stack", [helper.make_tensor_value_info("X", f32, [steps, batch, inputs])],
        [helper.make_tensor_value_info(x, f32, [steps, batch, dirs * hidden])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
