"""Gemma-3: our model against HF transformers' Gemma3ForCausalLM on tiny random configs (float32),
through the paged engine; the config read from config.json and GGUF metadata."""

import pytest
import torch
from tiny_models import byte_tokenizer, run_recording_logits

from kvcache.cache.spec import group_layers, layer_specs
from kvcache.config import ModelConfig, SamplingParams, SchedulerConfig
from kvcache.engine.engine import LLMEngine, build_model
from kvcache.models.loader import LoadedModel
from kvcache.runtime.reference import logits_without_cache
from kvcache.sizing import KVShape

transformers = pytest.importorskip("transformers")

VOCAB = 256
SLIDING, FULL = "sliding_attention", "full_attention"
CONFIGS = {
    # window 5 < every prompt; MQA as the 270M; global layers in the middle and at the end
    "mqa-window": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=5,
                       layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL]),
    # GQA, query_pre_attn_scalar != head_dim, linear RoPE scaling on global layers, logit softcapping
    "gqa-scaled-softcap": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=7,
                               query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                               layer_types=[SLIDING, FULL, SLIDING, FULL],
                               rope_parameters={FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                                                SLIDING: {"rope_type": "default", "rope_theta": 100.0}}),
    # biases on every projection, an untied LM head, the default 5:1 pattern from sliding_window_pattern
    "bias-untied": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=16, sliding_window=3,
                        attention_bias=True, tie_word_embeddings=False, num_hidden_layers=7),
}


def _hf_model(name: str):
    torch.manual_seed(sum(map(ord, name)))
    extra = {"num_hidden_layers": len(CONFIGS[name].get("layer_types", [])) or 6, **CONFIGS[name]}
    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                        max_position_embeddings=512, rms_norm_eps=1e-6, **extra)
    cfg._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a wrong wiring cannot hide behind zeros
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _loaded(hf) -> LoadedModel:
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return LoadedModel(config, weights, byte_tokenizer(), "hf")


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [len(ids), vocab]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_logits_match_transformers(name):
    hf = _hf_model(name)
    ours = build_model(_loaded(hf), "float32", torch.device("cpu"))
    ids = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(logits_without_cache(ours, ids, block_size=4), _hf_logits(hf, ids),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_chunked_decode_logits_match_transformers(name):
    """Three prompts of different lengths, all longer than the window, in one continuous batch with
    chunked prefill crossing the window edge: every sampled step's logits equal HF's at that position."""
    hf = _hf_model(name)
    engine = LLMEngine(loaded=_loaded(hf), block_size=4, num_blocks=96, device="cpu",
                       scheduler_config=SchedulerConfig(max_num_batched_tokens=12, long_prefill_token_threshold=6))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 17, 6)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    runs = run_recording_logits(engine, prompts, params)
    for (output, logits), prompt in zip(runs, prompts):
        expected = _hf_logits(hf, prompt + output[:-1])[len(prompt) - 1:]  # [10, vocab]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        assert output == expected.argmax(-1).tolist()


def test_config_json_in_the_hubs_spelling():
    """google/gemma-3-*'s config.json: rope_local_base_freq, rope_scaling, sliding_window_pattern;
    the multimodal one nests the text model's facts in text_config."""
    text = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 2560, "intermediate_size": 10240,
            "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "query_pre_attn_scalar": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
            "sliding_window_pattern": 6, "final_logit_softcapping": None, "max_position_embeddings": 131072}
    for config in (ModelConfig.from_hf_config(text),
                   ModelConfig.from_hf_config({"model_type": "gemma3", "text_config": text})):
        assert config.architecture == "gemma3" and config.tie_word_embeddings
        assert config.layer_windows == tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(34))
        assert (config.rope_theta, config.rope_local_theta, config.rope_scaling_factor) == (1e6, 1e4, 8.0)
        assert config.attention_scale == 1 / 16 and config.final_logit_softcapping is None


def test_each_layer_spec_carries_its_window():
    config = ModelConfig.from_hf_config(_hf_model("mqa-window").config.to_dict())
    assert [s.window for s in layer_specs(config, "fp32")] == [5, 5, None, 5, 5, None]
    assert {g.spec.window for g in group_layers(layer_specs(config, "fp32"))} == {5, None}
    assert KVShape.from_model_config(config).layer_windows == (5, 5, None, 5, 5, None)


@pytest.mark.parametrize("field, value, words", [
    ("model_type", "gemma2", "Unsupported model_type 'gemma2'"),
    ("attn_logit_softcapping", 50.0, "softcapping is not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "RoPE scaling 'yarn' is not supported"),
    ("layer_types", ["sliding_attention", "chunked_attention"], "layer_types must name"),
])
def test_unsupported_configs_are_one_clear_sentence(field, value, words):
    config = {"model_type": "gemma3_text", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 2, "num_attention_heads": 1, "head_dim": 8, field: value}
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_hf_config(config)


GGUF_META = {"general.architecture": "gemma3", "gemma3.embedding_length": 640, "gemma3.block_count": 4,
             "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
             "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
             "gemma3.context_length": 32768, "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512}


def test_gguf_metadata_with_llama_cpps_defaults_and_an_explicit_pattern():
    config = ModelConfig.from_gguf_metadata(GGUF_META, vocab_size=300, has_output_weight=False)
    assert config.layer_windows == (512, 512, 512, 512)  # every 6th layer global: none of the first 4
    assert (config.rope_local_theta, config.query_pre_attn_scalar, config.tie_word_embeddings) == (1e4, 256, True)
    explicit = {**GGUF_META, "gemma3.attention.sliding_window_pattern": [True, False, True, False],
                "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    config = ModelConfig.from_gguf_metadata(explicit, vocab_size=300, has_output_weight=True)
    assert config.layer_windows == (512, None, 512, None) and config.rope_scaling_factor == 8.0


def test_an_unsupported_gguf_architecture_is_one_sentence():
    meta = {k.replace("gemma3", "gemma2"): v for k, v in GGUF_META.items()} | {"general.architecture": "gemma2"}
    with pytest.raises(ValueError, match=r"^Unsupported GGUF architecture 'gemma2'; kvcache runs llama, "
                                         r"mistral, qwen2, gemma3 models\.$"):
        ModelConfig.from_gguf_metadata(meta, vocab_size=300, has_output_weight=False)
