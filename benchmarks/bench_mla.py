"""MLA (a DeepSeek-style latent cache) against standard MHA caching: bytes held per token, and
decode speed with the decode absorbed into the latent space against up-projecting the cache.

    flock /tmp/kvcache-bench.lock env OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_mla.py \\
        [--contexts 1024 8192] [--steps 8 3]

The model: 8 layers, hidden 1024, 16 heads, kv_lora_rank 256, qk_rope_head_dim 64, qk_nope_head_dim
128, v_head_dim 128, dense gated MLP, random weights, float32 (a deepseek_v3 config.json read by the
loader's parser). Each layer caches 256 + 64 = 320 values per token; standard MHA caching of the
same attention keeps 16 heads x (192 key + 128 value) = 5,120, the bytes of 2 x 16 kv heads x 160
(the MHA row is that shape in our own paged storage, which needs keys and values of one width).

Bytes: the planner's number per token, and the bytes the engine holds after a real prefill of
``--held-tokens`` tokens (``stats()["kv_bytes_used"]``, whole blocks) / the bytes of an MHA
storage of exactly the blocks those tokens fill. Speed: one decode step of the model (every layer, the LM head) at each context, the
cache filled with random latents, over the runner's own plan for that step (no scheduler); best of
``--steps`` runs after a warm-up, absorbed then up-projected, and the largest logit difference
between the two.
"""

from __future__ import annotations

import argparse
import time

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from common import cpu_description
from kvcache import SamplingParams
from kvcache.cache.spec import KVSpec, group_layers
from kvcache.cache.storage import KVCache
from kvcache.config import ModelConfig
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import LoadedModel
from kvcache.models.tokenizer import Tokenizer
from kvcache.runtime.plan import ScheduledSequence
from kvcache.sizing import KVShape, human_bytes, kv_bytes

CONFIG = {"model_type": "deepseek_v3", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
          "num_hidden_layers": 8, "num_attention_heads": 16, "kv_lora_rank": 256, "q_lora_rank": None,
          "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "n_routed_experts": None,
          "max_position_embeddings": 16384, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
MHA_HEAD_DIM = (128 + 64 + 128) // 2  # keys 192 + values 128 per head = 2 x 160
BLOCK_SIZE = 16


def random_model(config: ModelConfig, seed: int = 0) -> LoadedModel:
    """Random weights under DeepSeek's Hugging Face names (std 0.02, norms 1)."""
    gen = torch.Generator().manual_seed(seed)
    mla, h, heads = config.mla, config.hidden_size, config.num_heads
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (heads * mla.qk_head_dim, h),
                   p + "self_attn.kv_a_proj_with_mqa.weight": (mla.latent_dim, h),
                   p + "self_attn.kv_a_layernorm.weight": (mla.kv_lora_rank,),
                   p + "self_attn.kv_b_proj.weight": (heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
                   p + "self_attn.o_proj.weight": (h, heads * mla.v_head_dim),
                   p + "mlp.gate_proj.weight": (config.intermediate_size, h),
                   p + "mlp.up_proj.weight": (config.intermediate_size, h),
                   p + "mlp.down_proj.weight": (h, config.intermediate_size)}
    weights = {name: torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
               for name, shape in shapes.items()}
    tokenizer = Tokenizer(HFTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), bos_token_id=None,
                          eos_token_ids=frozenset(), add_bos=False, chat_template=None)
    return LoadedModel(config, weights, tokenizer, "random")


def bytes_rows(loaded: LoadedModel, tokens: int) -> list[tuple[str, float, float]]:
    """(cache, planner bytes per token, bytes held per token after ``tokens`` tokens)."""
    config = loaded.config
    mla_planned = kv_bytes(KVShape.from_model_config(config), tokens, dtype="fp32").bytes_per_token
    engine = LLMEngine(loaded=loaded, block_size=BLOCK_SIZE, kv_cache_memory="64MiB", device="cpu",
                       enable_prefix_caching=False)
    ids = torch.randint(1, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.add_request("held", ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while not engine.scheduler.running or engine.scheduler.running[0].num_computed_tokens < tokens:
        engine.step()
    mla_held = engine.stats()["kv_bytes_used"] / tokens
    mha_shape = KVShape(config.num_layers, config.num_heads, MHA_HEAD_DIM)
    mha_planned = kv_bytes(mha_shape, tokens, dtype="fp32").bytes_per_token
    spec = KVSpec(config.num_heads, MHA_HEAD_DIM, "fp32")
    mha = KVCache(group_layers((spec,) * config.num_layers), -(-tokens // BLOCK_SIZE), BLOCK_SIZE)
    return [("MLA latent (ours)", mla_planned, mla_held), ("MHA heads", mha_planned, mha.nbytes / tokens)]


def decode_step_seconds(engine: LLMEngine, context: int, steps: int) -> dict[bool, tuple[float, torch.Tensor]]:
    """Best seconds of one decode step at ``context`` tokens (absorbed: True / up-projected: False),
    and its logits."""
    storage, model = engine.storage, engine.model
    blocks = -(-(context + 1) // BLOCK_SIZE)
    gen = torch.Generator().manual_seed(context)
    slots = torch.arange(context)
    for cache in storage.layers:  # the context's latents, as a prefill would have left them (random)
        cache.write(torch.randn(context, 1, cache.group.group.spec.head_dim, generator=gen), None, slots)
    seq = ScheduledSequence("decode", (7,), context, (tuple(range(blocks)),), True)
    tokens, positions, meta = engine.runner.prepare((seq,))
    results = {}
    for absorb in (True, False):
        model.absorb_decode = absorb

        def step() -> torch.Tensor:
            return model.compute_logits(model(tokens, positions, meta, storage.layers)[-1:])
        logits = step()  # warm-up
        best = float("inf")
        for _ in range(steps):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        results[absorb] = (best, logits)
    model.absorb_decode = True
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 3], help="timed decode steps per context")
    parser.add_argument("--held-tokens", type=int, default=1024)
    args = parser.parse_args()
    print(f"# CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    config = ModelConfig.from_hf_config(CONFIG)
    loaded = random_model(config)
    mla = config.mla
    print(f"# model: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads, kv_lora_rank "
          f"{mla.kv_lora_rank}, qk_rope {mla.qk_rope_head_dim}, qk_nope {mla.qk_nope_head_dim}, v {mla.v_head_dim}, "
          "dense MLP, random weights, float32")
    print(f"\n## KV bytes per token (fp32, all {config.num_layers} layers; held after {args.held_tokens:,} tokens)")
    print(f"{'cache':<20} {'planned B/token':>16} {'held B/token':>14}")
    rows = bytes_rows(loaded, args.held_tokens)
    for name, planned, held in rows:
        print(f"{name:<20} {planned:>16,.0f} {held:>14,.0f}")
    print(f"MHA / MLA: {rows[1][1] / rows[0][1]:.1f}x the bytes; at {max(args.contexts):,} tokens "
          f"{human_bytes(rows[1][1] * max(args.contexts))} vs {human_bytes(rows[0][1] * max(args.contexts))}")
    engine = LLMEngine(loaded=loaded, block_size=BLOCK_SIZE, device="cpu", enable_prefix_caching=False,
                       kv_cache_memory=int(rows[0][1] * (max(args.contexts) + 2 * BLOCK_SIZE)))
    print("\n## decode, batch 1: tokens/s (best step)")
    print(f"{'context':>8} {'absorbed':>10} {'up-projected':>13} {'speed-up':>9} {'max |logit diff|':>17}")
    for context, steps in zip(args.contexts, args.steps + args.steps[-1:] * len(args.contexts)):
        result = decode_step_seconds(engine, context, steps)
        (absorbed, a_logits), (expanded, e_logits) = result[True], result[False]
        print(f"{context:>8,} {1 / absorbed:>10.2f} {1 / expanded:>13.2f} {expanded / absorbed:>8.1f}x "
              f"{(a_logits - e_logits).abs().max().item():>17.2e}", flush=True)


if __name__ == "__main__":
    main()
