"""The llama family (Llama, Mistral, Qwen2, SmolLM2): our own PyTorch forward over a paged KV cache.

``forward(tokens, positions, attn_metadata, kv)`` runs a flat batch of tokens from any number of
sequences; the model never owns K/V tensors, it reads and writes them through ``kv`` (one
:class:`LayerCache` per layer) and the plan in ``attn_metadata`` (one per cache group).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvcache.cache.storage import LayerCache
from kvcache.config import ModelConfig
from kvcache.models import fused_decode
from kvcache.models.attention import AttentionMetadata, default_scale, paged_attention
from kvcache.models.layers import AttentionFn, Attention, GatedMLP, RMSNorm, RotaryEmbedding, head_weight, vocab_logits
from kvcache.models.packed import held_bytes
from kvcache.models.weights import assign_weights, map_hf_weights


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, default_scale(config.head_dim))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config, F.silu)


class LlamaForCausalLM(nn.Module):
    packs_weights = True  # projections and embeddings may be kept packed (kvcache.models.packed)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # _weight: no random init, the weights are always loaded (normal_ on the meta device costs ~2 s of imports)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(self.build_layer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = self.build_rope(config)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention_fn: AttentionFn = paged_attention
        self._fused: dict[int, fused_decode.FusedDecode | None] = {}  # by id of the caches it runs over

    @staticmethod
    def build_layer(config: ModelConfig, index: int) -> nn.Module:
        """Decoder layer ``index``: norms, ``self_attn(x, cos_sin, cache, meta, attention_fn)``, ``mlp``."""
        return DecoderLayer(config)

    @staticmethod
    def build_rope(config: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(config.head_dim, config.rope_theta)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (RoPE frequencies), e.g. after a meta-device build."""
        self.rope.reset_tables()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: Sequence[AttentionMetadata],
                kv: Sequence[LayerCache]) -> torch.Tensor:
        """tokens, positions [T] -> final hidden states [T, hidden]; ``meta[g]`` is cache group g's plan."""
        fused = self._fused_decode(kv) if fused_decode.applies(self, tokens, meta) else None
        if fused is not None:
            return self.norm(fused.run(tokens, positions, meta))
        h = self.embed_tokens(tokens)
        cos_sin = self.rope.tables_for(positions, h.dtype)
        for layer, cache in zip(self.layers, kv):
            h = h + layer.self_attn(layer.input_layernorm(h), cos_sin, cache, meta[cache.group_id],
                                    self.attention_fn)
            h = h + layer.mlp(layer.post_attention_layernorm(h), meta[cache.group_id].decode_rows)
        return self.norm(h)

    @torch.inference_mode()
    def forward_logits(self, tokens: torch.Tensor, positions: torch.Tensor, meta: Sequence[AttentionMetadata],
                       kv: Sequence[LayerCache], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``compute_logits(forward(tokens, positions, meta, kv)[rows])``: float32 [len(rows), vocab], and
        each row's argmax [len(rows)] where it came with them, else None. Where the fused decode runs and
        takes the head too, the final norm, the head and the argmax are computed in the same C call as
        the layers."""
        fused = self._fused_decode(kv) if 0 < tokens.shape[0] <= fused_decode.MAX_TOKENS else None
        if fused is not None and fused.computes_logits(tokens.shape[0]) and fused_decode.applies(self, tokens, meta):
            logits, best = fused.run(tokens, positions, meta, logits=True)  # [n, vocab], [n]
            # rows are increasing (logit_rows), so as many as the tokens are all of them: no copy
            return (logits, best) if rows.shape[0] == logits.shape[0] else (logits[rows], best[rows])
        return self.compute_logits(self(tokens, positions, meta, kv)[rows]), None

    def fused_step_tokens(self, kv: Sequence[LayerCache]) -> int:
        """How many tokens a decode or verification step over these caches may carry and still run as
        one fused C step (0 where the fused step never runs: other layers, dtypes, devices or caches)."""
        # (the fused decode exists only for float32 models on the CPU: FusedDecode.supports)
        fits = self.attention_fn is paged_attention and self._fused_decode(kv) is not None
        return fused_decode.MAX_TOKENS if fits else 0

    def _fused_decode(self, kv: Sequence[LayerCache]) -> fused_decode.FusedDecode | None:
        """The fused decode over these caches (built on first use; None where it cannot run)."""
        key = id(kv)
        if key not in self._fused:
            ok = all(type(layer) is DecoderLayer for layer in self.layers) and fused_decode.FusedDecode.supports(self, kv)
            if len(self._fused) >= 4:  # a few engines' caches at most (a draft model has its own)
                self._fused.pop(next(iter(self._fused)))
            self._fused[key] = fused_decode.FusedDecode(self, kv) if ok else None
        return self._fused[key]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        weight = head_weight(self.embed_tokens if self.lm_head is None else self.lm_head)
        return vocab_logits(hidden, weight).float()

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take Hugging Face-named tensors as parameters, fusing Q/K/V and gate/up (a view when they are
        adjacent already, else a copy); every tensor must be used."""
        plain = ("input_layernorm.weight", "post_attention_layernorm.weight")
        assign_weights(self, map_hf_weights(self.config, weights, plain, tied=self.lm_head is None))

    def weight_bytes(self) -> int:
        return held_bytes(self)
