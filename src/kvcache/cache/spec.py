"""What each layer caches (a :class:`KVSpec`), and the layers with equal specs grouped together.

    model config --> [KVSpec per layer] --> [KVCacheGroup: spec + layer indices] --> storage, sizing

A group is the unit of memory layout: its layers share one allocation, one element format, one
window, and (once per-group tables come) one block table per request. Llama-family models have
one group today (every layer caches the same thing); hybrid models (sliding + global layers) get
one group per distinct spec. vLLM's ``kv_cache_interface.py`` is the model for this shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.config import ModelConfig
from kvcache.sizing import KVShape, block_bytes, blocks_in_budget, kv_dtype

# kv_cache_dtype names users give -> the planner's format names. "auto" means the model's dtype.
KV_CACHE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                   "fp8": "fp8", "int8": "int8", "int4": "int4"}
MODEL_DTYPE_FORMATS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUANTIZED_FORMATS = ("fp8", "int8", "int4")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: str) -> str:
    """The planner's format name (fp32, bf16, fp16, fp8, int8, int4) for a user's ``kv_cache_dtype``.

    ``auto`` follows the model's dtype. Anything else outside ``auto | float32 | bfloat16 | float16 |
    fp8 | int8 | int4`` raises a ValueError that names the choices.
    """
    name = kv_cache_dtype.lower() if isinstance(kv_cache_dtype, str) else ""
    if name == "auto":
        return MODEL_DTYPE_FORMATS[model_dtype]
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"Unknown kv_cache_dtype {kv_cache_dtype!r}; use one of auto, "
                         f"{', '.join(KV_CACHE_DTYPES)}.")
    return KV_CACHE_DTYPES[name]


@dataclass(frozen=True)
class KVSpec:
    """What one layer caches per token: ``num_kv_heads`` x ``head_dim`` keys and values in ``kv_format``,
    for every token (``window`` None) or only the last ``window`` tokens."""

    num_kv_heads: int
    head_dim: int
    kv_format: str  # a planner format name: fp32, bf16, fp16, fp8, int8, int4
    window: int | None = None

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.head_dim < 1:
            raise ValueError("A KV spec needs at least one kv head and a head_dim of at least 1.")
        kv_dtype(self.kv_format)  # raises on an unknown format
        if self.kv_format == "int4" and self.head_dim % 2:
            raise ValueError(f"int4 packs two values a byte and needs an even head_dim, got {self.head_dim}.")
        if self.window is not None and self.window < 1:
            raise ValueError(f"A sliding window must be at least 1 token, got {self.window}.")

    @property
    def quantized(self) -> bool:
        return self.kv_format in QUANTIZED_FORMATS


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers that cache the same thing, stored together: ``layers`` are model layer indices."""

    group_id: int
    spec: KVSpec
    layers: tuple[int, ...]

    def block_bytes(self, block_size: int) -> int:
        """Bytes one block of this group takes across its layers, as the planner counts them."""
        shape = KVShape(len(self.layers), self.spec.num_kv_heads, self.spec.head_dim)
        return block_bytes(shape, block_size, self.spec.kv_format)


def layer_specs(config: ModelConfig, kv_format: str) -> tuple[KVSpec, ...]:
    """One spec per layer of a llama-family model (the same for every layer)."""
    spec = KVSpec(config.num_kv_heads, config.head_dim, kv_format, config.sliding_window)
    return (spec,) * config.num_layers


def group_layers(specs: tuple[KVSpec, ...]) -> tuple[KVCacheGroup, ...]:
    """Layers with identical specs form one group; groups are numbered in order of first layer."""
    members: dict[KVSpec, list[int]] = {}
    for index, spec in enumerate(specs):
        members.setdefault(spec, []).append(index)
    return tuple(KVCacheGroup(i, spec, tuple(layers)) for i, (spec, layers) in enumerate(members.items()))


def pool_block_bytes(groups: tuple[KVCacheGroup, ...], block_size: int) -> int:
    """Bytes of one block id across every group (each group stores every block id)."""
    return sum(g.block_bytes(block_size) for g in groups)


def num_blocks_for_budget(groups: tuple[KVCacheGroup, ...], budget_bytes: int, block_size: int) -> int:
    """How many whole blocks (across every group) fit in ``budget_bytes``; raises if not even one does."""
    return blocks_in_budget(pool_block_bytes(groups, block_size), budget_bytes, block_size)
