"""Real exports: small, randomly initialised Hugging Face models (no download) exported with
torch.onnx.export(dynamo=False) and (dynamo=True), compiled and checked against onnxruntime.

Needs torch and transformers (not runtime dependencies): skipped, and said so, when they are not
installed; `.ci/run` installs them when it can.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tvmsoftmax  # noqa: E402

pytestmark = pytest.mark.slow
BATCH, SEQ = 2, 16


def _text_inputs(vocab):
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, vocab, (BATCH, SEQ)).astype(np.int64))
    mask = torch.ones((BATCH, SEQ), dtype=torch.int64)
    mask[1, SEQ - 5 :] = 0  # padding in the second sequence
    return {"input_ids": ids, "attention_mask": mask}


def _models():
    t = transformers
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    yield "bert", t.BertModel(t.BertConfig(vocab_size=100, hidden_size=32, max_position_embeddings=64, **small)), _text_inputs(100)
    yield "gpt2", t.GPT2LMHeadModel(t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False)), _text_inputs(100)
    yield "llama", t.LlamaForCausalLM(t.LlamaConfig(vocab_size=100, hidden_size=32, num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **small)), _text_inputs(100)
    pixels = {"pixel_values": torch.from_numpy(np.random.default_rng(1).standard_normal((BATCH, 3, 32, 32)).astype(np.float32))}
    yield "vit", t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, hidden_size=32, **small)), pixels


class _Plain(torch.nn.Module):
    """Positional inputs in, first output tensor out (what the exporters handle best)."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), return_dict=False)
        return out[0]


CASES = [(name, dynamo) for name in ("bert", "gpt2", "llama", "vit") for dynamo in (False, True)]


@pytest.mark.parametrize("family,dynamo", CASES, ids=[f"{n}-{'dynamo' if d else 'torchscript'}" for n, d in CASES])
def test_real_export_compiles_and_matches(family, dynamo, tmp_path):
    torch.manual_seed(0)
    name, model, inputs = next(m for m in _models() if m[0] == family)
    model.eval()
    wrapper = _Plain(model, list(inputs))
    path = tmp_path / f"{family}.onnx"
    dims = {k: {0: "batch", 1: "sequence"} if v.ndim == 2 else {0: "batch"} for k, v in inputs.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(wrapper, tuple(inputs.values()), str(path), input_names=list(inputs),
                              output_names=["output"], dynamo=True, opset_version=18)
        else:
            torch.onnx.export(wrapper, tuple(inputs.values()), str(path), input_names=list(inputs),
                              output_names=["output"], dynamic_axes=dims, dynamo=False, opset_version=17)
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    feeds = {k: v.numpy() for k, v in inputs.items()}
    report = tvmsoftmax.check(str(path), shapes=shapes, inputs=feeds)  # default float32 tolerances
    sites = [s for s in report.sites if s["rewritten"]]
    assert len(sites) >= 2, report.sites  # one attention Softmax per layer at least
    assert report.passed, [o for o in report.outputs if not o.passed]
