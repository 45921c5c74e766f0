"""DeepSeek-V2/V3 (MLA): our model against HF transformers on tiny random configs (float32), loaded
from a save_pretrained folder through our loader and run through the paged engine; the cache holds
one latent vector per token, decodes attend in the latent space, and the bytes planned are the
bytes allocated."""

import json
import math

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


def test_cached_greedy_equals_recomputation(pair):
    """Greedy tokens through the paged cache (absorbed decodes, prefix sharing, two lengths in one
    batch) equal greedy tokens recomputed from scratch every step."""
    _, folder = pair
    engine = LLMEngine(str(folder), block_size=4, num_blocks=64, device="cpu")
    prompts = _prompts((11, 5), seed=5)
    runs = run_recording_logits(engine, prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for (output, _), prompt in zip(runs, prompts):
        assert output == greedy_without_cache(engine.model, prompt, 12)


def _random_cache(latent_dim: int, seq_lens: list[int], block_size: int, seed: int, kv_format: str):
    """A latent cache with random vectors for sequences of ``seq_lens`` tokens in shuffled blocks,
    and the metadata of one decode step of each (the longest first, as the scheduler orders them)."""
    from kvcache.cache.spec import KVCacheGroup, KVSpec
    from kvcache.cache.storage import KVCache
    from kvcache.models.attention import AttentionMetadata, build_masks

    gen = torch.Generator().manual_seed(seed)
    widths = [-(-n // block_size) for n in seq_lens]
    order = torch.randperm(sum(widths), generator=gen).tolist()
    tables, start = [], 0
    for w in widths:
        tables.append(order[start:start + w] + [0] * (max(widths) - w))
        start += w
    storage = KVCache((KVCacheGroup(0, KVSpec(1, latent_dim, kv_format, None, latent_dim), (0,)),), sum(widths),
                      block_size)
    slots = torch.tensor([t[p // block_size] * block_size + p % block_size
                          for t, n in zip(tables, seq_lens) for p in range(n)])
    storage.layers[0].write(torch.randn(len(slots), 1, latent_dim, generator=gen), None, slots)
    last = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                         for t, n in zip(tables, seq_lens)])
    meta = AttentionMetadata(last, [1] * len(seq_lens), seq_lens, torch.tensor(tables), block_size, len(seq_lens))
    build_masks(meta, "cpu")
    return storage.layers[0], meta


@pytest.mark.parametrize("kv_format", ["fp32", "int4"])
@pytest.mark.parametrize("seq_lens", [[1], [37], [40, 33, 30, 29, 9, 2]])
def test_absorbed_decode_equals_the_up_projected_reference(seq_lens, kv_format):
    """Attention in the latent space (W_uk folded into the query, W_uv into the output) equals
    up-projecting every cached latent into per-head keys and values, for a batch of decodes of
    different lengths (padded and masked together) as for one."""
    from kvcache.models.mla import absorbed_decode, expanded_mla_attention

    heads, rank, rope, nope, v = 4, 24, 8, 16, 12
    cache, meta = _random_cache(rank + rope, seq_lens, block_size=4, seed=len(seq_lens), kv_format=kv_format)
    gen = torch.Generator().manual_seed(7)
    kv_b = torch.randn(heads, nope + v, rank, generator=gen) / rank ** 0.5
    w = (kv_b[:, :nope], kv_b[:, nope:])
    q_nope, q_pe = torch.randn(len(seq_lens), heads, nope, generator=gen), torch.randn(len(seq_lens), heads, rope,
                                                                                       generator=gen)
    absorbed = absorbed_decode(q_nope, q_pe, cache, meta, w, scale=0.2)
    expanded = expanded_mla_attention(q_nope, q_pe, cache, meta, w, scale=0.2)
    assert absorbed.shape == (len(seq_lens), heads, v)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_cache_dtype, element_bytes", [("auto", 4), ("bfloat16", 2)])
def test_bytes_planned_equal_bytes_allocated(pair, kv_cache_dtype, element_bytes):
    """Each token costs every layer kv_lora_rank + qk_rope_head_dim values, no more: the planner, the
    allocation, the bytes a sequence holds and engine.stats() agree."""
    _, folder = pair
    engine = LLMEngine(str(folder), block_size=4, kv_cache_memory=200_000, device="cpu",
                       kv_cache_dtype=kv_cache_dtype)
    config = engine.model_config
    per_token = config.num_layers * (config.mla.kv_lora_rank + config.mla.qk_rope_head_dim) * element_bytes
    storage = engine.storage
    assert [g.spec.latent_dim for g in engine.kv_groups] == [32]
    assert storage.nbytes == storage.planned_nbytes() == storage.num_blocks * 4 * per_token
    assert storage.num_blocks == 200_000 // (4 * per_token)
    assert storage.bytes_per_token == per_token and storage.bytes_per_element == element_bytes
    fmt = "fp32" if element_bytes == 4 else "bf16"
    assert storage.bytes_held(13) == kv_bytes(KVShape.from_model_config(config), 13, dtype=fmt).total_bytes \
        == 13 * per_token
    engine.add_request("r", _prompts([13])[0], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()  # the prompt's 13 tokens: 4 blocks
    stats = engine.stats()
    assert stats["num_blocks_used"] == 4 and stats["kv_bytes_used"] == 4 * 4 * per_token
    assert stats["kv_cache_bytes"] == storage.nbytes and stats["groups"][0]["bytes_used"] == 4 * 4 * per_token


def test_size_cli_counts_the_latent(pair, capsys):
    """``kvcache size --model <folder>`` plans what the engine allocates."""
    from kvcache.cli import main

    _, folder = pair
    assert main(["size", "--model", str(folder), "--seq-len", "1000", "--dtype", "fp32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    config = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert result["mla_latent_dim"] == 32
    assert result["bytes"] == 1000 * config.num_layers * 32 * 4


QUANT_ERROR = {"fp8": 0.05, "int8": 0.05, "int4": 0.15}  # largest logit error / largest logit


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "int8", "int4"])
def test_quantized_latent_caches(pair, kv_cache_dtype):
    """fp8 / int8 / int4 latents: the planner's bytes are the allocation's and a sequence's, and the
    logits stay near HF's float32 ones (the decode reads through the format, absorbed or not alike)."""
    hf, folder = pair
    engine = LLMEngine(str(folder), block_size=4, num_blocks=32, device="cpu", kv_cache_dtype=kv_cache_dtype)
    storage, shape = engine.storage, KVShape.from_model_config(engine.model_config)
    assert storage.kv_format == kv_cache_dtype and storage.nbytes == storage.planned_nbytes()
    assert storage.bytes_held(13) == kv_bytes(shape, 13, dtype=kv_cache_dtype, block_size=4).total_bytes
    assert storage.bytes_held(13) < kv_bytes(shape, 13, dtype="bf16").total_bytes
    prompts = _prompts((9, 14), seed=3)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    runs = run_recording_logits(engine, prompts, params)
    engine.model.absorb_decode = False
    for ((output, logits), prompt), (expanded_output, expanded) in zip(zip(runs, prompts),
                                                                       run_recording_logits(engine, prompts, params)):
        expected = _hf_logits(hf, prompt + output[:-1])[len(prompt) - 1:]
        assert (logits - expected).abs().max() < QUANT_ERROR[kv_cache_dtype] * expected.abs().max()
        assert output == expanded_output
        torch.testing.assert_close(logits, expanded, atol=1e-4, rtol=1e-4)


def test_a_bfloat16_engine_runs_and_mostly_agrees(pair):
    hf, folder = pair
    engine = LLMEngine(str(folder), dtype="bfloat16", block_size=4, num_blocks=32, device="cpu")
    prompt = _prompts([10], seed=9)[0]
    [(output, logits)] = run_recording_logits(engine, [prompt], SamplingParams(max_tokens=4, temperature=0.0,
                                                                                ignore_eos=True))
    expected = _hf_logits(hf, prompt + output[:-1])[len(prompt) - 1:]
    assert torch.isfinite(logits).all() and (logits - expected).abs().max() < 0.1


HUB_V3 = {  # deepseek-ai/DeepSeek-V3's config.json, the facts kvcache reads
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "num_nextn_predict_layers": 1,
}


def test_the_hubs_deepseek_v3_config():
    config = ModelConfig.from_hf_config(HUB_V3)
    assert (config.architecture, config.mla.latent_dim, config.mla.q_lora_rank, config.head_dim) == \
        ("deepseek_v3", 576, 1536, 192)
    assert (config.moe.topk_method, config.moe.first_dense, config.moe.is_moe_layer(2), config.moe.is_moe_layer(3)) \
        == ("noaux_tc", 3, False, True)
    assert config.yarn.cos_sin_factor() == 1.0 and config.yarn.softmax_scale_factor() == pytest.approx(
        (0.1 * math.log(40) + 1) ** 2)
    assert KVShape.from_model_config(config).mla_latent_dim == 576
    assert [s.latent_dim for s in layer_specs(config, "bf16")] == [576] * 61
    assert len(group_layers(layer_specs(config, "bf16"))) == 1


@pytest.mark.parametrize("field, value, words", [
    ("kv_lora_rank", None, "missing the field 'kv_lora_rank'"),
    ("scoring_func", "softplus", "MoE scoring_func 'softplus' is not supported"),
    ("rope_scaling", {"type": "longrope", "factor": 2.0}, "RoPE scaling 'longrope' is not supported"),
    ("n_group", 3, "n_group \\(3\\) must divide n_routed_experts \\(256\\)"),
    ("hidden_act", "gelu", "activation 'gelu' is not supported"),
])
def test_unsupported_deepseek_configs_are_one_clear_sentence(field, value, words):
    config = {k: v for k, v in HUB_V3.items() if not (field == "kv_lora_rank" and k == field)}
    if field != "kv_lora_rank":
        config[field] = value
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_hf_config(config)


def test_generate_and_size_commands_on_a_deepseek_folder(pair, capsys):
    """``kvcache generate`` runs the folder and its KV figures match the formula it prints (the
    latent one); ``kvcache size`` says MLA in words."""
    from kvcache.cli import main

    _, folder = pair
    assert main(["generate", "abc", "--model", str(folder), "--max-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "latent values" in err and "(match)" in err
    assert main(["size", "--model", str(folder), "--seq-len", "100"]) == 0
    assert "MLA: one latent vector" in capsys.readouterr().out
