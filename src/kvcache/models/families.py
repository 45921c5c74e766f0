"""Which model class runs which architecture: the file's architecture picks the code."""

from torch import nn

from kvcache.config import SUPPORTED_ARCHITECTURES, ModelConfig
from kvcache.models.deepseek import DeepseekForCausalLM
from kvcache.models.gemma3 import Gemma3ForCausalLM
from kvcache.models.llama import LlamaForCausalLM

CausalLM = LlamaForCausalLM | Gemma3ForCausalLM | DeepseekForCausalLM  # what build_model returns; called alike
MODEL_CLASSES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM,
                                             "qwen2": LlamaForCausalLM, "gemma3": Gemma3ForCausalLM,
                                             "deepseek_v2": DeepseekForCausalLM, "deepseek_v3": DeepseekForCausalLM}


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The class whose ``forward(tokens, positions, attn_metadata, kv)`` runs ``config``'s architecture."""
    if config.architecture not in MODEL_CLASSES:
        raise ValueError(f"Unsupported architecture {config.architecture!r}; kvcache runs "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} models.")
    return MODEL_CLASSES[config.architecture]
