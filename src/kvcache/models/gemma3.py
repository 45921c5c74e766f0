"""Gemma-3 (text): our own PyTorch forward over a paged KV cache, with the llama family's calling
convention (``forward(tokens, positions, attn_metadata, kv)``, ``compute_logits``).

What sets it apart from llama, layer by layer:

    h = embed(tokens) * sqrt(hidden)
    per layer:  a = attn(norm_in(h))          q and k RMS-normalized per head before RoPE;
                h = h + norm_post_attn(a)     scores scaled by query_pre_attn_scalar ** -0.5;
                m = mlp(norm_pre_ffw(h))      sliding layers: window + local RoPE base (10k),
                h = h + norm_post_ffw(m)      global layers: every token + global base (1M)
    logits = lm_head(norm(h)), soft-capped where the config says

Every norm scales by ``1 + weight`` (:class:`OffsetRMSNorm`); the MLP is GELU-tanh gated. Which
layers slide, and their windows, come from ``config.layer_windows``; the runner hands each layer
the metadata of its cache group, whose window the attention masks with.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kvcache.cache.storage import LayerCache
from kvcache.config import ModelConfig
from kvcache.models.attention import AttentionMetadata, paged_attention
from kvcache.models.layers import (AttentionFn, Attention, GatedMLP, OffsetRMSNorm, RotaryEmbedding, gelu_tanh,
                                   head_weight, vocab_logits)
from kvcache.models.packed import held_bytes
from kvcache.models.weights import assign_weights, map_hf_weights

_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


class QKNormAttention(Attention):
    """Attention whose per-head queries and keys are RMS-normalized (Gemma-3's q_norm / k_norm)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, config.attention_scale)
        self.q_norm = OffsetRMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(config.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)  # [T, heads, hd], [T, kv_heads, hd] x 2
        return self.q_norm(q), self.k_norm(k), v


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = QKNormAttention(config)
        self.mlp = GatedMLP(config, gelu_tanh)
        for name in _LAYER_NORMS:
            setattr(self, name, OffsetRMSNorm(config.hidden_size, config.rms_norm_eps))

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], cache: LayerCache,
                meta: AttentionMetadata, attention_fn: AttentionFn) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos_sin, cache, meta,
                                                             attention_fn))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3ForCausalLM(nn.Module):
    packs_weights = True  # projections and embeddings may be kept packed (kvcache.models.packed)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # _weight: no random init, the weights are always loaded
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.embed_scale = config.hidden_size ** 0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.global_rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling_factor)
        self.local_rope = RotaryEmbedding(config.head_dim, config.rope_local_theta or config.rope_theta)
        self.sliding = [config.window_of(i) is not None for i in range(config.num_layers)]
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention_fn: AttentionFn = paged_attention

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (both RoPE bases' frequencies), e.g. after a meta build."""
        self.global_rope.reset_tables()
        self.local_rope.reset_tables()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: Sequence[AttentionMetadata],
                kv: Sequence[LayerCache]) -> torch.Tensor:
        """tokens, positions [T] -> final hidden states [T, hidden]; ``meta[g]`` is cache group g's plan."""
        h = self.embed_tokens(tokens)
        h = h * torch.tensor(self.embed_scale).to(h.dtype)  # sqrt(hidden) rounded to float32, then the model's dtype (as HF)
        rope = {True: self.local_rope.tables_for(positions, h.dtype),
                False: self.global_rope.tables_for(positions, h.dtype)}
        for layer, sliding, cache in zip(self.layers, self.sliding, kv):
            h = layer(h, rope[sliding], cache, meta[cache.group_id], self.attention_fn)
        return self.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab], soft-capped where the config says."""
        weight = head_weight(self.embed_tokens if self.lm_head is None else self.lm_head)
        logits = vocab_logits(hidden, weight).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take Hugging Face-named tensors (Gemma3ForCausalLM's names, norms centred on 0) as
        parameters, fusing Q/K/V and gate/up; every tensor must be used."""
        plain = tuple(f"{n}.weight" for n in _LAYER_NORMS) + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
        assign_weights(self, map_hf_weights(self.config, weights, plain, tied=self.lm_head is None))

    def weight_bytes(self) -> int:
        return held_bytes(self)
