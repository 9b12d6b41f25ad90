"""Real exports: small, randomly initialised Hugging Face models (no download) exported with
torch.onnx.export(dynamo=False) and (dynamo=True), compiled and checked against onnxruntime: the
four families with bound shapes in both exporter forms, twenty-four more families with their dims left
symbolic, float16 exports that run the softmax in float32, a Llama export with a KV cache, and
dynamo exports at opset 23 (ONNX Attention-23) with symbolic dims, checked against torch itself.

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


def _more_models():
    """More Hugging Face families (randomly initialised), each with what it must fuse."""
    t = transformers
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    text = _text_inputs(100)
    pixels = {"pixel_values": torch.from_numpy(np.random.default_rng(1).standard_normal((BATCH, 3, 32, 32)).astype(np.float32))}
    yield "distilbert", lambda: t.DistilBertModel(t.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)), text, "attention"
    yield "roberta", lambda: t.RobertaModel(t.RobertaConfig(vocab_size=100, hidden_size=32, max_position_embeddings=64, **small)), text, "attention"
    yield "mistral", lambda: t.MistralForCausalLM(t.MistralConfig(vocab_size=100, hidden_size=32, num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **small)), text, "attention"
    yield "qwen2", lambda: t.Qwen2ForCausalLM(t.Qwen2Config(vocab_size=100, hidden_size=32, num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **small)), text, "attention"
    yield "phi", lambda: t.PhiForCausalLM(t.PhiConfig(vocab_size=100, hidden_size=32, max_position_embeddings=64, use_cache=False, **small)), text, "attention"
    yield "gpt_neox", lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(vocab_size=100, hidden_size=32, max_position_embeddings=64, use_cache=False, **small)), text, "attention"
    yield "opt", lambda: t.OPTForCausalLM(t.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, use_cache=False)), text, "attention"
    yield "falcon", lambda: t.FalconForCausalLM(t.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, use_cache=False)), text, "attention"
    yield "gemma", lambda: t.GemmaForCausalLM(t.GemmaConfig(vocab_size=100, hidden_size=32, num_key_value_heads=1, head_dim=8, max_position_embeddings=64, use_cache=False, **small)), text, "attention"
    yield "clip_text", lambda: t.CLIPTextModel(t.CLIPTextConfig(vocab_size=100, hidden_size=32, max_position_embeddings=64, **small)), text, "attention"
    yield "deit", lambda: t.DeiTModel(t.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, **small)), pixels, "attention"
    yield "swin", lambda: t.SwinModel(t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)), pixels, "attention"
    yield "gemma2", lambda: t.Gemma2ForCausalLM(t.Gemma2Config(vocab_size=100, hidden_size=32, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, use_cache=False, sliding_window=8, **small)), text, "attention"  # softcap
    yield "bart", lambda: t.BartModel(t.BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)), text, "attention"  # encoder-decoder
    yield "swinv2", lambda: t.Swinv2Model(t.Swinv2Config(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)), pixels, "attention"  # shifted windows, per-head scale
    yield "bloom", lambda: t.BloomForCausalLM(t.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4, use_cache=False)), text, "attention"  # ALiBi: [B*H] products viewed as [B, H]
    yield "deberta_v2", lambda: t.DebertaV2Model(t.DebertaV2Config(vocab_size=100, hidden_size=32, max_position_embeddings=64, **small)), text, "attention"  # disentangled: [B*H] products, masked_fill Where
    yield "albert", lambda: t.AlbertModel(t.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, max_position_embeddings=64, **small)), text, "attention"  # shared layers, factorised embeddings
    yield "electra", lambda: t.ElectraModel(t.ElectraConfig(vocab_size=100, embedding_size=32, hidden_size=32, max_position_embeddings=64, **small)), text, "attention"
    yield "mpnet", lambda: t.MPNetModel(t.MPNetConfig(vocab_size=100, hidden_size=32, max_position_embeddings=64, **small)), text, "attention"  # relative position bias
    yield "gptj", lambda: t.GPTJForCausalLM(t.GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, use_cache=False, bos_token_id=1, eos_token_id=2)), text, "attention"  # partial rotary, interleaved
    yield "beit", lambda: t.BeitModel(t.BeitConfig(image_size=32, patch_size=8, hidden_size=32, use_relative_position_bias=True, **small)), pixels, "attention"  # relative position bias
    audio = {"input_values": torch.from_numpy(np.random.default_rng(2).standard_normal((BATCH, 1600)).astype(np.float32))}
    yield "wav2vec2", lambda: t.Wav2Vec2Model(t.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)), audio, "attention"  # conv feature encoder, grouped positional conv
    mel = {"input_features": torch.from_numpy(np.random.default_rng(3).standard_normal((BATCH, 8, 32)).astype(np.float32))}
    yield "whisper_encoder", lambda: t.WhisperModel(t.WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).get_encoder(), mel, "attention"  # audio encoder


MORE = ["distilbert", "roberta", "mistral", "qwen2", "phi", "gpt_neox", "opt", "falcon", "gemma", "gemma2", "bart",
        "clip_text", "deit", "swin", "swinv2", "bloom", "deberta_v2", "albert", "electra", "mpnet",
        "gptj", "beit", "wav2vec2", "whisper_encoder"]


def _export(wrapper, inputs, path):
    dims = {k: {0: "batch", 1: "sequence"} if v.ndim == 2 else {0: "batch"} for k, v in inputs.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs.values()), str(path), input_names=list(inputs),
                          output_names=["output"], dynamic_axes=dims, dynamo=False, opset_version=17)


@pytest.mark.parametrize("family", MORE)
def test_more_families_unbound(family, tmp_path):
    """Exported with symbolic batch/sequence and checked without binding them (compiled per shape at
    run: `SpecializingModel`): every attention fused (ALiBi and disentangled attention: their
    softmax), outputs within float32 tolerance of onnxruntime."""
    torch.manual_seed(0)
    _name, build, inputs, fused = next(m for m in _more_models() if m[0] == family)
    model = build().eval()
    path = tmp_path / f"{family}.onnx"
    _export(_Plain(model, list(inputs)), inputs, path)
    report = tvmsoftmax.check(str(path), inputs={k: v.numpy() for k, v in inputs.items()})
    kinds = [s.get("kind", "softmax") for s in report.sites if s["rewritten"]]
    assert len(kinds) >= 2 and set(kinds) == {fused}, report.sites
    assert report.passed, [o for o in report.outputs if not o.passed]


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_float16_export_softmax_in_float32_is_fused(family, tmp_path):
    """A float16 export whose softmax runs in float32 (Cast around it, V widened): fused, and within
    float16 tolerance of onnxruntime."""
    torch.manual_seed(0)
    _name, build, inputs, _fused = next(m for m in _more_models() if m[0] == family)
    model = build().half().eval()
    path = tmp_path / f"{family}-fp16.onnx"
    _export(_Plain(model, list(inputs)), inputs, path)
    report = tvmsoftmax.check(str(path), inputs={k: v.numpy() for k, v in inputs.items()})
    assert [s.get("kind") for s in report.sites if s["rewritten"]] == ["attention", "attention"], report.sites
    assert report.passed, [o for o in report.outputs if not o.passed]


@pytest.mark.parametrize("past, new", [(5, 1), (5, 4), (0, 6)], ids=["decode", "prefill-with-past", "no-past"])
def test_kv_cache_export(past, new, tmp_path):
    """A Llama export with past key/values as inputs and present ones as outputs (DynamicCache):
    the attention over concat(past, new) keys is fused, every output matches onnxruntime."""
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    t = transformers
    model = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=100, hidden_size=32, num_key_value_heads=2, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)).eval()

    class WithCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask, *cache):
            dynamic = DynamicCache()
            for layer in range(2):
                dynamic.update(cache[2 * layer], cache[2 * layer + 1], layer)
            out = self.inner(input_ids=ids, attention_mask=mask, past_key_values=dynamic, use_cache=True, return_dict=True)
            presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *presents)

    ids = torch.randint(0, 100, (2, new))
    mask = torch.ones(2, past + new, dtype=torch.int64)
    cache = [torch.randn(2, 2, past, 8) for _ in range(4)]
    names = ["input_ids", "attention_mask"] + [f"past_{i}_{kv}" for i in range(2) for kv in ("key", "value")]
    outputs = ["logits"] + [f"present_{i}_{kv}" for i in range(2) for kv in ("key", "value")]
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            **{n: {0: "batch", 2: "past"} for n in names[2:]}}
    path = tmp_path / "llama-kv.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithCache(model), (ids, mask, *cache), str(path), input_names=names, output_names=outputs,
                          dynamic_axes=dims, dynamo=False, opset_version=17)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), **{n: c.numpy() for n, c in zip(names[2:], cache)}}
    report = tvmsoftmax.check(str(path), inputs=feeds)
    assert [s.get("kind") for s in report.sites if s["rewritten"]] == ["attention", "attention"], report.sites
    assert report.passed and len(report.outputs) == 5, [o for o in report.outputs if not o.passed]


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


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_dynamo_opset23_export_with_dynamic_dims(family, tmp_path):
    """torch's dynamo exporter at opset 23 writes SDPA as ONNX Attention-23 (and Llama's rotary as
    RotaryEmbedding-23, with a cos/sin cache for one batch, which onnxruntime 1.32 refuses to
    broadcast over two), dims symbolic: every attention fused, one compiled model run at two
    shapes, each against torch's own output (onnxruntime cannot be the reference here)."""
    from conftest import assert_close

    torch.manual_seed(0)
    _name, model, inputs = next(m for m in _models() if m[0] == family)
    wrapper = _Plain(model.eval(), list(inputs))
    dynamic = torch.export.Dim.DYNAMIC
    path = tmp_path / f"{family}-opset23.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=["output"],
                          dynamo=True, opset_version=23, dynamic_shapes=(tuple({0: dynamic, 1: dynamic} for _ in inputs),))
    compiled = tvmsoftmax.compile(str(path))
    for batch, seq in ((BATCH, SEQ), (1, 9)):
        feeds = {name: value[:batch, :seq] for name, value in inputs.items()}
        with torch.no_grad():
            want = wrapper(*feeds.values()).numpy()
        (got,) = compiled.run({name: value.numpy() for name, value in feeds.items()}).values()
        assert_close(got, want, rtol=1e-4, atol=1e-5, what=f"{family} batch {batch} sequence {seq}")
        forms = [s.get("form") for s in compiled.sites if s["rewritten"]]
        assert forms == ["ONNX Attention-23"] * 2, compiled.sites


def _through_transformer_optimizer(model, model_type: str, tmp_path):
    """`model` (eager attention) exported, fused by onnxruntime's transformer optimizer and checked
    against onnxruntime (dims symbolic, a padded second sequence): the report."""
    from onnxruntime.transformers import optimizer

    inputs = _text_inputs(100)
    path, fused = tmp_path / f"{model_type}.onnx", tmp_path / f"{model_type}_fused.onnx"
    _export(_Plain(model.eval(), list(inputs)), inputs, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.optimize_model(str(path), model_type=model_type, num_heads=4, hidden_size=32).save_model_to_file(str(fused))
    return tvmsoftmax.check(str(fused), inputs={k: v.numpy() for k, v in inputs.items()})


def test_bert_through_onnxruntime_transformer_optimizer(tmp_path):
    """A Hugging Face BERT (eager attention) exported, then fused by onnxruntime's transformer
    optimizer into com.microsoft EmbedLayerNormalization (its mask_index: the valid token counts),
    Attention (1-D mask_index), SkipLayerNormalization and BiasGelu: every Attention fused, dims
    left symbolic (one compile), outputs matching onnxruntime with a padded second sequence."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, max_position_embeddings=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    config._attn_implementation = "eager"  # the form onnxruntime's Attention fusion matches
    report = _through_transformer_optimizer(transformers.BertModel(config), "bert", tmp_path)
    attention = [s for s in report.sites if s.get("kind") == "attention"]
    assert len(attention) == 2 and all(s["form"] == "com.microsoft.Attention" and s["rewritten"] for s in attention), report.sites
    assert report.passed, [o for o in report.outputs if not o.passed]


def test_t5_through_onnxruntime_transformer_optimizer(tmp_path):
    """A T5 encoder fused by onnxruntime's transformer optimizer (SimplifiedLayerNormalization,
    SkipSimplifiedLayerNormalization: ONNX's shape inference knows neither, so the relative
    position bias's Shape -> Range chain is foldable only after onnxruntime's symbolic inference;
    it once reached TVM as a tensor of unknown shape and the import failed): every attention fused,
    outputs matching onnxruntime with a padded second sequence."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    config._attn_implementation = "eager"
    report = _through_transformer_optimizer(transformers.T5EncoderModel(config), "t5", tmp_path)
    assert [s.get("kind") for s in report.sites if s["rewritten"]] == ["attention", "attention"], report.sites
    assert report.passed, [o for o in report.outputs if not o.passed]
