"""What each layer caches (a :class:`KVSpec`), and the layers with equal specs grouped together.

    model config --> [KVSpec per layer] --> [KVCacheGroup: spec + layer indices] --> storage, sizing

A group is the unit of block tables: its layers share one element format, one window and one
block table per request. Llama-family models have one group (every layer caches the same thing);
hybrid models (sliding + global layers) get groups of equal size per distinct spec, which share
one pool of pages (see :func:`group_layers`). vLLM's ``kv_cache_interface.py`` is the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvcache.config import ModelConfig
from kvcache.sizing import DTYPE_ALIASES, KVShape, block_bytes, blocks_in_budget, kv_dtype

# kv_cache_dtype names users give -> the planner's format names. "auto" means the model's dtype.
KV_CACHE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                   "fp8": "fp8", "int8": "int8", "int4": "int4"}
MODEL_DTYPE_FORMATS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUANTIZED_FORMATS = ("fp8", "int8", "int4")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: str) -> str:
    """The planner's format name (fp32, bf16, fp16, fp8, int8, int4) for a user's ``kv_cache_dtype``.

    ``auto`` follows the model's dtype. The planner's own names (fp32, bf16, fp16: what the CLI prints
    after "KV cache") and its aliases (kvcache.sizing.DTYPE_ALIASES) are accepted too. Anything else
    outside ``auto | float32 | bfloat16 | float16 | fp8 | int8 | int4`` raises a ValueError that names
    the choices.
    """
    name = kv_cache_dtype.lower() if isinstance(kv_cache_dtype, str) else ""
    if name == "auto":
        return MODEL_DTYPE_FORMATS[model_dtype]
    if name in KV_CACHE_DTYPES:
        return KV_CACHE_DTYPES[name]
    planner_name = DTYPE_ALIASES.get(name, name)
    if planner_name in KV_CACHE_DTYPES.values():
        return planner_name
    raise ValueError(f"Unknown kv_cache_dtype {kv_cache_dtype!r}; use one of auto, "
                     f"{', '.join(KV_CACHE_DTYPES)} (or the short names fp32, bf16, fp16).")


@dataclass(frozen=True)
class KVSpec:
    """What one layer caches per token: ``num_kv_heads`` x ``head_dim`` keys and values in ``kv_format``,
    for every token (``window`` None) or only the last ``window`` tokens.

    An MLA layer (``latent_dim`` set) caches one vector of ``latent_dim`` values per token and no
    separate values: the normalized latent and the rotated shared key, [c | k_pe]. It is laid out as
    one kv head of ``head_dim == latent_dim``, so the decode reads treat it as multi-query attention.
    """

    num_kv_heads: int
    head_dim: int
    kv_format: str  # a planner format name: fp32, bf16, fp16, fp8, int8, int4
    window: int | None = None
    latent_dim: int | None = None  # MLA: kv_lora_rank + qk_rope_head_dim values per token, keys only

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.head_dim < 1:
            raise ValueError("A KV spec needs at least one kv head and a head_dim of at least 1.")
        kv_dtype(self.kv_format)  # raises on an unknown format
        if self.kv_format == "int4" and self.head_dim % 2:
            raise ValueError(f"int4 packs two values a byte and needs an even head_dim, got {self.head_dim}.")
        if self.window is not None and self.window < 1:
            raise ValueError(f"A sliding window must be at least 1 token, got {self.window}.")
        if self.latent_dim is not None and (self.num_kv_heads, self.head_dim) != (1, self.latent_dim):
            raise ValueError(f"An MLA spec caches one latent vector: 1 kv head of head_dim {self.latent_dim} "
                             f"(got {self.num_kv_heads} x {self.head_dim}).")

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
        shape = KVShape(len(self.layers), self.spec.num_kv_heads, self.spec.head_dim,
                        mla_latent_dim=self.spec.latent_dim)
        return block_bytes(shape, block_size, self.spec.kv_format)


def layer_specs(config: ModelConfig, kv_format: str) -> tuple[KVSpec, ...]:
    """One spec per layer: the same heads, head dim and format everywhere, each layer's own window
    (Gemma-3's sliding layers hold ``window`` tokens, its global layers every token); an MLA model's
    layers each cache one latent vector (see :class:`KVSpec`)."""
    if config.mla is not None:
        latent = config.mla.latent_dim
        return tuple(KVSpec(1, latent, kv_format, None, latent) for _ in range(config.num_layers))
    return tuple(KVSpec(config.num_kv_heads, config.head_dim, kv_format, window) for window in config.windows)


def group_layers(specs: tuple[KVSpec, ...]) -> tuple[KVCacheGroup, ...]:
    """Layers with identical specs, cut into groups of equal size; numbered spec by spec.

    Equal sizes let every group share one pool of block ids (vLLM's hybrid allocator): a block id
    is one page holding ``block_size`` tokens for as many layers as a group has, and each group's
    table draws pages from the same free list. SmolLM2's 30 equal layers are one group; Gemma-3's
    15 sliding + 3 global layers are five sliding groups and one global group of 3 layers each. A
    spec whose layer count is not a multiple of the smallest ends in a smaller group (its page is
    not full). Layers must agree on heads, head dim and format; only windows may differ.
    """
    members: dict[KVSpec, list[int]] = {}
    for index, spec in enumerate(specs):
        members.setdefault(spec, []).append(index)
    if len({replace(spec, window=None) for spec in members}) > 1:
        raise ValueError("Every layer must cache the same kv heads, head dim and format; only the "
                         f"window may differ between layers (got {sorted(set(members), key=str)}).")
    size = min(len(layers) for layers in members.values())
    groups: list[KVCacheGroup] = []
    for spec, layers in members.items():
        for start in range(0, len(layers), size):
            groups.append(KVCacheGroup(len(groups), spec, tuple(layers[start:start + size])))
    return tuple(groups)


def page_group(groups: tuple[KVCacheGroup, ...]) -> KVCacheGroup:
    """The layout one block id has in memory: as many layer slots as the largest group, no window."""
    largest = max(groups, key=lambda g: len(g.layers))
    return KVCacheGroup(0, replace(largest.spec, window=None), tuple(range(len(largest.layers))))


def pool_block_bytes(groups: tuple[KVCacheGroup, ...], block_size: int) -> int:
    """Bytes of one block id: one page, which any one group fills at a time."""
    return page_group(groups).block_bytes(block_size)


def num_blocks_for_budget(groups: tuple[KVCacheGroup, ...], budget_bytes: int, block_size: int,
                          *more_pools: tuple[KVCacheGroup, ...]) -> int:
    """How many whole blocks (pages) fit in ``budget_bytes``; raises if not even one does.

    With ``more_pools`` (a draft model's groups), every pool gets that many blocks and their pages
    together fit the budget: block i of each pool holds the same tokens of some sequence, so the
    pools run out together.
    """
    per_block = sum(pool_block_bytes(g, block_size) for g in (groups, *more_pools))
    return blocks_in_budget(per_block, budget_bytes, block_size)
