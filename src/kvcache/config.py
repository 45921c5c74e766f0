"""Frozen, validated configuration objects.

Every config here is plain data: it is built once, validated in ``__post_init__`` with real
exceptions (``ValueError`` with a sentence a person can act on), and never written to again.
Derived values are returned by methods, not stored back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3", "deepseek_v2", "deepseek_v3")
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")  # what the GGUF reader maps
MLA_ARCHITECTURES = ("deepseek_v2", "deepseek_v3")  # multi-head latent attention: one latent vector cached
# config.json model_type -> architecture (a multimodal gemma3 config nests the text model's facts)
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3",
                  "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3"}
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
    mla: MLAConfig | None = None  # DeepSeek-V2/V3 latent attention (head_dim is then the q/k head width)
    moe: MoEConfig | None = None  # routed + shared experts on some layers (the others: the dense MLP)
    yarn: YarnConfig | None = None  # YaRN RoPE scaling (DeepSeek's long-context configs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_windows", tuple(self.layer_windows))  # a list from JSON
        for name, cls in (("mla", MLAConfig), ("moe", MoEConfig), ("yarn", YarnConfig)):
            if isinstance(getattr(self, name), Mapping):  # asdict() output read back from JSON
                object.__setattr__(self, name, cls(**getattr(self, name)))
        _require((self.mla is not None) == (self.architecture in MLA_ARCHITECTURES),
                 f"Architecture {self.architecture!r} {'needs' if self.mla is None else 'takes no'} MLA settings.")
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
            extra = _gemma3_hf_fields(config, layers) if arch == "gemma3" else \
                _deepseek_hf_fields(config, arch) if arch in MLA_ARCHITECTURES else _llama_hf_fields(config)
            return cls(
                architecture=arch,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(extra.pop("num_kv_heads", None) or config.get("num_key_value_heads") or heads),
                head_dim=int(extra.pop("head_dim", head_dim)),
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
            arch in GGUF_ARCHITECTURES,
            f"Unsupported GGUF architecture {arch!r}; kvcache runs "
            f"{', '.join(GGUF_ARCHITECTURES)} models.",
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


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention, per layer:

        q        = q_b(norm(q_a(x))) or q_proj(x)             [heads, qk_nope + qk_rope]
        c, k_pe  = split(kv_a_proj_with_mqa(x))                [kv_lora_rank], [qk_rope]   (shared by all heads)
        cached   = [norm(c) | rope(k_pe)]                      latent_dim values per token
        k, v     = kv_b(norm(c)) per head                      [heads, qk_nope], [heads, v_head_dim]
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: one plain q_proj
    rope_interleave: bool = True  # the rope dims of q and k_pe come in (even, odd) pairs

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require(getattr(self, name) >= 1, f"MLA field {name} must be at least 1, got {getattr(self, name)}.")
        _require(self.q_lora_rank is None or self.q_lora_rank >= 1, "q_lora_rank must be at least 1 when set.")
        _require(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}.")

    @property
    def latent_dim(self) -> int:
        """Values one token caches per layer: the normalized latent and the rotated shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


MOE_SCORING = ("softmax", "sigmoid")
MOE_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts (``experts_per_token`` of ``num_experts`` per token) plus always-on shared
    experts, on layers ``first_dense`` on (every ``layer_freq``-th); DeepSeek's gates:

        V2: softmax scores; top-k over all experts (greedy) or within the best ``topk_group`` of
            ``n_group`` groups by their best score (group_limited_greedy)
        V3: sigmoid scores; choice by score + correction bias within the best groups by the sum of
            their two best (noaux_tc); weights are the scores without the bias
        then: normalized to sum 1 where ``norm_topk_prob``, times ``routed_scaling_factor``
    """

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    num_shared_experts: int = 0
    first_dense: int = 0
    layer_freq: int = 1
    scoring: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_experts", "experts_per_token", "intermediate_size", "layer_freq", "n_group", "topk_group"):
            _require(getattr(self, name) >= 1, f"MoE field {name} must be at least 1, got {getattr(self, name)}.")
        _require(self.experts_per_token <= self.num_experts,
                 f"num_experts_per_tok ({self.experts_per_token}) exceeds n_routed_experts ({self.num_experts}).")
        _require(self.scoring in MOE_SCORING, f"MoE scoring_func {self.scoring!r} is not supported; use "
                 f"{' or '.join(MOE_SCORING)}.")
        _require(self.topk_method in MOE_TOPK_METHODS, f"MoE topk_method {self.topk_method!r} is not supported; "
                 f"use one of {', '.join(MOE_TOPK_METHODS)}.")
        _require(self.topk_method != "noaux_tc" or self.scoring == "sigmoid",
                 "topk_method noaux_tc needs scoring_func sigmoid.")
        _require(self.num_experts % self.n_group == 0 and self.topk_group <= self.n_group,
                 f"n_group ({self.n_group}) must divide n_routed_experts ({self.num_experts}) and be at least "
                 f"topk_group ({self.topk_group}).")
        _require(self.topk_method != "noaux_tc" or self.num_experts // self.n_group >= 2,
                 "noaux_tc ranks groups by their two best experts; every group needs at least two.")

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense and layer % self.layer_freq == 0


@dataclass(frozen=True)
class YarnConfig:
    """YaRN RoPE scaling as DeepSeek uses it: frequencies blended between interpolated (/ factor)
    and original by a ramp over the dims, cos/sin times ``attention_factor``, and the softmax scale
    times mscale(factor, mscale_all_dim) ** 2."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # None: derived from factor and the mscales
    truncate: bool = True

    def __post_init__(self) -> None:
        _require(self.factor > 0 and self.original_max_position_embeddings >= 1,
                 "YaRN RoPE scaling needs a positive factor and original_max_position_embeddings.")

    def cos_sin_factor(self) -> float:
        """What cos and sin (and so the rotated q and k) are multiplied by."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def softmax_scale_factor(self) -> float:
        """What the attention scores' scale is multiplied by (DeepSeek: mscale_all_dim ** 2)."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _deepseek_hf_fields(config: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """DeepSeek-V2/V3's own facts from config.json: the MLA sizes, the experts, YaRN."""
    _require(not config.get("mlp_bias"), "DeepSeek configs with mlp_bias are not supported.")
    activation = config.get("hidden_act", "silu")
    _require(activation == "silu", f"DeepSeek with activation {activation!r} is not supported; kvcache runs silu.")
    mla = MLAConfig(int(config["kv_lora_rank"]), int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"]),
                    int(config["v_head_dim"]), None if config.get("q_lora_rank") is None else int(config["q_lora_rank"]),
                    arch == "deepseek_v2" or bool(config.get("rope_interleave", True)))
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    _require(kind in ("default", "yarn", None), f"RoPE scaling {kind!r} is not supported for DeepSeek; plain "
             "and yarn RoPE are.")
    yarn = None
    if kind == "yarn":
        original = int(rope.get("original_max_position_embeddings") or config.get("max_position_embeddings", 4096))
        factor = rope.get("factor") or int(config.get("max_position_embeddings", original)) / original
        yarn = YarnConfig(float(factor), original, float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1),
                          rope.get("mscale"), rope.get("mscale_all_dim"), rope.get("attention_factor"),
                          bool(rope.get("truncate", True)))
    heads = int(config["num_attention_heads"])
    return {"mla": mla, "moe": _deepseek_moe(config, arch), "yarn": yarn, "num_kv_heads": heads,
            "head_dim": mla.qk_head_dim,
            "rope_theta": float(config.get("rope_theta") or rope.get("rope_theta")
                                or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)}


def _deepseek_moe(config: Mapping[str, Any], arch: str) -> MoEConfig | None:
    """The experts of a DeepSeek config.json, or None for a dense model."""
    experts = config.get("n_routed_experts")
    if not experts or not config.get("num_experts_per_tok"):
        return None
    v3 = arch == "deepseek_v3"
    method = config.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    scoring = config.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    _require(v3 or not config.get("norm_topk_prob"), "DeepSeek-V2 with norm_topk_prob is not supported (DeepSeek's "
             "code and transformers disagree on what it means; every published V2 config sets it false).")
    return MoEConfig(int(experts), int(config["num_experts_per_tok"]), int(config["moe_intermediate_size"]),
                     int(config.get("n_shared_experts") or 0), int(config.get("first_k_dense_replace") or 0),
                     int(config.get("moe_layer_freq") or 1), scoring, method, int(config.get("n_group") or 1),
                     int(config.get("topk_group") or 1), bool(config.get("norm_topk_prob", v3)),
                     float(config.get("routed_scaling_factor") or 1.0))


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
    """Return the canonical model dtype name ("auto" stays "auto": the engine picks for its CPU), or
    raise a clear ValueError."""
    aliases = {"float32": "float32", "fp32": "float32", "f32": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": "auto"}
    _require(isinstance(dtype, str) and dtype.lower() in aliases,
             f"Unknown dtype {dtype!r}; use auto, float32 or bfloat16.")
    return aliases[dtype.lower()]


WEIGHTS_DTYPES = ("auto", "float32", "bfloat16", "int8", "int4")


def parse_weights_dtype(weights_dtype: str) -> str:
    """The canonical weights dtype name (see kvcache.models.packed.weight_format), or a ValueError
    that lists the choices."""
    aliases = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "int8": "int8", "q8_0": "int8", "int4": "int4", "q4_1": "int4"}
    _require(isinstance(weights_dtype, str) and weights_dtype.lower() in aliases,
             f"Unknown weights dtype {weights_dtype!r}; use one of {', '.join(WEIGHTS_DTYPES)}.")
    return aliases[weights_dtype.lower()]


SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts
GREEDY_BELOW = 1e-5  # a temperature this small is greedy: dividing logits by it would overflow
MAX_SALT_CHARS = 256
OUTPUT_KINDS = ("cumulative", "delta", "final")
KV_POLICIES = ("full", "streaming", "h2o", "snapkv")  # see kvcache.cache.policies


def check_kv_budget(budget: Any) -> None:
    """A KV budget is None, a whole number of tokens (>= 1) or a fraction of the sequence in (0, 1]."""
    if budget is None or (_is_int(budget) and budget >= 1):
        return
    _require(isinstance(budget, float) and math.isfinite(budget) and 0 < budget <= 1,
             f"kv_budget must be a number of tokens (an integer of at least 1) or a fraction of the sequence "
             f"in (0, 1], got {budget!r}.")


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
    kv_policy: str | None = None  # full, streaming, h2o or snapkv (None: the engine's default)
    kv_budget: int | float | None = None  # KV tokens kept, or a fraction of prompt + max_tokens (None: the engine's)

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
        _require(self.kv_policy is None or self.kv_policy in KV_POLICIES,
                 f"kv_policy must be one of {', '.join(KV_POLICIES)}, got {self.kv_policy!r}.")
        check_kv_budget(self.kv_budget)
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
