"""Helpers for the tests that run tiny random models against HF transformers: a real byte-level
tokenizer over a 256-token vocabulary, and an engine run that keeps every step's logits."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from kvcache.config import ModelConfig, SamplingParams
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import LoadedModel
from kvcache.models.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
    """A real byte-level tokenizer over the tiny vocabulary (one token per byte, no merges)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=frozenset(), add_bos=False, chat_template=None)


def tiny_llama(hidden: int = 96, heads: int = 6, kv_heads: int = 2, head_dim: int = 16, layers: int = 3,
               intermediate: int = 160, window: int | None = None, seed: int = 7, std: float = 0.15,
               tied: bool = True, **extra) -> LoadedModel:
    """A random llama (mistral with a sliding ``window``) over the byte tokenizer's 256 tokens, its
    weights named as on the Hub: norms near 1, matrices gaussian with deviation ``std``; the output
    head is the embedding (``tied``) or a matrix of its own."""
    config = ModelConfig.from_hf_config(dict(
        model_type="mistral" if window else "llama", vocab_size=256, hidden_size=hidden,
        intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tied, sliding_window=window, **extra))
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (256, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (256, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, q),
                   p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                   p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    gen = torch.Generator().manual_seed(seed)
    weights = {n: (1 + 0.1 * torch.randn(s, generator=gen)) if len(s) == 1 else std * torch.randn(s, generator=gen)
               for n, s in shapes.items()}
    return LoadedModel(config, weights, byte_tokenizer(), "tiny")


def run_recording_logits(engine: LLMEngine, prompts: list[list[int]],
                         params: SamplingParams) -> list[tuple[list[int], torch.Tensor]]:
    """Run ``prompts`` together to the end; per prompt, (its output tokens, the logits the real
    runner returned for each of its sampled steps [max_tokens, vocab], or for every row a step
    verifying drafts returned). The recording changes nothing."""
    seen: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def recording(plan):
        out = execute(plan)
        for rid, (rows, _) in out.rows().items():  # one row, or k + 1 when k drafts are verified
            seen.setdefault(rid, []).extend(row.clone() for row in rows)
        return out
    engine.runner.execute = recording
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    engine.runner.execute = execute
    return [(list(done[rid].outputs[0].token_ids), torch.stack(seen[f"{rid}#0"])) for rid in ids]
