"""Tuning: records replace the `auto` rule's choice for their key (softmax rows, attention specs);
`tune` measures candidates of each key on this host and keeps the fastest that agrees with the
untuned model. Which candidate wins is timing (noisy here), so tests assert the bookkeeping
(the winner is the fastest measured; its knobs are what a tuned compile uses) and the outputs,
never a speed."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tvmsoftmax
from conftest import softmax_model
from tvmsoftmax.bench_attention import _models
from tvmsoftmax.schedules import tuning


def _attention_model():
    attention, _unfused, _mha = _models(1, 2, 48, 16, False)
    return attention


def _keys(model):
    with tuning.recording() as asked:
        tvmsoftmax.compile(model)
    return asked


def test_a_record_replaces_the_rule_for_its_key():
    model = softmax_model("Softmax", (8, 300))
    (key, info), = _keys(model).items()
    assert info["choice"] == "three-pass" and info["context"]["view"] == [8, 300, 1]
    knobs = {**info["knobs"].to_json(), "accumulators": 4, "unroll": 1}
    compiled = tvmsoftmax.compile(model, tuning={key: {"choice": "online", "knobs": knobs}})
    (site,) = [s for s in compiled.sites if s["rewritten"]]
    assert site["lowered"]["algorithm"] == "online" and site["lowered"]["knobs"] == knobs
    x = np.random.default_rng(0).standard_normal((8, 300)).astype(np.float32)
    shifted = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    np.testing.assert_allclose(compiled.run({"x": x})["y"], shifted / shifted.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    # another key (another row length) is not affected
    other = tvmsoftmax.compile(softmax_model("Softmax", (8, 301)), tuning={key: {"choice": "online", "knobs": knobs}})
    assert [s["lowered"]["algorithm"] for s in other.sites if s["rewritten"]] == ["three-pass"]
    # inspect applies them too
    (planned,) = [s for s in tvmsoftmax.inspect(model, tuning={key: {"choice": "online", "knobs": knobs}}) if s.rewritten]
    assert planned.lowered["algorithm"] == "online" and planned.lowered["knobs"] == knobs


@pytest.mark.parametrize("kind", ["softmax", "attention"])
def test_tune_keeps_the_fastest_agreeing_candidate(kind, tmp_path):
    model = softmax_model("Softmax", (16, 500)) if kind == "softmax" else _attention_model()
    report = tvmsoftmax.tune(model, trials=3, repeat=3, log=lambda *a: None)
    assert report["format"] == tuning.FORMAT and report["target"]["name"] == "x86"
    (record,) = report["records"]
    assert record["kind"] == kind and len(record["candidates"]) == 3
    timed = [c for c in record["candidates"] if "median_s" in c]
    assert timed[0] is record["candidates"][0]  # the default is always measured
    fastest = min(timed, key=lambda c: c["median_s"])
    assert (record["choice"], record["knobs"], record["median_s"]) == (fastest["choice"], fastest["knobs"], fastest["median_s"])
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(report))
    tuned, untuned = tvmsoftmax.compile(model, tuning=str(path)), tvmsoftmax.compile(model)
    (site,) = [s for s in tuned.sites if s["rewritten"]]
    assert site["lowered"]["knobs"] == record["knobs"]
    assert site["lowered"]["algorithm" if kind == "softmax" else "strategy"] == record["choice"]
    feeds = {i["name"]: np.random.default_rng(1).standard_normal(i["shape"]).astype(np.float32) for i in untuned.inputs}
    for name, want in untuned.run(feeds).items():
        np.testing.assert_allclose(tuned.run(feeds)[name], want, rtol=1e-5, atol=1e-6)


def test_tune_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(tvmsoftmax.InputError, match="expected a tvmsoftmax tuning file"):
        tvmsoftmax.compile(softmax_model("Softmax", (2, 8)), tuning=str(bad))
    with pytest.raises(tvmsoftmax.InputError, match="cannot read"):
        tvmsoftmax.compile(softmax_model("Softmax", (2, 8)), tuning=str(tmp_path / "missing.json"))
    with pytest.raises(tvmsoftmax.InputError, match="x86 only"):
        tvmsoftmax.tune(softmax_model("Softmax", (2, 8)), target="cuda")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])])
    with pytest.raises(tvmsoftmax.InputError, match="bind its inputs"):
        tvmsoftmax.tune(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_cli_tune_then_compile(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(softmax_model("LogSoftmax", (4, 200)), path)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tvmsoftmax.cli", *args], capture_output=True, text=True,
                              timeout=600)

    records = tmp_path / "t.json"
    result = cli("tune", str(path), "-o", str(records), "--trials", "2", "--repeat", "2")
    assert result.returncode == 0 and records.is_file() and "record(s)" in result.stdout, result.stderr
    chosen = json.loads(records.read_text())["records"][0]
    result = cli("compile", str(path), "-o", str(tmp_path / "m.tvmsm"), "--tuning", str(records))
    assert result.returncode == 0, result.stderr
    manifest = tvmsoftmax.load(tmp_path / "m.tvmsm").manifest
    (site,) = [s for s in manifest["sites"] if s["rewritten"]]
    assert site["lowered"]["knobs"] == chosen["knobs"] and site["lowered"]["algorithm"] == chosen["choice"]
