"""kvcache: an LLM inference engine built around its KV cache.

``LLM``, ``LLMEngine`` and the output classes are imported on first use (PEP 562), so that the
command line's ``--help``, ``--version`` and ``size`` start without importing torch.

Importing kvcache sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set: OpenMP reads it once,
when torch first loads, so this only takes effect when kvcache is imported before torch. With
libgomp's default policy and two threads, a decode matmul of [4, 256] x [256, 4096] took 16 ms
instead of 0.7 ms while niced processes shared the two cores (every parallel region waits for a
descheduled thread); see BENCHMARKS.md.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kvcache.config import SamplingParams  # noqa: E402

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
_ENGINE_NAMES = ("LLM", "LLMEngine", "RequestOutput", "CompletionOutput")


def __getattr__(name: str):
    if name in _ENGINE_NAMES:
        from kvcache.engine import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'kvcache' has no attribute {name!r}")
