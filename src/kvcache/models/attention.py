"""The attention every architecture calls: write K/V through the slot mapping, read through block tables.

Two implementations with one contract:

* :func:`reference_attention` - loops over sequences and tokens, plain float32 softmax. Obviously
  right, slow; the fast path is tested against it.
* :func:`paged_attention` - decodes batched into one SDPA call over gathered blocks, prefills one
  SDPA call per sequence.

Tokens of a step are laid out decodes first, then prefill chunks:

    tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]       query_lens = [1, 1, 1, 4, 2]
    seq i attends to its first seq_lens[i] tokens of KV; its queries are the last query_lens[i].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """One step's plan in tensors, built once per step by the runner and shared by all layers."""

    slot_mapping: torch.Tensor  # [num_tokens] long: where each token's K/V is written
    query_lens: list[int]  # per sequence: tokens computed this step
    seq_lens: list[int]  # per sequence: tokens with KV after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] long, padded with 0
    block_size: int
    num_decodes: int  # the first num_decodes sequences have query_len == 1
    sliding_window: int | None = None
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_blocks * block_size] bool
    prefill_masks: list[torch.Tensor | None] = field(default_factory=list)  # [q_len, seq_len] bool or None

    @property
    def query_starts(self) -> list[int]:
        starts, total = [], 0
        for n in self.query_lens:
            starts.append(total)
            total += n
        return starts


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """[query_len, seq_len] bool: query i (at position seq_len - query_len + i) sees key j?"""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def build_masks(meta: AttentionMetadata, device: torch.device | str) -> None:
    """Fill the decode and prefill masks of ``meta`` (once per step, shared by every layer)."""
    nd = meta.num_decodes
    if nd > 1 or (nd == 1 and meta.sliding_window is not None):
        width = meta.block_tables.shape[1] * meta.block_size
        k_pos = torch.arange(width, device=device).unsqueeze(0)  # [1, width]
        lens = torch.tensor(meta.seq_lens[:nd], device=device).unsqueeze(1)  # [nd, 1]
        allowed = k_pos < lens
        if meta.sliding_window is not None:
            allowed &= k_pos >= lens - meta.sliding_window
        meta.decode_mask = allowed[:, None, None, :]  # [nd, 1, 1, width]
    meta.prefill_masks = [
        None if (q == s and meta.sliding_window is None) else causal_mask(q, s, meta.sliding_window, device)
        for q, s in zip(meta.query_lens[nd:], meta.seq_lens[nd:])
    ]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys and values ([num_tokens, kv_heads, head_dim]) into their slots."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    k_cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's first seq_len tokens of K or V: [seq_len, kv_heads, head_dim]."""
    return cache.index_select(0, block_ids).flatten(0, 1)[:seq_len]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, heads, hd], k/v [T, kv_heads, hd] -> [T, heads, hd]; writes k/v into the cache first."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _batched_decode(q[:nd], k_cache, v_cache, meta, scale)
    bs = meta.block_size
    for i, start in enumerate(meta.query_starts[nd:], start=nd):
        q_len, seq_len = meta.query_lens[i], meta.seq_lens[i]
        blocks = meta.block_tables[i, : -(-seq_len // bs)]
        keys = _gather(k_cache, blocks, seq_len).transpose(0, 1)  # [kv_heads, seq_len, hd]
        values = _gather(v_cache, blocks, seq_len).transpose(0, 1)
        query = q[start:start + q_len].transpose(0, 1)  # [heads, q_len, hd]
        mask = meta.prefill_masks[i - nd] if meta.prefill_masks else \
            causal_mask(q_len, seq_len, meta.sliding_window, q.device)
        # A leading batch dimension lets PyTorch's CPU flash kernel run (3-D inputs take the slow math path).
        o = F.scaled_dot_product_attention(query.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                           attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)  # [1, heads, q_len, hd]
        out[start:start + q_len] = o[0].transpose(0, 1)
    return out


def _batched_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All single-token queries in one SDPA call. q [nd, heads, hd] -> [nd, heads, hd]."""
    nd = q.shape[0]
    if nd == 1 and meta.decode_mask is None:  # one sequence: gather exactly its tokens, no mask
        seq_len = meta.seq_lens[0]
        blocks = meta.block_tables[0, : -(-seq_len // meta.block_size)]
        keys = _gather(k_cache, blocks, seq_len).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, seq_len, hd]
        values = _gather(v_cache, blocks, seq_len).transpose(0, 1).unsqueeze(0)
        mask = None
    else:
        tables = meta.block_tables[:nd]  # [nd, max_blocks]
        flat = tables.flatten()  # index_select is much cheaper than advanced indexing here
        keys = k_cache.index_select(0, flat).view(nd, -1, *k_cache.shape[2:]).transpose(1, 2)  # [nd, kv_heads, max_blocks*bs, hd]
        values = v_cache.index_select(0, flat).view(nd, -1, *v_cache.shape[2:]).transpose(1, 2)
        mask = meta.decode_mask
    if q.dtype == torch.float32:
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                           enable_gqa=True)  # [nd, heads, 1, hd]
        return o.squeeze(2)
    return _grouped_single_query(q, keys, values, mask, scale)


def _grouped_single_query(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Decode attention as two grouped matmuls with a float32 softmax.

    On CPUs, PyTorch's SDPA kernel is several times slower than this for one bf16 query per sequence.
    q [nd, heads, hd]; keys/values [nd, kv_heads, S, hd]; mask [nd, 1, 1, S] or None -> [nd, heads, hd].
    """
    nd, heads, hd = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(nd, kv_heads, heads // kv_heads, hd)  # [nd, kv_heads, group, hd]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale  # [nd, kv_heads, group, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(weights, values).view(nd, heads, hd)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The same contract as :func:`paged_attention`, written to be read, not to be fast."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    bs = meta.block_size
    out = torch.empty_like(q)
    for i, start in enumerate(meta.query_starts):
        q_len, seq_len = meta.query_lens[i], meta.seq_lens[i]
        slots = [int(meta.block_tables[i, pos // bs]) * bs + pos % bs for pos in range(seq_len)]
        keys = k_cache.flatten(0, 1)[slots].float()  # [seq_len, kv_heads, hd]
        values = v_cache.flatten(0, 1)[slots].float()
        for t in range(q_len):
            position = seq_len - q_len + t
            lo = 0 if meta.sliding_window is None else max(0, position - meta.sliding_window + 1)
            for h in range(heads):
                query = q[start + t, h].float()  # [hd]
                scores = keys[lo:position + 1, h // group] @ query * scale  # [visible]
                weights = torch.softmax(scores, dim=0)
                out[start + t, h] = (weights @ values[lo:position + 1, h // group]).to(q.dtype)
    return out


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
