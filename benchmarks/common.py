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


def _read_probe():
    """read_probe.c built for this machine (in the kernels' cache directory), or None without a compiler."""
    import ctypes
    import hashlib
    import subprocess
    from pathlib import Path

    from kvcache import kernels
    source = Path(__file__).with_name("read_probe.c")
    compiler = kernels._compiler()
    if compiler is None or kernels.library() is None:  # (the kernels also need AVX2 and OpenMP here)
        return None
    target = kernels._cache_root() / f"read-probe-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([compiler, "-O2", "-march=native", "-fopenmp", "-fPIC", "-shared", str(source), "-o", str(target)],
                       check=True, capture_output=True)
    lib = ctypes.CDLL(str(target))
    lib.kv_read_probe.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int]
    lib.kv_read_probe.restype = ctypes.c_float
    return lib


def memory_read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 7) -> tuple[float, str]:
    """Bytes per second this machine reads from memory, and how: the best of a torch sum over a buffer
    larger than the caches (one stream per thread) and read_probe.c's sums of 2, 4 and 8 streams per
    thread side by side (a core keeps more reads in flight with several; our matmul reads so)."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    x.sum()
    rates = {"torch sum": num_bytes / best_of(lambda: x.sum(), repeats)}
    probe = _read_probe()
    if probe is not None:
        threads = torch.get_num_threads()
        for streams in (2, 4, 8):
            seconds = best_of(lambda: probe.kv_read_probe(x.data_ptr(), x.numel(), streams, threads), repeats)
            rates[f"{streams} streams per thread"] = num_bytes / seconds
    how = max(rates, key=rates.get)
    return rates[how], f"1 GiB read, best of {repeats}: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())


def median(values):
    return statistics.median(values)


def cpu_description() -> str:
    """The CPU model and the vector/matrix features that decide CPU speed (for result headers)."""
    from kvcache.kernels import cpu_description as describe
    return describe()
