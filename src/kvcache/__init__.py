"""kvcache: an LLM inference engine built around its KV cache.

``LLM``, ``LLMEngine`` and the output classes are imported on first use (PEP 562), so that the
command line's ``--help``, ``--version`` and ``size`` start without importing torch.
"""

from kvcache.config import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
_ENGINE_NAMES = ("LLM", "LLMEngine", "RequestOutput", "CompletionOutput")


def __getattr__(name: str):
    if name in _ENGINE_NAMES:
        from kvcache.engine import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'kvcache' has no attribute {name!r}")
