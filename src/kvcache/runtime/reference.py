"""Generation with no KV cache at all: every step recomputes the whole sequence from scratch.

This is the exactness oracle for the cache (and the O(n^2) baseline in the benchmarks): each step
gets a fresh, empty KV storage, so nothing computed earlier is reused.
"""

from __future__ import annotations

import torch

from kvcache.cache.spec import MODEL_DTYPE_FORMATS, group_layers, layer_specs
from kvcache.cache.storage import KVCache
from kvcache.models.llama import LlamaForCausalLM
from kvcache.runtime.plan import ScheduledSequence
from kvcache.runtime.runner import ModelRunner


def logits_without_cache(model: LlamaForCausalLM, token_ids: list[int], block_size: int = 16,
                         kv_format: str | None = None, first_row: int = 0) -> torch.Tensor:
    """Float32 logits for every position of ``token_ids`` from ``first_row`` on, computed in one pass
    with an empty cache (the rows before it are computed too, but not turned into logits).

    ``kv_format`` (fp32, bf16, fp16, fp8, int8, int4; default: the model's dtype) is the cache's
    element format; attention reads every key and value back through it, so its error shows here.
    """
    param = next(model.parameters())
    kv_format = kv_format or MODEL_DTYPE_FORMATS[str(param.dtype).removeprefix("torch.")]
    groups = group_layers(layer_specs(model.config, kv_format))
    per_group = -(-len(token_ids) // block_size)
    storage = KVCache(groups, per_group * len(groups), block_size, param.device)
    runner = ModelRunner(model, storage)
    tables = tuple(tuple(range(g * per_group, (g + 1) * per_group)) for g in range(len(groups)))
    seq = ScheduledSequence("recompute", tuple(token_ids), 0, tables, True, prompt=True)
    tokens, positions, meta = runner.prepare((seq,))
    hidden = model(tokens, positions, meta, storage.layers)
    return model.compute_logits(hidden[first_row:])  # [len(token_ids) - first_row, vocab]


def greedy_without_cache(model: LlamaForCausalLM, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens, each chosen after recomputing the full sequence (prompt + output so far)."""
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        ids.append(int(logits_without_cache(model, ids, first_row=len(ids) - 1)[-1].argmax()))
    return ids[len(prompt_ids):]
