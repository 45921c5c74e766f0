"""Generation with no KV cache at all: every step recomputes the whole sequence from scratch.

This is the exactness oracle for the cache (and the O(n^2) baseline in the benchmarks): each step
gets a fresh, empty KV storage, so nothing computed earlier is reused.
"""

from __future__ import annotations

import torch

from kvcache.cache.storage import KVStorage
from kvcache.models.llama import LlamaForCausalLM
from kvcache.runtime.plan import ScheduledSequence
from kvcache.runtime.runner import ModelRunner
from kvcache.sizing import KVShape


def logits_without_cache(model: LlamaForCausalLM, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Float32 logits for every position of ``token_ids``, computed in one pass with an empty cache."""
    shape = KVShape.from_model_config(model.config)
    num_blocks = -(-len(token_ids) // block_size)
    dtype = next(model.parameters()).dtype
    storage = KVStorage(shape, num_blocks, block_size, dtype, next(model.parameters()).device)
    runner = ModelRunner(model, storage)
    seq = ScheduledSequence("recompute", tuple(token_ids), 0, tuple(range(num_blocks)), True)
    tokens, positions, meta = runner.prepare((seq,))
    hidden = model(tokens, positions, meta, [storage.layer(i) for i in range(model.config.num_layers)])
    return model.compute_logits(hidden)  # [len(token_ids), vocab]


def greedy_without_cache(model: LlamaForCausalLM, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens, each chosen after recomputing the full sequence (prompt + output so far)."""
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        ids.append(int(logits_without_cache(model, ids)[-1].argmax()))
    return ids[len(prompt_ids):]
