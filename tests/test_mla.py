"""DeepSeek-V2/V3 (MLA): our model against HF transformers on tiny random configs (float32), loaded
from a save_pretrained folder through our loader and run through the paged engine; the cache holds
one latent vector per token, decodes attend in the latent space, and the bytes planned are the
bytes allocated."""

import json

import pytest
import torch
from tiny_models import byte_tokenizer, run_recording_logits

from kvcache.cache.spec import group_layers, layer_specs
from kvcache.config import ModelConfig, SamplingParams, SchedulerConfig
from kvcache.engine.engine import LLMEngine, build_model
from kvcache.models.loader import load_model
from kvcache.runtime.reference import greedy_without_cache, logits_without_cache
from kvcache.sizing import KVShape, kv_bytes

transformers = pytest.importorskip("transformers")

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_attention_heads=4,
              num_key_value_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=512,
              rms_norm_eps=1e-6, n_shared_experts=1, num_experts_per_tok=2)
CONFIGS = {
    # V3: q_lora, one dense layer then MoE (sigmoid gate, correction bias, 4 groups of 2, best 2 groups)
    "v3-qlora-moe": ("DeepseekV3", dict(q_lora_rank=32, num_hidden_layers=3, first_k_dense_replace=1,
                                        n_routed_experts=8, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    # V3: plain q_proj, YaRN (mscale != mscale_all_dim, so both the cos/sin and the softmax scale move),
    # not interleaved, all MoE, norm_topk_prob off
    "v3-yarn-plainq": ("DeepseekV3", dict(q_lora_rank=None, num_hidden_layers=2, first_k_dense_replace=0,
                                          n_routed_experts=4, n_group=2, topk_group=1, norm_topk_prob=False,
                                          rope_interleave=False, max_position_embeddings=2048,
                                          rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                           "original_max_position_embeddings": 128,
                                                           "mscale": 0.9, "mscale_all_dim": 0.7,
                                                           "beta_fast": 32, "beta_slow": 1})),
    # V2: softmax gate, group-limited greedy (both experts from the best of 2 groups), q_lora, dense first layer, routed scaling
    "v2-group-limited": ("DeepseekV2", dict(q_lora_rank=32, num_hidden_layers=3, first_k_dense_replace=1,
                                            n_routed_experts=8, n_group=2, topk_group=1,
                                            topk_method="group_limited_greedy", routed_scaling_factor=1.5)),
    # V2: plain q_proj, greedy top-k, every layer dense but one
    "v2-greedy-plainq": ("DeepseekV2", dict(q_lora_rank=None, num_hidden_layers=2, first_k_dense_replace=1,
                                            n_routed_experts=4, topk_method="greedy")),
}


def _hf_model(name: str):
    family, extra = CONFIGS[name]
    torch.manual_seed(sum(map(ord, name)))
    cfg = getattr(transformers, f"{family}Config")(**{**COMMON, **extra})
    cfg._attn_implementation = "eager"
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # random norms, gates and biases, so a wrong wiring cannot hide behind ones and zeros
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
            elif "gate.weight" in n:
                p.normal_(0, 0.5)
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(torch.randn_like(b) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(HF model, its save_pretrained folder with a tokenizer, as our loader reads it)."""
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return hf, folder


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [len(ids), vocab]


def _prompts(lengths, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def test_prefill_logits_match_transformers(pair):
    hf, folder = pair
    ours = build_model(load_model(folder), "float32", torch.device("cpu"))
    ids = _prompts([29])[0]
    torch.testing.assert_close(logits_without_cache(ours, ids, block_size=4), _hf_logits(hf, ids),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "expanded"])
def test_batched_chunked_decode_logits_match_transformers(pair, absorb):
    """Three prompts of different lengths in one continuous batch, chunked prefill: every sampled
    step's logits equal HF's at that position, decoding absorbed (latent space) or up-projected."""
    hf, folder = pair
    engine = LLMEngine(str(folder), block_size=4, num_blocks=64, device="cpu",
                       scheduler_config=SchedulerConfig(max_num_batched_tokens=12, long_prefill_token_threshold=6))
    engine.model.absorb_decode = absorb
    prompts = _prompts((9, 17, 3))
    runs = run_recording_logits(engine, prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for (output, logits), prompt in zip(runs, prompts):
        expected = _hf_logits(hf, prompt + output[:-1])[len(prompt) - 1:]  # [8, vocab]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        assert output == expected.argmax(-1).tolist()
