"""The llama family (Llama, Mistral, Qwen2, SmolLM2): our own PyTorch forward over a paged KV cache.

``forward(tokens, positions, attn_metadata, kv)`` runs a flat batch of tokens from any number of
sequences; the model never owns K/V tensors, it reads and writes them through ``kv`` (one
:class:`LayerCache` per layer) and the plan in ``attn_metadata`` (one per cache group).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvcache.cache.storage import LayerCache
from kvcache.config import ModelConfig
from kvcache.models.attention import AttentionMetadata, default_scale, paged_attention

AttentionFn = Callable[..., torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to the model's context, HF's rotate_half convention."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the tables in float32 on the buffers' device (also after a meta-device build)."""
        if self.cos.is_meta:
            return
        hd, device = self.head_dim, self.cos.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
        freqs = torch.outer(torch.arange(self.max_positions, device=device).float(), inv_freq)  # [pos, hd/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [pos, hd]
        self.cos = angles.cos()
        self.sin = angles.sin()

    def tables_for(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for these positions, each [T, 1, hd]; computed once per step, used by every layer."""
        cos = self.cos.index_select(0, positions).unsqueeze(1).to(dtype)
        sin = self.sin.index_select(0, positions).unsqueeze(1).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [T, heads, hd] rotated by each token's position (HF's rotate_half convention)."""
    cos, sin = cos_sin
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        # Q, K and V projections fused into one matmul: [q_size + 2 * kv_size, hidden]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.output_bias)
        self.scale = default_scale(self.head_dim)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], cache: LayerCache,
                meta: AttentionMetadata, attention_fn: AttentionFn) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = apply_rope(q.view(-1, self.num_heads, self.head_dim), cos_sin)  # [T, heads, hd]
        k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), cos_sin)  # [T, kv_heads, hd]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = attention_fn(q, k, v, cache, meta, self.scale)  # [T, heads, hd]
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        # gate and up projections fused: [2 * intermediate, hidden]
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # _weight: no random init, the weights are always loaded (normal_ on the meta device costs ~2 s of imports)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention_fn: AttentionFn = paged_attention

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: Sequence[AttentionMetadata],
                kv: Sequence[LayerCache]) -> torch.Tensor:
        """tokens, positions [T] -> final hidden states [T, hidden]; ``meta[g]`` is cache group g's plan."""
        h = self.embed_tokens(tokens)
        cos_sin = self.rope.tables_for(positions, h.dtype)
        for layer, cache in zip(self.layers, kv):
            h = h + layer.self_attn(layer.input_layernorm(h), cos_sin, cache, meta[cache.group_id],
                                    self.attention_fn)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take Hugging Face-named tensors as parameters, fusing Q/K/V and gate/up (a view when they are
        adjacent already, else a copy); every tensor must be used."""
        weights = _WeightSource(weights)
        own = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for i in range(self.config.num_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            mapped[dst + "self_attn.qkv_proj.weight"] = weights.fused(
                [src + f"self_attn.{p}_proj.weight" for p in "qkv"])
            if self.config.attention_bias:
                mapped[dst + "self_attn.qkv_proj.bias"] = weights.fused(
                    [src + f"self_attn.{p}_proj.bias" for p in "qkv"])
            mapped[dst + "mlp.gate_up_proj.weight"] = weights.fused(
                [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"])
            if self.config.output_bias:
                mapped[dst + "self_attn.o_proj.bias"] = weights.pop(src + "self_attn.o_proj.bias")
            for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                         "post_attention_layernorm.weight"):
                mapped[dst + name] = weights.pop(src + name)
        mapped["embed_tokens.weight"] = weights.pop("model.embed_tokens.weight")
        mapped["norm.weight"] = weights.pop("model.norm.weight")
        if self.lm_head is not None:
            mapped["lm_head.weight"] = weights.pop("lm_head.weight")
        else:
            weights.pop("lm_head.weight", None)
        leftover = [k for k in weights.remaining() if "rotary_emb" not in k]
        if leftover:
            raise ValueError(f"The weights hold tensors this architecture does not use: {leftover[:4]}.")
        for name, tensor in mapped.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"Weight {name} has shape {tuple(tensor.shape)}; the config says "
                                 f"{tuple(own[name].shape)}.")
        self.load_state_dict(mapped, strict=False, assign=True)  # take the tensors as they are: no second copy

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


class _WeightSource:
    """Hands out named tensors once each; a missing one is a clear error, not a KeyError."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self._weights = dict(weights)

    def pop(self, name: str, *default: None) -> torch.Tensor:
        if name not in self._weights and not default:
            raise ValueError(f"The weights have no tensor {name!r}; they do not match this architecture.")
        return self._weights.pop(name, *default)

    def fused(self, parts: list[str]) -> torch.Tensor:
        """The row-wise concatenation of ``parts``: a view, with no copy, when they already lie one
        after another in one storage (as kvcache's converted cache hands them out), else a new tensor."""
        tensors = [self.pop(part) for part in parts]
        first = tensors[0]
        end = first.data_ptr()
        for t in tensors:
            if not t.is_contiguous() or t.data_ptr() != end or t.shape[1:] != first.shape[1:] \
                    or t.dtype != first.dtype or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
                return torch.cat(tensors)
            end += t.numel() * t.element_size()
        rows = sum(t.shape[0] for t in tensors)
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]),
                                       first.stride())

    def remaining(self) -> list[str]:
        return list(self._weights)
