"""DeepSeek-V2 / V3: our own PyTorch forward over a paged cache of latents, with the llama family's
calling convention (``forward(tokens, positions, attn_metadata, kv)``, ``compute_logits``).

    h = embed(tokens)
    per layer:  h = h + mla(norm_in(h))          caches [c | k_pe] per token (see models/mla.py)
                h = h + mlp(norm_post(h))        the first first_k_dense_replace layers: a gated MLP;
                                                 the others: routed + shared experts (models/moe.py)
    logits = lm_head(norm(h))

``absorb_decode`` (default True) makes decodes attend in the latent space; False up-projects the
cached latents every step (the reference the absorbed path is tested and benchmarked against).
Embeddings, the layer loop, the final norm and the head are :class:`LlamaForCausalLM`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvcache.config import ModelConfig
from kvcache.models.layers import GatedMLP, RMSNorm, RotaryEmbedding
from kvcache.models.llama import LlamaForCausalLM
from kvcache.models.mla import MLAttention, deinterleave_rope_rows, expanded_mla_attention, mla_attention, rope_for
from kvcache.models.moe import MoE
from kvcache.models.weights import _WeightSource, assign_weights

_PLAIN_ATTENTION = ("q_proj.weight", "q_a_proj.weight", "q_a_proj.bias", "q_a_layernorm.weight", "q_b_proj.weight",
                    "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias", "kv_a_layernorm.weight",
                    "kv_b_proj.weight", "o_proj.weight", "o_proj.bias")


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe is not None and config.moe.is_moe_layer(layer)
        self.mlp = MoE(config) if moe else GatedMLP(config, F.silu)


class DeepseekForCausalLM(LlamaForCausalLM):
    """The llama family's embeddings, loop, final norm and head around MLA layers and experts; its
    ``attention_fn`` is an MLA attention (:func:`mla_attention`, absorbed decodes, by default)."""

    packs_weights = False  # MLA absorbs kv_b_proj's weight into the queries: its weights stay plain tensors

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.attention_fn = mla_attention

    @staticmethod
    def build_layer(config: ModelConfig, index: int) -> nn.Module:
        return DeepseekDecoderLayer(config, index)

    @staticmethod
    def build_rope(config: ModelConfig) -> RotaryEmbedding:
        return rope_for(config)  # [T, 1, qk_rope_head_dim] cos/sin: only the rope dims rotate

    @property
    def absorb_decode(self) -> bool:
        """True: decodes attend in the latent space; False: they up-project the cached latents every step."""
        return self.attention_fn is mla_attention

    @absorb_decode.setter
    def absorb_decode(self, absorb: bool) -> None:
        self.attention_fn = mla_attention if absorb else expanded_mla_attention

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take Hugging Face-named tensors (DeepSeek's names; experts one by one as on the Hub, or
        stacked as transformers 5 holds them) as parameters; every tensor must be used, the MTP
        layers past ``num_hidden_layers`` excepted. Interleaved rope rows are reordered (a copy)."""
        assign_weights(self, map_deepseek_weights(self.config, weights))


def map_deepseek_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> tensors, from DeepSeek's HF names; ValueError on a missing or unused one."""
    source = _WeightSource(weights)
    mapped: dict[str, torch.Tensor] = {}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            mapped[dst + name] = source.pop(src + name)
        for name in _PLAIN_ATTENTION:
            tensor = source.pop(src + "self_attn." + name, None)
            if tensor is not None:
                mapped[dst + "self_attn." + name] = _rope_rows_in_half_order(config, name, tensor)
        moe = config.moe is not None and config.moe.is_moe_layer(i)
        mapped.update(_moe_weights(config, source, src, dst) if moe else _mlp_weights(source, src + "mlp.", dst + "mlp."))
    mapped["embed_tokens.weight"] = source.pop("model.embed_tokens.weight")
    mapped["norm.weight"] = source.pop("model.norm.weight")
    if config.tie_word_embeddings:
        source.pop("lm_head.weight", None)
    else:
        mapped["lm_head.weight"] = source.pop("lm_head.weight")
    leftover = [k for k in source.remaining() if "rotary_emb" not in k and not _is_mtp_layer(config, k)]
    if leftover:
        raise ValueError(f"The weights hold tensors this architecture does not use: {leftover[:4]}.")
    return mapped


def _rope_rows_in_half_order(config: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The q and kv_a projections with their rope rows reordered (see :func:`deinterleave_rope_rows`)."""
    mla = config.mla
    if not mla.rope_interleave:
        return tensor
    if name in ("q_proj.weight", "q_b_proj.weight"):
        return deinterleave_rope_rows(tensor, mla.qk_head_dim, mla.qk_rope_head_dim)
    if name.startswith("kv_a_proj_with_mqa."):
        return deinterleave_rope_rows(tensor, mla.latent_dim, mla.qk_rope_head_dim)
    return tensor


def _mlp_weights(source: _WeightSource, src: str, dst: str) -> dict[str, torch.Tensor]:
    """A gated MLP's gate and up fused into gate_up_proj, its down as it is."""
    return {dst + "gate_up_proj.weight": source.fused([src + "gate_proj.weight", src + "up_proj.weight"]),
            dst + "down_proj.weight": source.pop(src + "down_proj.weight")}


def _moe_weights(config: ModelConfig, source: _WeightSource, src: str, dst: str) -> dict[str, torch.Tensor]:
    """The gate, the routed experts stacked (gate and up fused per expert), the shared experts."""
    moe, src, dst = config.moe, src + "mlp.", dst + "mlp."
    out = {dst + "gate.weight": source.pop(src + "gate.weight")}
    if moe.topk_method == "noaux_tc":
        out[dst + "gate.e_score_correction_bias"] = source.pop(src + "gate.e_score_correction_bias")
    stacked = source.pop(src + "experts.gate_up_proj", None)  # transformers 5's in-memory layout
    if stacked is not None:
        out[dst + "experts.gate_up_proj"] = stacked
        out[dst + "experts.down_proj"] = source.pop(src + "experts.down_proj")
    else:
        experts = [_mlp_weights(source, f"{src}experts.{e}.", "") for e in range(moe.num_experts)]
        out[dst + "experts.gate_up_proj"] = torch.stack([e["gate_up_proj.weight"] for e in experts])
        out[dst + "experts.down_proj"] = torch.stack([e["down_proj.weight"] for e in experts])
    if moe.num_shared_experts:
        out.update(_mlp_weights(source, src + "shared_experts.", dst + "shared_experts."))
    return out


def _is_mtp_layer(config: ModelConfig, name: str) -> bool:
    """DeepSeek-V3's multi-token-prediction layers follow the decoder's (model.layers.61.* on the Hub)."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and \
        int(parts[2]) >= config.num_layers
