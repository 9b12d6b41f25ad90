"""The transformer families of tvmsoftmax.models, in both exporter forms, compiled end to end and
checked against onnxruntime; every attention Softmax is one of our sites."""

import numpy as np
import onnx
import pytest

import tvmsoftmax
from tvmsoftmax.lowering.check import make_inputs
from tvmsoftmax.models import EXPORTERS, FAMILIES, build

SHAPES = {
    "vit": {"pixel_values": [2, 3, 32, 32]},
    "bert": {"input_ids": [2, 16], "attention_mask": [2, 16]},
    "gpt2": {"input_ids": [2, 16], "attention_mask": [2, 16]},
    "llama": {"input_ids": [2, 16], "attention_mask": [2, 16]},
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compiles_and_matches(family, exporter):
    model = build(family, exporter=exporter, layers=2)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 2
    report = tvmsoftmax.check(model, shapes=SHAPES[family])
    assert sum(s["rewritten"] for s in report.sites) == len(softmaxes)
    assert report.passed, [o for o in report.outputs if not o.passed]


def test_exporter_forms_differ():
    """The two forms really are different graphs (SDPA + IsNaN guard vs eager)."""
    scripted = build("bert", exporter="torchscript")
    dynamo = build("bert", exporter="dynamo")
    ops = lambda m: {n.op_type for n in m.graph.node}  # noqa: E731
    assert "IsNaN" in ops(scripted) and "IsNaN" not in ops(dynamo)
    assert dynamo.opset_import[0].version == 18 and scripted.opset_import[0].version == 17
    assert {"Shape", "Gather", "Concat", "Reshape"} <= ops(scripted)
    assert {"Range", "LessOrEqual", "Where", "Expand"} <= ops(build("llama", exporter="dynamo"))


def test_padding_mask_changes_the_output():
    """Masked positions are honoured (the check uses a mask with zeros here)."""
    model = build("bert")
    inputs = make_inputs(model, 0, {"batch": 2, "sequence": 16})
    inputs["attention_mask"][1, 10:] = 0
    report = tvmsoftmax.check(model, shapes=SHAPES["bert"], inputs=inputs)
    assert report.passed


def test_models_are_seeded():
    assert build("gpt2", seed=3) == build("gpt2", seed=3)
    assert build("gpt2", seed=3) != build("gpt2", seed=4)
    onnx.checker.check_model(build("llama", kv_heads=1))  # MQA variant builds


def test_inspect_plans_every_site():
    # attention="none": the softmax sites themselves (with fusion they are inside attention sites)
    sites = tvmsoftmax.inspect(build("gpt2"), shapes=SHAPES["gpt2"], attention="none")
    assert len(sites) == 2 and all(s.rewritten for s in sites)
    for site in sites:
        assert site.lowered["algorithm"] in ("three-pass", "three-pass-recompute", "two-pass", "online")
        assert site.lowered["view"] == [2 * 4 * 16, 16, 1]  # [batch*heads*queries, keys, 1]


def _arbiter_case(ours_noise: float, theirs_noise: float, domain: str = ""):
    """A float32 Add whose 'ours' and 'onnxruntime' outputs are the float64 result plus noise of the
    given sizes (a run of two float32 implementations, each with its own rounding)."""
    from onnx import TensorProto, helper

    from tvmsoftmax.lowering.check import compare

    node = helper.make_node("Add" if not domain else "FusedAdd", ["a", "b"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    rng = np.random.default_rng(10)
    feeds = {n: rng.standard_normal(64).astype(np.float32) for n in "ab"}
    exact = feeds["a"].astype(np.float64) + feeds["b"]
    signs = np.where(rng.standard_normal(64) > 0, 1.0, -1.0)
    ours = {"y": (exact + ours_noise * signs).astype(np.float32)}
    theirs = {"y": (exact - theirs_noise * signs).astype(np.float32)}
    reports = [compare("y", ours["y"], theirs["y"], 1e-5, 1e-5)]
    return model, feeds, ours, theirs, reports


@pytest.mark.parametrize("ours_noise,passes", [(1.2e-5, True), (1e-4, False)])
def test_check_judges_a_tolerance_miss_against_float64(ours_noise, passes):
    """Two float32 results each 1.2e-5 from the exact one differ by 2.4e-5, outside the 1e-5
    tolerance: judged against the float64 evaluation, ours is as close as onnxruntime's and
    passes (both errors reported); 1e-4 off, it fails."""
    from tvmsoftmax.lowering.check import _float64_arbiter

    model, feeds, ours, theirs, reports = _arbiter_case(ours_noise, 1.2e-5)
    assert not reports[0].passed
    _float64_arbiter(model, feeds, ours, theirs, reports)
    assert reports[0].passed is passes
    assert reports[0].float64_max_abs == pytest.approx(ours_noise, rel=0.05)
    assert reports[0].onnxruntime_float64_max_abs == pytest.approx(1.2e-5, rel=0.05)


def test_check_keeps_a_miss_it_cannot_evaluate_in_float64():
    """An op onnx's reference evaluator does not know (a contrib-style domain): no float64 verdict,
    the miss against onnxruntime stands."""
    from tvmsoftmax.lowering.check import _float64_arbiter

    model, feeds, ours, theirs, reports = _arbiter_case(1.2e-5, 1.2e-5, domain="com.example")
    _float64_arbiter(model, feeds, ours, theirs, reports)
    assert not reports[0].passed and reports[0].float64_max_abs is None
