"""The transformer families of tvmsoftmax.models, in both exporter forms, compiled end to end and
checked against onnxruntime; every attention Softmax is one of our sites."""

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
