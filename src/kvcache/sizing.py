"""The KV-bytes formula and capacity planning. Pure functions on plain data.

    KV bytes = 2 x layers x kv_heads x head_dim x seq_len x batch x bytes_per_element

with three refinements a real cache needs:

* quantized element formats pay for their packing and scales, laid out as the engine stores them:
  a value's scale (and zero point) covers ``group_size`` values of one token; a key's covers either
  the same (int8, after a Hadamard rotation that spreads the outlier channels) or one channel of one
  block of ``block_size`` tokens (fp8 and int4, KIVI; scale and zero point);
* hybrid sliding-window models keep only ``min(seq_len, window)`` tokens on their sliding layers;
* MLA models (DeepSeek-V2/V3) cache one latent vector of ``kv_lora_rank + qk_rope_head_dim``
  values per token per layer instead of ``2 x kv_heads x head_dim``.

The engine sizes its block pool with :func:`kv_bytes`, so planned bytes == allocated bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvcache.config import ModelConfig


@dataclass(frozen=True)
class KVDtype:
    """An element format for cached keys and values."""

    name: str
    bits: int
    default_group_size: int | None  # values of one token per value scale; None: no scales (plain float)
    scale_bytes: int  # bytes of scale (+ zero point) stored per value group
    note: str
    keys_per_channel: bool = False  # key params per channel per block (else per token group, like values)
    key_scale_bytes: int = 0  # bytes of a key group's params (0: the same as a value group's)
    default_block_size: int = 16  # tokens per block when none is asked for


KV_DTYPES: dict[str, KVDtype] = {
    d.name: d
    for d in (
        KVDtype("fp32", 32, None, 0, "IEEE float32"),
        KVDtype("fp16", 16, None, 0, "IEEE float16"),
        KVDtype("bf16", 16, None, 0, "bfloat16"),
        KVDtype("fp8", 8, 64, 2, "e4m3; V: fp16 scale per group of a token; K: fp16 scale + zero point "
                "per channel per block", keys_per_channel=True, key_scale_bytes=4),
        KVDtype("int8", 8, 64, 2, "symmetric, fp16 scales per group of a token (K Hadamard-rotated)"),
        KVDtype("int4", 4, 32, 4, "asymmetric, two values a byte, fp16 scale + fp16 zero point: "
                "K per channel per block, V per group of a token", keys_per_channel=True,
                default_block_size=32),  # a key's scale + zero per channel: 1 bit a key at 32 tokens, 2 at 16
    )
}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
                 "f32": "fp32", "f16": "fp16", "fp8_e4m3": "fp8"}


def kv_dtype(name: str) -> KVDtype:
    """Look up a KV element format by name (fp32, fp16, bf16, fp8, int8, int4 or an alias)."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else ""
    if key not in KV_DTYPES:
        raise ValueError(f"Unknown KV dtype {name!r}; use one of {', '.join(KV_DTYPES)}.")
    return KV_DTYPES[key]


@dataclass(frozen=True)
class KVShape:
    """What one token costs in each layer: the model facts the formula needs, nothing else.

    ``layer_windows[i]`` is the sliding window of layer ``i`` (None: the layer attends to the full
    context). ``mla_latent_dim`` is set for MLA models, whose layers cache one latent vector.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_windows: tuple[int | None, ...] = field(default=())
    mla_latent_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError("layer_windows must name one window (or None) per layer.")
        if self.mla_latent_dim is not None and self.mla_latent_dim < 1:
            raise ValueError("mla_latent_dim must be at least 1 when set.")

    def window_of(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def values_per_token_per_layer(self) -> int:
        """How many K and V values one token stores in one layer."""
        if self.mla_latent_dim is not None:
            return self.mla_latent_dim
        return 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> "KVShape":
        if config.mla is not None:  # one vector per token per layer, no heads
            latent = config.mla.latent_dim
            return cls(config.num_layers, 1, latent, mla_latent_dim=latent)
        windows = config.windows if any(w is not None for w in config.windows) else ()
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, windows)


def group_size_for(dtype: KVDtype, head_dim: int, group_size: int | None) -> int | None:
    """The value-scale group size in effect (values of one token per scale), validated against head_dim.
    By default: the format's group size, or the largest divisor of head_dim below it (head_dim 96
    takes int8's and fp8's scales per 48 values, 80 per 40)."""
    if group_size is None and dtype.default_group_size is not None:
        group_size = max(g for g in range(1, min(dtype.default_group_size, head_dim) + 1) if head_dim % g == 0)
    if group_size is None:
        return None
    if dtype.bits >= 16:
        raise ValueError(f"{dtype.name} stores no scales; --group-size applies to fp8, int8 and int4.")
    if group_size < 1 or head_dim % group_size != 0:
        raise ValueError(f"group size {group_size} must be a positive divisor of head_dim {head_dim}.")
    return group_size


def layer_bytes(shape: KVShape, tokens: int, dtype: KVDtype, group_size: int | None, block_size: int) -> int:
    """Exact bytes one layer of one sequence holds for ``tokens`` tokens, packing and scales included.

        codes    tokens x 2 x kv_heads x head_dim x bits / 8
        V scales tokens x kv_heads x (head_dim / group_size) x scale_bytes         (per token)
        K scales the same as V's (int8), or, with keys per channel (fp8, int4):
                 ceil(tokens / block_size) x kv_heads x head_dim x key_scale_bytes (per channel per block)

    An MLA layer quantizes its latent vector per token, like V.
    """
    if group_size is None:
        return tokens * shape.values_per_token_per_layer() * dtype.bits // 8
    if shape.mla_latent_dim is not None:
        latent = shape.mla_latent_dim
        return tokens * (latent * dtype.bits // 8 + latent // group_size * dtype.scale_bytes)
    heads, hd = shape.num_kv_heads, shape.head_dim
    key_scale_bytes = dtype.key_scale_bytes or dtype.scale_bytes
    per_token = 2 * heads * hd * dtype.bits // 8 + heads * (hd // group_size) * dtype.scale_bytes
    if not dtype.keys_per_channel:
        return tokens * (per_token + heads * (hd // group_size) * key_scale_bytes)
    return tokens * per_token + -(-tokens // block_size) * heads * hd * key_scale_bytes


@dataclass(frozen=True)
class KVEstimate:
    """The planner's answer for one (model, seq_len, batch, dtype)."""

    shape: KVShape
    seq_len: int
    batch: int
    dtype: KVDtype
    group_size: int | None
    total_bytes: int
    full_context_bytes: int  # what the same cache would cost with no sliding windows

    @property
    def bytes_per_token(self) -> float:
        return self.total_bytes / (self.seq_len * self.batch)

    @property
    def bytes_per_element(self) -> float:
        """Bytes per cached value, scales included (at the full context, no window)."""
        values = self.shape.values_per_token_per_layer() * self.shape.num_layers * self.seq_len * self.batch
        return self.full_context_bytes / values


def kv_bytes(shape: KVShape, seq_len: int, batch: int = 1, dtype: str = "fp16",
             group_size: int | None = None, block_size: int | None = None) -> KVEstimate:
    """Bytes of KV cache for ``batch`` sequences of ``seq_len`` tokens each.

    Exact to the byte for the formats in ``KV_DTYPES`` as the engine lays them out (see
    :func:`layer_bytes`): sliding layers count min(seq_len, window) tokens, quantized formats include
    their packed bytes and their scales (keys' scales per ``block_size``-token block; default: the
    format's own block size, as the engine's).
    """
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be at least 1, got {seq_len} and {batch}.")
    fmt = kv_dtype(dtype)
    block_size = fmt.default_block_size if block_size is None else block_size
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}.")
    group = group_size_for(fmt, shape.head_dim if shape.mla_latent_dim is None else shape.mla_latent_dim,
                           group_size)
    total = 0
    for layer in range(shape.num_layers):
        window = shape.window_of(layer)
        tokens = seq_len if window is None else min(seq_len, window)
        total += layer_bytes(shape, tokens, fmt, group, block_size) * batch
    full = layer_bytes(shape, seq_len, fmt, group, block_size) * batch * shape.num_layers
    return KVEstimate(shape, seq_len, batch, fmt, group, total, full)


# --- presets: facts from each model's published config.json -----------------------------------

@dataclass(frozen=True)
class ModelPreset:
    name: str
    shape: KVShape
    num_params: int
    max_context: int
    source: str


def _hybrid_windows(num_layers: int, window: int, global_every: int) -> tuple[int | None, ...]:
    """Gemma-3 style: every ``global_every``-th layer is global, the others slide."""
    return tuple(None if (i + 1) % global_every == 0 else window for i in range(num_layers))


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("llama-2-70b", KVShape(80, 8, 128), 68_976_648_192, 4096,
                    "meta-llama/Llama-2-70b-hf: 80 layers, 64 heads, 8 KV heads (GQA), head_dim 128"),
        ModelPreset("llama-3-8b", KVShape(32, 8, 128), 8_030_261_248, 8192,
                    "meta-llama/Meta-Llama-3-8B: 32 layers, 32 heads, 8 KV heads, head_dim 128"),
        ModelPreset("llama-3-70b", KVShape(80, 8, 128), 70_553_706_496, 8192,
                    "meta-llama/Meta-Llama-3-70B: 80 layers, 64 heads, 8 KV heads, head_dim 128"),
        ModelPreset("mistral-7b", KVShape(32, 8, 128, (4096,) * 32), 7_241_732_096, 32768,
                    "mistralai/Mistral-7B-v0.1: 32 layers, 8 KV heads, head_dim 128, sliding window 4096"),
        ModelPreset("qwen2.5-7b", KVShape(28, 4, 128), 7_615_616_512, 32768,
                    "Qwen/Qwen2.5-7B: 28 layers, 28 heads, 4 KV heads, head_dim 128"),
        ModelPreset("gemma-3-27b", KVShape(62, 16, 128, _hybrid_windows(62, 1024, 6)), 27_432_406_640,
                    131072, "google/gemma-3-27b: 62 layers, 16 KV heads, head_dim 128, "
                    "5 sliding (window 1024) : 1 global"),
        ModelPreset("gemma-3-270m", KVShape(18, 1, 256, _hybrid_windows(18, 512, 6)), 268_098_176, 32768,
                    "google/gemma-3-270m: 18 layers, 4 heads, 1 KV head (MQA), head_dim 256, "
                    "5 sliding (window 512) : 1 global"),
        ModelPreset("deepseek-v3", KVShape(61, 1, 576, mla_latent_dim=512 + 64), 671_026_419_200, 163840,
                    "deepseek-ai/DeepSeek-V3: 61 layers, MLA kv_lora_rank 512 + qk_rope_head_dim 64"),
        ModelPreset("smollm2-135m", KVShape(30, 3, 64), 134_515_008, 8192,
                    "HuggingFaceTB/SmolLM2-135M-Instruct: 30 layers, 9 heads, 3 KV heads, head_dim 64"),
    )
}


def preset(name: str) -> ModelPreset:
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[key]


def count_params(config: ModelConfig) -> int:
    """Parameters of a llama-family, Gemma-3 or DeepSeek decoder (embeddings, attention, gated MLP or
    experts, norms, head; Gemma-3 adds two norms per layer and a q and k norm per head)."""
    if config.mla is not None:
        return _count_mla_params(config)
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if config.attention_bias else 0) + \
        (h if config.output_bias else 0)
    norms = 4 * h + 2 * config.head_dim if config.architecture == "gemma3" else 2 * h
    per_layer = attention + 3 * h * config.intermediate_size + norms
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return config.vocab_size * h + config.num_layers * per_layer + h + head


def _count_mla_params(config: ModelConfig) -> int:
    """A DeepSeek-V2/V3 decoder: MLA projections, dense MLP or routed + shared experts (and the gate)."""
    h, heads, mla, moe = config.hidden_size, config.num_heads, config.mla, config.moe
    q_out = heads * mla.qk_head_dim
    q = h * q_out if mla.q_lora_rank is None else h * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * q_out
    attention = q + h * mla.latent_dim + mla.kv_lora_rank + \
        mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim) + heads * mla.v_head_dim * h
    total = config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + h
    for layer in range(config.num_layers):
        if moe is not None and moe.is_moe_layer(layer):
            mlp = 3 * h * moe.intermediate_size * (moe.num_experts + moe.num_shared_experts) + moe.num_experts * h
        else:
            mlp = 3 * h * config.intermediate_size
        total += attention + mlp + 2 * h
    return total


# --- capacity questions ---------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str | int | float, default_unit: str = "") -> int:
    """'2GB' -> 2_000_000_000, '1.5GiB' -> 1_610_612_736, '4096' -> 4096 (decimal GB, binary GiB)."""
    if isinstance(text, (int, float)):
        return int(text * _UNITS[default_unit])
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"Cannot read {text!r} as a size; write e.g. 2GB, 512MiB or 1000000.")
    unit = (match.group(2) or default_unit).lower().rstrip("b")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Capacity:
    kv_budget_bytes: int
    max_batch_at_seq_len: int
    max_seq_len_at_batch: int | None  # None: unbounded (every layer is windowed)
    crossover_seq_len_at_batch: int | None  # KV > weights from this seq_len on (None: never)
    crossover_batch_at_seq_len: int | None


def _smallest_seq_len(shape: KVShape, batch: int, dtype: str, group_size: int | None,
                      exceeds: int, limit: int = 1 << 40) -> int | None:
    """Smallest seq_len whose KV bytes exceed ``exceeds`` (None if no seq_len up to limit does)."""
    def over(n: int) -> bool:
        return kv_bytes(shape, n, batch, dtype, group_size).total_bytes > exceeds
    if not over(limit):
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if over(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def capacity(shape: KVShape, memory_bytes: int, weights_bytes: int, seq_len: int, batch: int,
             dtype: str, group_size: int | None = None) -> Capacity:
    """Answer the capacity questions for a memory budget that must also hold the weights."""
    budget = memory_bytes - weights_bytes
    if budget <= 0:
        raise ValueError(f"The weights ({weights_bytes / 1e9:.2f} GB) do not fit in "
                         f"{memory_bytes / 1e9:.2f} GB; there is no memory left for a KV cache.")
    per_sequence = kv_bytes(shape, seq_len, 1, dtype, group_size).total_bytes
    first_over_budget = _smallest_seq_len(shape, batch, dtype, group_size, budget)
    crossover_seq = _smallest_seq_len(shape, batch, dtype, group_size, weights_bytes)
    crossover_batch = weights_bytes // per_sequence + 1
    return Capacity(
        kv_budget_bytes=budget,
        max_batch_at_seq_len=budget // per_sequence,
        max_seq_len_at_batch=None if first_over_budget is None else first_over_budget - 1,
        crossover_seq_len_at_batch=crossover_seq,
        crossover_batch_at_seq_len=crossover_batch,
    )


def human_bytes(n: float) -> str:
    """Decimal units, three significant figures: 10737418240 -> '10.7 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# --- the engine's own pool ------------------------------------------------------------------

def block_bytes(shape: KVShape, block_size: int, dtype: str) -> int:
    """Bytes of one paged block: ``block_size`` tokens in every layer (the pool keeps all tokens)."""
    full = KVShape(shape.num_layers, shape.num_kv_heads, shape.head_dim, mla_latent_dim=shape.mla_latent_dim)
    return kv_bytes(full, block_size, 1, dtype, block_size=block_size).total_bytes


def num_blocks_for_budget(shape: KVShape, budget_bytes: int, block_size: int, dtype: str) -> int:
    """How many whole blocks fit in ``budget_bytes``; raises if not even one does."""
    return blocks_in_budget(block_bytes(shape, block_size, dtype), budget_bytes, block_size)


def blocks_in_budget(per_block: int, budget_bytes: int, block_size: int) -> int:
    """``budget_bytes // per_block``, or a ValueError when not even one block of ``block_size`` fits."""
    if budget_bytes < per_block:
        raise ValueError(f"A KV budget of {human_bytes(budget_bytes)} holds no block: one block of "
                         f"{block_size} tokens needs {human_bytes(per_block)}.")
    return budget_bytes // per_block
