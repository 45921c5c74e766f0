"""The attention every architecture calls: write K/V through the slot mapping, read through block tables.

Attention never touches storage tensors: it gets the layer's :class:`~kvcache.cache.storage.LayerCache`,
writes this step's K/V through it and reads blocks back in the cache's format (decoded fp8/int8/int4
or plain), in prefill as in decode. Each cache group has its own :class:`AttentionMetadata`.

Two implementations with one contract:

* :func:`reference_attention` - loops over sequences and tokens, plain float32 softmax. Obviously
  right, slow; the fast path is tested against it.
* :func:`paged_attention` - decodes batched into grouped matmuls over gathered blocks (over a
  quantized cache, one C kernel that decodes the codes inside its dot products when the kernels are
  built: :mod:`kvcache.models.quant_decode`), prefills one SDPA call per sequence.

Tokens of a step are laid out decodes first, then prefill chunks:

    tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]       query_lens = [1, 1, 1, 4, 2]
    seq i attends to its first seq_lens[i] tokens of KV; its queries are the last query_lens[i].

Under an eviction policy a sequence's first seq_lens[i] slots hold only its live tokens (any order;
each key was rotated with its own position before it was stored), so the same masks apply. When a
policy ranks tokens by attention, ``meta.scores`` (an :class:`AttentionScores`) names the sequences
and query rows whose softmax weights it wants; the step adds them up per key slot as it computes
them (a prefill chunk asked for is then computed with an explicit softmax instead of SDPA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvcache.cache.storage import LayerCache
from kvcache.models import quant_decode


@dataclass
class AttentionScores:
    """Softmax weights an eviction policy asked for, summed per key slot over a group's layers, the
    heads and each sequence's last ``rows[i]`` query rows. Built by the runner, filled by attention."""

    rows: dict[int, int]  # sequence index in the step -> trailing query rows to sum (>= 1)
    totals: dict[int, torch.Tensor] = field(default_factory=dict)  # sequence index -> [seq_len] float32

    def add(self, index: int, weights: torch.Tensor) -> None:
        """Add one layer's weights of sequence ``index``: [seq_len], already summed over heads and rows."""
        total = self.totals.get(index)
        self.totals[index] = weights if total is None else total + weights


@dataclass
class AttentionMetadata:
    """One step's plan in tensors, built once per step by the runner and shared by all layers."""

    slot_mapping: torch.Tensor  # [num_tokens] long: where each token's K/V is written
    query_lens: list[int]  # per sequence: tokens computed this step
    seq_lens: list[int]  # per sequence: tokens with KV after this step, from its table's first block
    block_tables: torch.Tensor  # [num_seqs, max_blocks] long, padded with 0 (sliding: from the window's first block)
    block_size: int
    num_decodes: int  # the first num_decodes sequences have query_len == 1
    sliding_window: int | None = None
    decode_groups: list[tuple[int, int]] = field(default_factory=list)  # decode ranges padded together
    decode_masks: list[torch.Tensor | None] = field(default_factory=list)  # per group: [1, n, 1, S] bool
    prefill_masks: list[torch.Tensor | None] = field(default_factory=list)  # [q_len, seq_len] bool or None
    scores: AttentionScores | None = None  # weights an eviction policy asked for (None: nobody asked)
    # tokens of prompt chunks in the step (not decodes or verifications of drafts): while there are
    # any, every weight matmul of the step goes through PyTorch's GEMM, so a prompt's KV is computed
    # the same way however it is split (a prefix hit's short tail as a long prefill)
    prefill_tokens: int = 0

    @property
    def decode_rows(self) -> bool:
        """Whether every row of the step decodes (one token, or one plus its drafts): our kernels may take them."""
        return self.prefill_tokens == 0

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


def group_decodes(seq_lens: list[int], ratio: float = 0.6, min_group: int = 4) -> list[tuple[int, int]]:
    """Split decodes (sorted longest first) into ranges padded together, bounding the padding.

    A new group starts when a sequence is shorter than ``ratio`` x its group's longest and the group
    already has ``min_group`` members, so few groups run and none pads much.
    """
    groups, start = [], 0
    for i in range(1, len(seq_lens)):
        if seq_lens[i] < ratio * seq_lens[start] and i - start >= min_group:
            groups.append((start, i))
            start = i
    if seq_lens:
        groups.append((start, len(seq_lens)))
    return groups


def build_masks(meta: AttentionMetadata, device: torch.device | str) -> None:
    """Fill the decode groups, their masks and the prefill masks of ``meta`` (once per step)."""
    nd, bs = meta.num_decodes, meta.block_size
    meta.decode_groups = group_decodes(meta.seq_lens[:nd])
    meta.decode_masks = []
    for start, end in meta.decode_groups:
        lens = meta.seq_lens[start:end]
        if end - start == 1 and meta.sliding_window is None:
            meta.decode_masks.append(None)  # gathered to its exact length
            continue
        width = -(-max(lens) // bs) * bs
        k_pos = torch.arange(width, device=device).unsqueeze(0)  # [1, width]
        lens_t = torch.tensor(lens, device=device).unsqueeze(1)  # [n, 1]
        allowed = k_pos < lens_t
        if meta.sliding_window is not None:
            allowed &= k_pos >= lens_t - meta.sliding_window
        meta.decode_masks.append(allowed[None, :, None, :])  # [1, n, 1, width]
    meta.prefill_masks = [
        None if (q == s and meta.sliding_window is None) else causal_mask(q, s, meta.sliding_window, device)
        for q, s in zip(meta.query_lens[nd:], meta.seq_lens[nd:])
    ]


def _gather(cache: LayerCache, block_ids: torch.Tensor, seq_len: int,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first seq_len tokens of K and V, read through the cache's format:
    each [kv_heads, seq_len, head_dim]."""
    keys, values = cache.read_blocks(block_ids, dtype)  # [kv_heads, blocks, block_size, hd]
    kv_heads, hd = keys.shape[0], keys.shape[-1]
    return keys.view(kv_heads, -1, hd)[:, :seq_len], values.view(kv_heads, -1, hd)[:, :seq_len]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, heads, hd], k/v [T, kv_heads, hd] -> [T, heads, hd]; writes k/v into the cache first,
    then reads every key and value (this step's too) back through the cache's format."""
    cache.write(k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    groups = meta.decode_groups or ([(0, nd)] if nd else [])
    masks = meta.decode_masks or [None] * len(groups)
    scores = meta.scores
    if nd and quant_decode.applies(q, cache, scores is not None):
        out[:nd] = quant_decode.decode(q[:nd], cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                                       meta.sliding_window, scale)
        groups = []
    for (start, end), mask in zip(groups, masks):
        out[start:end] = _batched_decode(q[start:end], cache, meta.block_tables[start:end],
                                         meta.seq_lens[start:end], meta.block_size, mask, scale,
                                         scores, start)
    bs = meta.block_size
    for i, start in enumerate(meta.query_starts[nd:], start=nd):
        q_len, seq_len = meta.query_lens[i], meta.seq_lens[i]
        blocks = meta.block_tables[i, : -(-seq_len // bs)]
        keys, values = _gather(cache, blocks, seq_len, q.dtype)  # [kv_heads, seq_len, hd]
        query = q[start:start + q_len].transpose(0, 1)  # [heads, q_len, hd]
        mask = meta.prefill_masks[i - nd] if meta.prefill_masks else \
            causal_mask(q_len, seq_len, meta.sliding_window, q.device)
        if scores is not None and i in scores.rows:
            o, weights = explicit_attention(query, keys, values, mask, scale, scores.rows[i])
            scores.add(i, weights)
            out[start:start + q_len] = o.transpose(0, 1)
            continue
        # A leading batch dimension lets PyTorch's CPU flash kernel run (3-D inputs take the slow math path).
        o = F.scaled_dot_product_attention(query.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                           attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)  # [1, heads, q_len, hd]
        out[start:start + q_len] = o[0].transpose(0, 1)
    return out


def explicit_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       mask: torch.Tensor | None, scale: float, rows: int,
                       block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's attention with its softmax weights in hand: query [heads, q_len, hd], keys and
    values [kv_heads, seq_len, hd], ``mask`` [q_len, seq_len] bool (None: causal). Returns the output
    [heads, q_len, hd] and the weights of the last ``rows`` queries summed over heads and rows
    [seq_len] float32. Queries go ``block`` at a time, which bounds the weights held at once."""
    heads, q_len, _ = query.shape
    seq_len = keys.shape[1]
    group = heads // keys.shape[0]
    keys = keys.repeat_interleave(group, 0)  # [heads, seq_len, hd]
    values = values.repeat_interleave(group, 0)
    if mask is None:
        mask = causal_mask(q_len, seq_len, None, query.device)
    out = torch.empty_like(query)
    total = torch.zeros(seq_len, dtype=torch.float32, device=query.device)
    for lo in range(0, q_len, block):
        hi = min(q_len, lo + block)
        logits = torch.matmul(query[:, lo:hi], keys.transpose(-1, -2)).float() * scale  # [heads, hi-lo, seq_len]
        weights = torch.softmax(logits.masked_fill_(~mask[lo:hi], float("-inf")), dim=-1)
        out[:, lo:hi] = torch.matmul(weights.to(query.dtype), values)
        first = max(lo, q_len - rows)
        if first < hi:
            total += weights[:, first - lo:].sum((0, 1))
    return out, total


def _batched_decode(q: torch.Tensor, cache: LayerCache, tables: torch.Tensor, seq_lens: list[int],
                    block_size: int, mask: torch.Tensor | None, scale: float,
                    collect: AttentionScores | None = None, first: int = 0) -> torch.Tensor:
    """Single-token queries of several sequences at once: two grouped matmuls, a float32 softmax.

    q [n, heads, hd] -> [n, heads, hd]. The sequences are padded to the longest of them and ``mask``
    hides the padding; with no mask, one sequence is gathered to its exact length. (PyTorch's CPU
    SDPA kernel is several times slower than this for one query per sequence, and wants another
    layout.) Sequences ``first + j`` that ``collect`` names get their weights added to it.
    """
    n, heads, hd = q.shape
    width = -(-max(seq_lens) // block_size)
    flat = tables[:, :width].flatten()  # [n * width] block ids
    kv_heads = cache.num_kv_heads
    grouped = q.view(n, kv_heads, heads // kv_heads, hd).transpose(0, 1)  # [kv_heads, n, group, hd]
    scores = cache.key_scores(grouped, flat)  # [kv_heads, n, group, width * block_size]
    if mask is None:
        scores = scores[..., :seq_lens[0]]
    scores = scores.float() * scale  # [kv_heads, n, group, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    if collect is not None:
        for j in range(n):
            if first + j in collect.rows:
                collect.add(first + j, weights[:, j, :, :seq_lens[j]].float().sum((0, 1)))  # [seq_len]
    out = cache.weighted_values(weights, flat)  # [kv_heads, n, group, hd]
    return out.transpose(0, 1).reshape(n, heads, hd)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The same contract as :func:`paged_attention`, written to be read, not to be fast: per token
    and head, a float32 softmax over the whole layer's cache decoded to float32."""
    cache.write(k, v, meta.slot_mapping)
    all_keys, all_values = cache.dequantized()  # [kv_heads, num_blocks, block_size, hd]
    heads, kv_heads = q.shape[1], all_keys.shape[0]
    group = heads // kv_heads
    bs = meta.block_size
    out = torch.empty_like(q)
    for i, start in enumerate(meta.query_starts):
        q_len, seq_len = meta.query_lens[i], meta.seq_lens[i]
        slots = [int(meta.block_tables[i, pos // bs]) * bs + pos % bs for pos in range(seq_len)]
        keys = all_keys.flatten(1, 2)[:, slots].transpose(0, 1)  # [seq_len, kv_heads, hd]
        values = all_values.flatten(1, 2)[:, slots].transpose(0, 1)
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
