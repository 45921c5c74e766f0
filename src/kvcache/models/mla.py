"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache that holds the latent, not the heads.

Per token, a layer caches one vector of ``latent_dim = kv_lora_rank + qk_rope_head_dim`` values,
``[c | k_pe]``: the normalized latent c and the rotated key part shared by every head. The heads'
keys and values are linear in c through kv_b_proj, whose rows split per head into W_uk and W_uv:

    k_nope[h] = W_uk[h] c        [qk_nope_head_dim]     q[h] = [q_nope[h] | q_pe[h]]
    v[h]      = W_uv[h] c        [v_head_dim]           k[h] = [k_nope[h] | k_pe]

Prefill up-projects the cached latents into per-head keys and values and runs ordinary attention
(:func:`expanded_attention`). Decode never does: it absorbs W_uk into the query and W_uv into the
output (:func:`absorbed_decode`), so each step reads only the latent cache:

    q[h] . k_t[h] = (W_uk[h]^T q_nope[h]) . c_t + q_pe[h] . k_pe_t = [q_lat[h] | q_pe[h]] . cached_t
    out[h]        = sum_t w_t W_uv[h] c_t = W_uv[h] (sum_t w_t c_t)

which is multi-query attention with one kv head of ``latent_dim`` values, so the decode reads
shared by every format (``key_scores``, ``weighted_values``) serve it unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvcache.cache.storage import LayerCache
from kvcache.config import ModelConfig, YarnConfig
from kvcache.models.attention import AttentionMetadata, _batched_decode, _gather, causal_mask
from kvcache.models.layers import CosSin, RMSNorm, RotaryEmbedding, apply_rope

MLAttentionFn = Callable[..., torch.Tensor]  # (q_nope, q_pe, cache, meta, (W_uk, W_uv), scale) -> [T, heads, v]
LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm use the default eps, not rms_norm_eps (as HF)


class YarnRotaryEmbedding(RotaryEmbedding):
    """RoPE with YaRN scaling: each frequency blended between its original and its value / factor by
    a linear ramp over the dims (high frequencies keep theirs), and cos/sin times the attention factor."""

    def __init__(self, head_dim: int, theta: float, yarn: YarnConfig) -> None:
        self.yarn = yarn
        super().__init__(head_dim, theta)

    def reset_tables(self) -> None:
        if self.inv_freq.is_meta:
            return
        hd, base, y = self.head_dim, self.theta, self.yarn
        original = 1.0 / (base ** (torch.arange(0, hd, 2, device=self.inv_freq.device, dtype=torch.float) / hd))

        def correction_dim(rotations: float) -> float:
            return hd * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
        if y.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, hd - 1)
        ramp = (torch.arange(hd // 2, device=original.device, dtype=torch.float32) - low) / max(high - low, 1e-3)
        keep = 1 - ramp.clamp(0, 1)  # 1: the original frequency, 0: interpolated
        self.inv_freq = original / y.factor * (1 - keep) + original * keep

    def tables_for(self, positions: torch.Tensor, dtype: torch.dtype) -> CosSin:
        cos, sin = super().tables_for(positions, torch.float32)
        factor = self.yarn.cos_sin_factor()
        return (cos * factor).to(dtype), (sin * factor).to(dtype)


def rope_for(config: ModelConfig) -> RotaryEmbedding:
    """The rotary embedding of an MLA model's rope dims (YaRN where the config says)."""
    dim = config.mla.qk_rope_head_dim
    if config.yarn is None:
        return RotaryEmbedding(dim, config.rope_theta)
    return YarnRotaryEmbedding(dim, config.rope_theta, config.yarn)


class MLAttention(nn.Module):
    """One MLA layer: projections, RoPE on the rope dims, the latent cache, the output projection.

    The rope dims of q and k_pe are expected in rotate_half order (first halves, then second halves);
    :func:`deinterleave_rope_rows` puts DeepSeek's interleaved (even, odd) rows in that order at load.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        mla, hidden = config.mla, config.hidden_size
        self.num_heads, self.mla = config.num_heads, mla
        q_out = self.num_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, mla.latent_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        # rows per head: qk_nope_head_dim of W_uk, then v_head_dim of W_uv; [heads * (nope + v), kv_lora_rank]
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.num_heads * mla.v_head_dim, hidden, bias=config.output_bias)
        self.scale = mla.qk_head_dim ** -0.5 * (config.yarn.softmax_scale_factor() if config.yarn else 1.0)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> q [T, heads, qk_nope + qk_rope] (before RoPE)."""
        q = self.q_proj(x) if self.mla.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.num_heads, self.mla.qk_head_dim)

    def kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [heads, qk_nope, kv_lora_rank], W_uv [heads, v_head_dim, kv_lora_rank]), views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, -1, self.mla.kv_lora_rank)  # [heads, nope + v, rank]
        return w[:, :self.mla.qk_nope_head_dim], w[:, self.mla.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, cos_sin: CosSin, cache: LayerCache, meta: AttentionMetadata,
                attention_fn: MLAttentionFn) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes each token's latent vector into ``cache``, then
        ``attention_fn`` (:func:`mla_attention` or :func:`expanded_mla_attention`) reads the cache."""
        mla = self.mla
        q_nope, q_pe = self.project_q(x).split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos_sin)  # [T, 1, rope]
        latent = torch.cat([self.kv_a_layernorm(c).unsqueeze(1), k_pe], dim=-1)  # [T, 1, latent_dim]
        cache.write(latent, None, meta.slot_mapping)
        out = attention_fn(q_nope, apply_rope(q_pe, cos_sin), cache, meta, self.kv_b_weights(),
                           self.scale)  # [T, heads, v_head_dim]
        return self.o_proj(out.flatten(1))


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
                  kv_b: tuple[torch.Tensor, torch.Tensor], scale: float, absorb: bool = True) -> torch.Tensor:
    """Attention of this step's queries over the latent cache (this step's latents already written).

    q_nope [T, heads, qk_nope], q_pe [T, heads, qk_rope] (rotated), kv_b (W_uk, W_uv) -> [T, heads,
    v_head_dim]. Decodes run absorbed and batched (``absorb``), else up-projected one sequence at a
    time; prefills up-project.
    """
    w_uk, w_uv = kv_b
    out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uv.shape[1])
    nd = meta.num_decodes if absorb else 0
    if nd:
        out[:nd] = absorbed_decode(q_nope[:nd], q_pe[:nd], cache, meta, kv_b, scale)
    for i, start in enumerate(meta.query_starts[nd:], start=nd):
        rows = slice(start, start + meta.query_lens[i])
        out[rows] = expanded_attention(q_nope[rows], q_pe[rows], cache, meta, i, kv_b, scale)
    return out


def expanded_mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
                           kv_b: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """:func:`mla_attention` with every sequence, decodes too, up-projecting its cached latents."""
    return mla_attention(q_nope, q_pe, cache, meta, kv_b, scale, absorb=False)


def absorbed_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
                    kv_b: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """The step's decodes (the first ``meta.num_decodes`` sequences, one query each) in the latent space:

        q_lat = W_uk^T q_nope per head; scores over [q_lat | q_pe] . [c | k_pe]; o_lat = sum_t w_t c_t;
        out = W_uv o_lat per head

    q_nope [n, heads, qk_nope], q_pe [n, heads, qk_rope] -> [n, heads, v_head_dim]. Reads only the cache.
    """
    w_uk, w_uv = kv_b
    rank = w_uk.shape[-1]
    q_lat = torch.matmul(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [heads, n, nope] @ [heads, nope, rank]
    query = torch.cat([q_lat, q_pe], dim=-1)  # [n, heads, latent_dim]
    o_lat = torch.empty_like(query)  # [n, heads, latent_dim]
    groups = meta.decode_groups or [(0, meta.num_decodes)]
    masks = meta.decode_masks or [None] * len(groups)
    for (start, end), mask in zip(groups, masks):  # one kv head: the latent; every head reads it
        o_lat[start:end] = _batched_decode(query[start:end], cache, meta.block_tables[start:end],
                                           meta.seq_lens[start:end], meta.block_size, mask, scale)
    # keep c's part of sum_t w_t [c_t | k_pe_t]; [heads, n, rank] @ [heads, rank, v] -> [heads, n, v]
    return torch.matmul(o_lat[..., :rank].transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


def expanded_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
                       seq: int, kv_b: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """Sequence ``seq``'s queries over its cached latents up-projected into per-head keys and values
    (causal): q_nope [q_len, heads, nope], q_pe [q_len, heads, rope] -> [q_len, heads, v_head_dim]."""
    w_uk, w_uv = kv_b
    q_len, seq_len, bs = q_nope.shape[0], meta.seq_lens[seq], meta.block_size
    rank = w_uk.shape[-1]
    latent, _ = _gather(cache, meta.block_tables[seq, : -(-seq_len // bs)], seq_len, q_nope.dtype)  # [1, S, D]
    c, k_pe = latent[..., :rank], latent[..., rank:]  # [1, S, rank], [1, S, rope]
    heads = w_uk.shape[0]
    keys = torch.cat([torch.matmul(c, w_uk.transpose(1, 2)), k_pe.expand(heads, -1, -1)], dim=-1)  # [heads, S, qk]
    values = torch.matmul(c, w_uv.transpose(1, 2))  # [heads, S, v]
    query = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [heads, q_len, qk]
    nd = meta.num_decodes
    if seq >= nd and meta.prefill_masks:
        mask = meta.prefill_masks[seq - nd]
    else:
        mask = None if q_len == seq_len else causal_mask(q_len, seq_len, None, q_nope.device)
    o = F.scaled_dot_product_attention(query.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask,
                                       is_causal=mask is None, scale=scale)  # [1, heads, q_len, v]
    return o[0].transpose(0, 1)


def deinterleave_rope_rows(weight: torch.Tensor, row_width: int, rope_dim: int) -> torch.Tensor:
    """Reorder rows so that each group of ``row_width`` rows ends in its rope rows as (evens, odds)
    instead of DeepSeek's interleaved (even, odd) pairs: rotate_half on them then rotates each pair
    by one frequency, as DeepSeek does, with its outputs grouped by halves (dot products unchanged).

    weight [groups * row_width, ...] (a bias too) -> a new tensor of the same shape.
    """
    grouped = weight.reshape(-1, row_width, *weight.shape[1:])  # [groups, row_width, ...]
    nope, rope = grouped[:, :row_width - rope_dim], grouped[:, row_width - rope_dim:]
    return torch.cat([nope, rope[:, 0::2], rope[:, 1::2]], dim=1).reshape(weight.shape)
