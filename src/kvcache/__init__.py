"""kvcache: an LLM inference engine built around its KV cache."""

from kvcache.config import SamplingParams
from kvcache.engine.engine import LLM, CompletionOutput, LLMEngine, RequestOutput

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
