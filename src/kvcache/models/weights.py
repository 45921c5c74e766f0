"""Hugging Face-named tensors -> a model's own parameters: fused Q/K/V and gate/up, every tensor used.

Each architecture names the per-layer tensors it takes as they are (norms, output projections);
the fusing, the shape checks and the "no tensor left over" rule are the same for all of them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kvcache.config import ModelConfig
from kvcache.models.packed import PackedEmbedding, PackedLinear, PackedWeight, concat_rows


def map_hf_weights(config: ModelConfig, weights: dict[str, torch.Tensor], plain: Sequence[str],
                   tied: bool) -> dict[str, torch.Tensor]:
    """Our parameter names -> tensors, from HF names: per layer, Q/K/V fused into ``qkv_proj`` and
    gate/up into ``gate_up_proj`` (a view when adjacent already, else a copy), ``plain`` names taken
    as they are; then embeddings, final norm and (unless ``tied``) the LM head. Raises ValueError
    on a missing tensor or one the architecture does not use."""
    source = _WeightSource(weights)
    mapped: dict[str, torch.Tensor] = {}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        mapped[dst + "self_attn.qkv_proj.weight"] = source.fused([src + f"self_attn.{p}_proj.weight" for p in "qkv"])
        if config.attention_bias:
            mapped[dst + "self_attn.qkv_proj.bias"] = source.fused([src + f"self_attn.{p}_proj.bias" for p in "qkv"])
        mapped[dst + "mlp.gate_up_proj.weight"] = source.fused([src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"])
        if config.output_bias:
            mapped[dst + "self_attn.o_proj.bias"] = source.pop(src + "self_attn.o_proj.bias")
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", *plain):
            mapped[dst + name] = source.pop(src + name)
    mapped["embed_tokens.weight"] = source.pop("model.embed_tokens.weight")
    mapped["norm.weight"] = source.pop("model.norm.weight")
    if tied:
        source.pop("lm_head.weight", None)
    else:
        mapped["lm_head.weight"] = source.pop("lm_head.weight")
    leftover = [k for k in source.remaining() if "rotary_emb" not in k]
    if leftover:
        raise ValueError(f"The weights hold tensors this architecture does not use: {leftover[:4]}.")
    return mapped


def assign_weights(model: nn.Module, mapped: dict[str, torch.Tensor | PackedWeight]) -> None:
    """Take ``mapped`` as the model's parameters, without a second copy; shapes must match the config.

    A :class:`PackedWeight` replaces its module (an ``nn.Linear`` by a :class:`PackedLinear` that
    keeps the linear's bias, an ``nn.Embedding`` by a :class:`PackedEmbedding`)."""
    own = model.state_dict()
    for name, tensor in mapped.items():
        if own[name].shape != tuple(tensor.shape):
            raise ValueError(f"Weight {name} has shape {tuple(tensor.shape)}; the config says "
                             f"{tuple(own[name].shape)}.")
    model.load_state_dict({k: v for k, v in mapped.items() if isinstance(v, torch.Tensor)}, strict=False, assign=True)
    for name, packed in mapped.items():
        if isinstance(packed, PackedWeight):
            _install_packed(model, name.removesuffix(".weight"), packed)


def _install_packed(model: nn.Module, module_name: str, packed: PackedWeight) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    if isinstance(old, nn.Embedding):
        setattr(parent, child, PackedEmbedding(packed.to(old.weight.device), old.weight.dtype))
    else:
        setattr(parent, child, PackedLinear(packed.to(old.weight.device), old.bias))


class _WeightSource:
    """Hands out named tensors once each; a missing one is a clear error, not a KeyError."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self._weights = dict(weights)

    def pop(self, name: str, *default: None) -> torch.Tensor:
        if name not in self._weights and not default:
            raise ValueError(f"The weights have no tensor {name!r}; they do not match this architecture.")
        return self._weights.pop(name, *default)

    def fused(self, parts: list[str]) -> torch.Tensor | PackedWeight:
        """The row-wise concatenation of ``parts``: a view, with no copy, when they already lie one
        after another in one storage (as kvcache's converted cache hands them out), else a new tensor
        (packed weights are concatenated plane by plane)."""
        tensors = [self.pop(part) for part in parts]
        if any(isinstance(t, PackedWeight) for t in tensors):
            return concat_rows([t if isinstance(t, PackedWeight) else PackedWeight("float32", t) for t in tensors])
        first = tensors[0]
        end = first.data_ptr()
        for t in tensors:
            if not t.is_contiguous() or t.data_ptr() != end or t.shape[1:] != first.shape[1:] \
                    or t.dtype != first.dtype or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
                return torch.cat(tensors)
            end += t.numel() * t.element_size()
        rows = sum(t.shape[0] for t in tensors)
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]),
                                       first.stride())

    def remaining(self) -> list[str]:
        return list(self._weights)
