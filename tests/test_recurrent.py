"""RNN / GRU / LSTM (TVM 0.27 has no importer for them): unrolled into plain ONNX ops
(`lowering.recurrent`) and compared with onnxruntime (graph optimisations off) at float32 tolerance,
and with the ONNX conformance cases."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.backend.test.case.node as node_cases
import pytest
from conftest import TOLERANCES, assert_case_outputs, assert_close, run_ort
from onnx import TensorProto, helper

import tvmsoftmax
from tvmsoftmax.errors import ModelError

RECURRENT_CASES = [c for c in node_cases.collect_testcases(None)
                   if c.name.startswith(("test_lstm", "test_gru", "test_simple_rnn", "test_rnn"))]


def test_recurrent_cases_found():
    assert len(RECURRENT_CASES) >= 18


@pytest.mark.parametrize("case", RECURRENT_CASES, ids=[c.name for c in RECURRENT_CASES])
def test_recurrent_conformance(case):
    compiled = tvmsoftmax.compile(case.model)
    assert_case_outputs(compiled, case)


GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _model(op, *, steps=5, batch=3, inputs=4, hidden=6, direction="forward", layout=0, lens=False,
           initial=False, peepholes=False, outputs=("Y", "Y_h", "Y_c"), batch_dim=None, steps_dim=None, **attrs):
    """One recurrent node with random weights as initializers; X (and sequence_lens) as inputs."""
    rng = np.random.default_rng(7)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    f32 = TensorProto.FLOAT
    b_dim, s_dim = batch_dim or batch, steps_dim or steps
    x_dims = [b_dim, s_dim, inputs] if layout else [s_dim, b_dim, inputs]
    weights = {
        "W": rng.uniform(-0.5, 0.5, (dirs, g * hidden, inputs)),
        "R": rng.uniform(-0.5, 0.5, (dirs, g * hidden, hidden)),
        "B": rng.uniform(-0.5, 0.5, (dirs, 2 * g * hidden)),
    }
    state = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    if initial:
        weights["initial_h"] = rng.uniform(-1, 1, state)
        if op == "LSTM":
            weights["initial_c"] = rng.uniform(-1, 1, state)
    if peepholes:
        weights["P"] = rng.uniform(-0.5, 0.5, (dirs, 3 * hidden))
    names = ["X", "W", "R", "B", "sequence_lens" if lens else "", "initial_h" if initial else ""]
    if op == "LSTM":
        names += ["initial_c" if initial else "", "P" if peepholes else ""]
    while names and not names[-1]:
        names.pop()
    graph_inputs = [helper.make_tensor_value_info("X", f32, x_dims)]
    if lens:
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, [b_dim]))
    outs = [o if o in outputs else "" for o in (("Y", "Y_h", "Y_c") if op == "LSTM" else ("Y", "Y_h"))]
    node = helper.make_node(op, names, outs, name="recurrent", hidden_size=hidden, direction=direction,
                            layout=layout, **attrs)
    graph = helper.make_graph(
        [node], "g", graph_inputs, [helper.make_tensor_value_info(o, f32, [None] * (4 if o == "Y" else 3)) for o in outs if o],
        [helper.make_tensor(k, f32, v.shape, v.astype(np.float32).ravel()) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _feeds(model, steps=5, batch=3, inputs=4, layout=0, lengths=None):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((batch, steps, inputs) if layout else (steps, batch, inputs)).astype(np.float32)
    feeds = {"X": x}
    if any(i.name == "sequence_lens" for i in model.graph.input):
        feeds["sequence_lens"] = np.array(lengths, np.int32)
    return feeds


def _compare(model, feeds):
    compiled = tvmsoftmax.compile(model)
    got = list(compiled.run(feeds).values())
    want = run_ort(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w, **TOLERANCES["float32"])
    return compiled


CONFIGS = {
    "lstm_bidirectional_lens_initial_peepholes": ("LSTM", dict(direction="bidirectional", lens=True, initial=True,
                                                              peepholes=True)),
    "lstm_reverse_clip_input_forget": ("LSTM", dict(direction="reverse", clip=0.7, input_forget=1, lens=True)),
    "lstm_activations_alpha_beta": ("LSTM", dict(activations=["HardSigmoid", "LeakyRelu", "ScaledTanh"],
                                                 activation_alpha=[0.3], activation_beta=[0.4, 0.8])),
    "gru_linear_before_reset_bidirectional_lens": ("GRU", dict(direction="bidirectional", linear_before_reset=1,
                                                               lens=True, initial=True)),
    "gru_reset_after_clip_activations": ("GRU", dict(clip=0.5, activations=["Sigmoid", "Elu"],
                                                     activation_alpha=[0.7])),
    "rnn_reverse_relu_lens": ("RNN", dict(direction="reverse", activations=["Relu"], lens=True, initial=True)),
    "rnn_only_final_state": ("RNN", dict(outputs=("Y_h",), activations=["Affine"], activation_alpha=[0.5],
                                         activation_beta=[0.1])),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recurrent_matches_onnxruntime(name):
    """sequence_lens (Y is 0 past each row's length, the state that of its last valid step; a
    reverse direction starts at that step), clip, input_forget, linear_before_reset, peepholes,
    initial states, activations with alphas/betas consumed in order (defaults past the list)."""
    op, attrs = CONFIGS[name]
    model = _model(op, **attrs)
    _compare(model, _feeds(model, lengths=[5, 2, 0] if attrs.get("lens") else None))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_batch_first_layout(op):
    """layout 1: X [batch, steps, in], initial states [batch, dirs, H], Y [batch, steps, dirs, H],
    Y_h / Y_c [batch, dirs, H]. onnxruntime's CPU kernels refuse layout 1, so the reference is
    onnxruntime on the same weights in layout 0 with the data transposed."""
    attrs = dict(direction="bidirectional", initial=True, lens=True)
    batch_first, seq_first = _model(op, layout=1, **attrs), _model(op, layout=0, **attrs)
    feeds = _feeds(batch_first, layout=1, lengths=[1, 5, 3])
    got = list(tvmsoftmax.compile(batch_first).run(feeds).values())
    ort_feeds = dict(feeds, X=feeds["X"].transpose(1, 0, 2).copy())
    batch_first_states = {i.name: i for i in batch_first.graph.initializer if i.name.startswith("initial_")}
    for init in (i for i in seq_first.graph.initializer if i.name in batch_first_states):
        value = onnx.numpy_helper.to_array(batch_first_states[init.name]).transpose(1, 0, 2)  # -> [dirs, batch, H]
        init.CopyFrom(onnx.numpy_helper.from_array(value.copy(), init.name))
    want = run_ort(seq_first, ort_feeds)
    want = [want[0].transpose(2, 0, 1, 3)] + [w.transpose(1, 0, 2) for w in want[1:]]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w, **TOLERANCES["float32"])


def test_recurrent_symbolic_batch_and_steps():
    """A symbolic batch stays symbolic (one artifact for every batch size); a symbolic number of
    steps cannot be unrolled up front: the model compiles per input shape at run."""
    model = _model("LSTM", batch_dim="batch", initial=False)
    compiled = _compare(model, _feeds(model, batch=3))
    assert type(compiled).__name__ == "CompiledModel"
    wider = _feeds(model, batch=5)
    for g, w in zip(compiled.run(wider).values(), run_ort(model, wider)):
        assert_close(g, w, **TOLERANCES["float32"])
    unbound = _model("GRU", steps_dim="steps")
    specializing = tvmsoftmax.compile(unbound)
    assert type(specializing).__name__ == "SpecializingModel"
    for steps in (2, 7):
        feeds = _feeds(unbound, steps=steps)
        for g, w in zip(specializing.run(feeds).values(), run_ort(unbound, feeds)):
            assert_close(g, w, **TOLERANCES["float32"])


def test_recurrent_bad_attributes_are_named():
    with pytest.raises(ModelError, match="recurrent.*activation 'Swish'"):
        tvmsoftmax.compile(_model("RNN", activations=["Swish"]))
    with pytest.raises(ModelError, match="recurrent.*direction"):
        tvmsoftmax.compile(_model("GRU", direction="sideways"))
