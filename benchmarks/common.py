"""Helpers shared by the benchmarks: the same weights in HF transformers, timing, bandwidth, prompts."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from kvcache.models.loader import LoadedModel

TEXT = ("The history of computing is a story of memory. Early machines stored a few numbers in relays and "
        "mercury delay lines; later ones used magnetic cores, then transistors packed onto silicon. Each step "
        "made memory cheaper and faster, and each step changed what programs could do. ")


def prompt_ids(tokenizer, length: int) -> list[int]:
    """Exactly ``length`` token ids of ordinary English text."""
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(TEXT)
    return ids[:length]


def hf_model(loaded: LoadedModel, dtype: torch.dtype):
    """HF transformers' LlamaForCausalLM holding exactly the weights our engine runs."""
    import transformers
    c = loaded.config
    cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                   intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                   num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                   head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                                   rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                                   tie_word_embeddings=c.tie_word_embeddings, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(loaded.float_weights(), strict=False)
    model.tie_weights()
    return model.to(dtype).eval()


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_read_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes per second that torch reads from memory here (a sum over a buffer larger than the caches)."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    x.sum()
    return num_bytes / best_of(lambda: x.sum(), 7)


def median(values):
    return statistics.median(values)


def cpu_description() -> str:
    """The CPU model and the vector/matrix features that decide CPU speed (for result headers)."""
    from kvcache.kernels import cpu_description as describe
    return describe()
