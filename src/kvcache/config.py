"""Frozen, validated configuration objects.

Every config here is plain data: it is built once, validated in ``__post_init__`` with real
exceptions (``ValueError`` with a sentence a person can act on), and never written to again.
Derived values are returned by methods, not stored back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")
# config.json model_type -> architecture (a multimodal gemma3 config nests the text model's facts)
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
GEMMA3_LOCAL_ROPE_THETA = 10000.0  # RoPE base of Gemma-3's sliding layers when the file does not say
GEMMA3_SLIDING_PATTERN = 6  # every 6th Gemma-3 layer is global when the file does not list layer types
MODEL_DTYPES = ("float32", "bfloat16")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """The facts about a decoder-only transformer that the runtime and the planner need."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on the Q, K, V projections
    output_bias: bool = False  # a bias on the attention output projection (llama's attention_bias)
    sliding_window: int | None = None
    # per layer: its window (None = full attention); () = every layer has ``sliding_window``
    layer_windows: tuple[int | None, ...] = ()
    rope_local_theta: float | None = None  # RoPE base of sliding layers, where it differs (Gemma-3: 10k)
    rope_scaling_factor: float = 1.0  # linear RoPE scaling of full-attention layers (Gemma-3 4B and up: 8)
    query_pre_attn_scalar: float | None = None  # attention scores scale by this ** -0.5 (None: head_dim)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap) when set

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_windows", tuple(self.layer_windows))  # a list from JSON
        _require(
            self.architecture in SUPPORTED_ARCHITECTURES,
            f"Unsupported architecture {self.architecture!r}; kvcache runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models.",
        )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            _require(getattr(self, name) >= 1, f"Model config field {name} must be at least 1.")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}).",
        )
        _require(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        _require(self.sliding_window is None or self.sliding_window >= 1,
                 "sliding_window must be at least 1 when set.")
        _require(not self.layer_windows or len(self.layer_windows) == self.num_layers,
                 f"layer_windows names {len(self.layer_windows)} layers; the model has {self.num_layers}.")
        _require(all(w is None or w >= 1 for w in self.layer_windows),
                 "Every sliding window in layer_windows must be at least 1 token.")
        for name in ("rope_scaling_factor", "query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"Model config field {name} must be positive, got {value}.")

    def window_of(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window in tokens, or None where it attends to every token."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Every layer's window (None: full attention), in layer order."""
        return tuple(self.window_of(i) for i in range(self.num_layers))

    @property
    def attention_scale(self) -> float:
        """The softmax scale of attention scores: 1/sqrt(query_pre_attn_scalar or head_dim)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict (llama, mistral, qwen2, gemma3_text model types;
        a multimodal gemma3 config is read through its ``text_config``)."""
        model_type = config.get("model_type", "")
        if model_type == "gemma3" and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]
        _require(
            model_type in HF_MODEL_TYPES,
            f"Unsupported model_type {model_type!r} in config.json; kvcache runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models.",
        )
        arch = HF_MODEL_TYPES[model_type]
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            head_dim = config.get("head_dim") or hidden // heads
            layers = int(config["num_hidden_layers"])
            extra = _gemma3_hf_fields(config, layers) if arch == "gemma3" else _llama_hf_fields(config)
            return cls(
                architecture=arch,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", arch == "gemma3")),
                attention_bias=bool(config.get("attention_bias", arch == "qwen2")),
                output_bias=arch != "qwen2" and bool(config.get("attention_bias", False)),
                **extra,
            )
        except KeyError as missing:
            raise ValueError(f"config.json is missing the field {missing.args[0]!r}.") from None

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], vocab_size: int,
                           has_output_weight: bool) -> "ModelConfig":
        """Read GGUF metadata (``<arch>.block_count`` etc.) as written by llama.cpp's converter."""
        arch = meta.get("general.architecture", "")
        _require(
            arch in SUPPORTED_ARCHITECTURES,
            f"Unsupported GGUF architecture {arch!r}; kvcache runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models.",
        )

        def field(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            _require(value is not None, f"GGUF metadata is missing {arch}.{name}.")
            return value

        hidden = int(field("embedding_length"))
        heads = int(field("attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                       or hidden // heads)
        layers = int(field("block_count"))
        sliding = meta.get(f"{arch}.attention.sliding_window")
        extra = _gemma3_gguf_fields(meta, layers, hidden // heads, head_dim) if arch == "gemma3" else {}
        return cls(
            architecture=arch,
            vocab_size=int(meta.get(f"{arch}.vocab_size") or vocab_size),
            hidden_size=hidden,
            intermediate_size=int(field("feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(field("attention.head_count_kv", heads)),
            head_dim=head_dim,
            max_position_embeddings=int(field("context_length", 2048)),
            rope_theta=float(field("rope.freq_base", 10000.0)),
            rms_norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings=not has_output_weight,
            attention_bias=arch == "qwen2",
            sliding_window=int(sliding) if sliding else None,
            **extra,
        )


def _llama_hf_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE base and window of a llama-family config.json (plain RoPE only)."""
    sliding = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    rope = config.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
    scaling = config.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    _require(kind in ("default", None), f"RoPE scaling {kind!r} is not supported yet; only plain RoPE is.")
    return {"rope_theta": float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            "sliding_window": int(sliding) if sliding else None}


def _gemma3_hf_fields(config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Gemma-3's own facts from config.json: which layers slide, two RoPE bases, the score scale.

    Reads both spellings: the Hub's (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``,
    ``sliding_window_pattern``) and transformers 5's (``rope_parameters`` per layer type, ``layer_types``).
    """
    _require(not config.get("attn_logit_softcapping"), "Attention logit softcapping is not supported yet.")
    _require(not config.get("use_bidirectional_attention"),
             "Bidirectional (embedding) Gemma-3 models are not supported; kvcache runs causal ones.")
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    _require(activation == "gelu_pytorch_tanh", f"Gemma-3 with activation {activation!r} is not supported; "
             "kvcache runs gelu_pytorch_tanh.")
    window = int(config.get("sliding_window") or 4096)
    pattern = int(config.get("sliding_window_pattern") or GEMMA3_SLIDING_PATTERN)
    types = config.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                          for i in range(num_layers)]
    _require(len(types) == num_layers and set(types) <= {"sliding_attention", "full_attention"},
             "config.json's layer_types must name sliding_attention or full_attention for every layer.")
    rope = config.get("rope_parameters") or {}
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    scaling = config.get("rope_scaling") or full
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    _require(kind in ("default", "linear", None) and local.get("rope_type", "default") == "default",
             f"RoPE scaling {kind!r} is not supported for Gemma-3; plain and linear RoPE are.")
    return {
        "sliding_window": window,
        "layer_windows": tuple(window if t == "sliding_attention" else None for t in types),
        "rope_theta": float(config.get("rope_theta") or full.get("rope_theta") or 1_000_000.0),
        "rope_local_theta": float(config.get("rope_local_base_freq") or local.get("rope_theta")
                                  or GEMMA3_LOCAL_ROPE_THETA),
        "rope_scaling_factor": float(scaling.get("factor") or 1.0) if kind == "linear" else 1.0,
        "query_pre_attn_scalar": float(config.get("query_pre_attn_scalar") or 256),
        "final_logit_softcapping": config.get("final_logit_softcapping") or None,
    }


def _gemma3_gguf_fields(meta: Mapping[str, Any], num_layers: int, hidden_per_head: int,
                        head_dim: int) -> dict[str, Any]:
    """Gemma-3's own facts from GGUF metadata, with llama.cpp's defaults where the file is silent:
    every 6th layer global, local RoPE base 10,000, scores scaled by 1/sqrt(head_dim) except on the
    27B (62 layers), which uses 1/sqrt(hidden / heads) as its config.json does."""
    window = int(meta.get("gemma3.attention.sliding_window") or 4096)
    pattern = meta.get("gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
    if isinstance(pattern, (list, tuple)):  # one flag per layer: True where the layer slides
        _require(len(pattern) == num_layers, "gemma3.attention.sliding_window_pattern must name every layer.")
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [bool((i + 1) % int(pattern)) for i in range(num_layers)]
    kind = meta.get("gemma3.rope.scaling.type") or "none"
    _require(kind in ("none", "linear"), f"RoPE scaling {kind!r} is not supported for Gemma-3; plain and "
             "linear RoPE are.")
    cap = meta.get("gemma3.final_logit_softcapping")
    return {
        "layer_windows": tuple(window if s else None for s in sliding),
        "rope_local_theta": float(meta.get("gemma3.rope.freq_base_swa") or GEMMA3_LOCAL_ROPE_THETA),
        "rope_scaling_factor": float(meta.get("gemma3.rope.scaling.factor") or 1.0) if kind == "linear" else 1.0,
        "query_pre_attn_scalar": float(hidden_per_head if num_layers == 62 else head_dim),
        "final_logit_softcapping": float(cap) if cap else None,
    }


@dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is laid out: block size and how many blocks (or a byte budget)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(1 <= self.block_size <= 1024, f"block_size must be between 1 and 1024, got {self.block_size}.")
        _require(self.num_blocks is None or self.num_blocks >= 1,
                 f"num_blocks must be at least 1, got {self.num_blocks}.")
        _require(self.kv_cache_memory is None or self.kv_cache_memory >= 1,
                 f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}.")
        _require(self.num_blocks is None or self.kv_cache_memory is None,
                 "Give num_blocks or kv_cache_memory, not both.")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step, tokens per step, prefill chunking."""

    @property
    def prefill_chunk(self) -> int:
        """The most prompt tokens one request computes in one step."""
        return self.long_prefill_token_threshold or self.max_num_batched_tokens

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int | None = None  # None: a prefill chunk is bounded by the step budget only
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        _require(self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}.")
        _require(self.long_prefill_token_threshold is None or self.long_prefill_token_threshold >= 1,
                 "long_prefill_token_threshold must be at least 1 when set.")
        _require(self.preemption_mode in ("recompute", "swap"),
                 f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}.")


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding for one engine: who drafts (``ngram`` prompt lookup, or a ``draft`` model
    with the target's vocabulary) and how many tokens per step it may draft (k >= 1)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    draft_model: str | None = None
    ngram_max: int = 4  # prompt lookup matches the last ngram_max .. ngram_min tokens
    ngram_min: int = 2
    adaptive: bool = True  # verify drafts only where the engine's step times say they pay

    def __post_init__(self) -> None:
        _require(self.method in SPECULATIVE_METHODS,
                 f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}.")
        k = self.num_speculative_tokens
        _require(_is_int(k) and k >= 1, f"num_speculative_tokens must be an integer of at least 1, got {k!r}.")
        _require(k <= 64, f"num_speculative_tokens must be at most 64, got {k}.")
        _require(self.method != "draft" or bool(self.draft_model),
                 "speculative='draft' needs a draft model (draft_model / --draft-model PATH).")
        _require(self.method == "draft" or self.draft_model is None,
                 "A draft model is only used with speculative='draft'.")
        _require(_is_int(self.ngram_min) and _is_int(self.ngram_max) and 1 <= self.ngram_min <= self.ngram_max,
                 f"The n-gram sizes must satisfy 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}.")
        _require(isinstance(self.adaptive, bool), f"adaptive must be True or False, got {self.adaptive!r}.")


def speculative_config(method: str | SpeculativeConfig | None, num_tokens: int | None,
                       draft_model: str | None, adaptive: bool = True) -> SpeculativeConfig | None:
    """Speculative decoding settings from the engine's keyword arguments (None: off); ``method``
    may also be a whole :class:`SpeculativeConfig`."""
    if isinstance(method, SpeculativeConfig) and num_tokens is None and draft_model is None:
        return method if adaptive else replace(method, adaptive=False)
    if method is None:
        _require(num_tokens is None and draft_model is None and adaptive,
                 "num_speculative_tokens, draft_model and adaptive_speculation need speculative='ngram' "
                 "or 'draft' (--speculative ngram|draft).")
        return None
    return SpeculativeConfig(method, 4 if num_tokens is None else num_tokens, draft_model, adaptive=adaptive)


def parse_model_dtype(dtype: str) -> str:
    """Return the canonical model dtype name, or raise a clear ValueError."""
    aliases = {"float32": "float32", "fp32": "float32", "f32": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}
    _require(isinstance(dtype, str) and dtype.lower() in aliases,
             f"Unknown dtype {dtype!r}; use float32 or bfloat16.")
    return aliases[dtype.lower()]


SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts
GREEDY_BELOW = 1e-5  # a temperature this small is greedy: dividing logits by it would overflow
MAX_SALT_CHARS = 256
OUTPUT_KINDS = ("cumulative", "delta", "final")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def is_text(value: Any) -> bool:
    """A str that is valid Unicode text (no lone surrogates), so it can be encoded and hashed."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; the names and defaults follow vLLM.

    Every field is checked here, so a request that is built is one the engine can run: seeds fit a
    64-bit generator (sample i of n uses (seed + i) mod 2**64), temperatures and top_p are finite,
    a temperature below 1e-5 means greedy, strings are valid Unicode.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: Sequence[str] | str | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    cache_salt: str | None = None
    output_kind: str = "cumulative"  # every output carries everything so far; "delta": only what is
    # new since the last output (a long stream then costs O(n), not O(n^2)); "final": only the last

    def __post_init__(self) -> None:
        for name in ("n", "max_tokens"):
            value = getattr(self, name)
            _require(_is_int(value), f"{name} must be an integer, got {value!r}.")
            _require(value >= 1, f"{name} must be at least 1, got {value}.")
        for name in ("temperature", "top_p"):
            _require(_is_real(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)!r}.")
        _require(self.temperature >= 0, f"temperature must be at least 0, got {self.temperature}.")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}.")
        _require(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
                 f"top_k must be -1 (off) or an integer of at least 1, got {self.top_k!r}.")
        _require(self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
                 f"seed must be an integer between {SEED_MIN} and {SEED_MAX}, got {self.seed!r}.")
        _require(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
                 f"logprobs must be an integer between 0 and 20, got {self.logprobs!r}.")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        _require(all(is_text(s) and s for s in self.stop or ()),
                 "stop must be a string or a list of non-empty strings of valid Unicode text.")
        _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids or ()),
                 "stop_token_ids must be a list of non-negative token ids.")
        _require(self.output_kind in OUTPUT_KINDS,
                 f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}.")
        salt = self.cache_salt
        _require(salt is None or (is_text(salt) and 0 < len(salt) <= MAX_SALT_CHARS),
                 f"cache_salt must be a non-empty string of valid Unicode text, at most {MAX_SALT_CHARS} "
                 "characters (leave it out to share the unsalted prefix cache).")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def sample_seed(self, index: int) -> int | None:
        """The seed of sample ``index`` of n: seed + index, wrapped into the generator's 64 bits."""
        return None if self.seed is None else (self.seed + index) % (1 << 64)
