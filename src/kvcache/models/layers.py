"""The pieces the architectures share: RMSNorm in its two conventions, rotary embeddings with a
per-layer base, fused-QKV attention, the gated MLP.

A model file (``llama.py``, ``gemma3.py``) wires these together in its own order; nothing here
knows which model it serves.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvcache.cache.storage import LayerCache
from kvcache.config import ModelConfig
from kvcache.models.attention import AttentionMetadata
from kvcache.models.packed import PackedEmbedding, PackedLinear, PackedWeight, matmul, project, uses_kernel

AttentionFn = Callable[..., torch.Tensor]
CosSin = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """Llama's RMSNorm: ``weight * normalized(x)``, normalized in float32 and cast back first."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the scale is ``1 + weight`` (weights are stored centred on 0), applied in
    float32 before the cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin of each position's angles (HF's rotate_half convention), computed from the inverse
    frequencies: position x inv_freq in float32, as transformers does. ``scaling`` > 1 is linear RoPE
    scaling (positions divided by it). :meth:`tables_for` computes a step's rows; :meth:`table` keeps
    the rows of the positions seen so far (the fused decode step reads them)."""

    def __init__(self, head_dim: int, theta: float, scaling: float = 1.0) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)  # [hd/2]
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the inverse frequencies on the buffer's device (also after a meta-device build)."""
        if self.inv_freq.is_meta:
            return
        hd, device = self.head_dim, self.inv_freq.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float) / hd))
        self.inv_freq = inv_freq / self.scaling

    def table(self, length: int) -> CosSin:
        """float32 (cos, sin), each [>= length, hd]: row p is what :meth:`tables_for` gives position p
        (the same operators on the same values), so a decode step indexes it instead of computing its
        own. Kept for the positions seen so far (8 x head_dim bytes a position) and grown by at least
        doubling, computing only the new rows; rebuilt when ``inv_freq`` is another tensor (a reset,
        a move, a cast)."""
        kept = getattr(self, "_table", None)
        if kept is not None and kept[2] is not self.inv_freq:
            kept = None
        have = 0 if kept is None else kept[0].shape[0]
        if have < length:
            size = max(length, 2 * have, 256)
            cos, sin = self.tables_for(torch.arange(have, size, device=self.inv_freq.device), torch.float32)  # [new, 1, hd]
            cos, sin = cos.squeeze(1), sin.squeeze(1)  # [new, hd]
            if kept is not None:
                cos, sin = torch.cat([kept[0], cos]), torch.cat([kept[1], sin])  # [size, hd]
            kept = (cos.contiguous(), sin.contiguous(), self.inv_freq)
        self._table = kept
        return kept[0], kept[1]

    def tables_for(self, positions: torch.Tensor, dtype: torch.dtype) -> CosSin:
        """(cos, sin) for these positions, each [T, 1, hd]; computed once per step, used by every layer."""
        freqs = positions.float().unsqueeze(1) * self.inv_freq  # [T, hd/2]
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [T, 1, hd]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
    """x [T, heads, hd] rotated by each token's position (HF's rotate_half convention)."""
    cos, sin = cos_sin
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Q, K and V from one fused projection, rotary positions on Q and K, paged attention, output
    projection. Subclasses change :meth:`project` (Gemma-3 normalizes each head's q and k)."""

    def __init__(self, config: ModelConfig, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        # Q, K and V projections fused into one matmul: [q_size + 2 * kv_size, hidden]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.output_bias)
        self.scale = scale

    def project(self, x: torch.Tensor, decode_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> q [T, heads, hd], k and v [T, kv_heads, hd]."""
        q, k, v = project(self.qkv_proj, x, decode_rows).split(self.split, dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, cos_sin: CosSin, cache: LayerCache, meta: AttentionMetadata,
                attention_fn: AttentionFn) -> torch.Tensor:
        q, k, v = self.project(x, meta.decode_rows)
        out = attention_fn(apply_rope(q, cos_sin), apply_rope(k, cos_sin), v, cache, meta,
                           self.scale)  # [T, heads, hd]
        return project(self.o_proj, out.flatten(1), meta.decode_rows)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one matmul; ``intermediate_size`` defaults
    to the config's (DeepSeek's shared experts are narrower)."""

    def __init__(self, config: ModelConfig, activation: Callable[[torch.Tensor], torch.Tensor],
                 intermediate_size: int | None = None) -> None:
        super().__init__()
        self.intermediate = intermediate_size or config.intermediate_size
        self.activation = activation
        # gate and up projections fused: [2 * intermediate, hidden]
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, decode_rows: bool = True) -> torch.Tensor:
        """``decode_rows``: whether the rows decode (see :func:`kvcache.models.packed.matmul`)."""
        gate, up = project(self.gate_up_proj, x, decode_rows).split(self.intermediate, dim=-1)
        return project(self.down_proj, self.activation(gate) * up, decode_rows)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (transformers' gelu_pytorch_tanh)."""
    return F.gelu(x, approximate="tanh")


def head_weight(head: nn.Module) -> torch.Tensor | PackedWeight:
    """The output head's weight: an embedding's or linear's tensor, or its packed form."""
    return head.packed if isinstance(head, (PackedLinear, PackedEmbedding)) else head.weight


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """hidden [N, hidden] x weight [vocab, hidden] -> logits [N, vocab] in hidden's dtype.

    Packed heads, and float32/bfloat16 heads for the few rows a decode step has, go through
    :func:`kvcache.models.packed.matmul` (our kernel). Otherwise, for 2..32 float32 rows on a CPU,
    the product is taken as weight @ hidden^T: MKL's sgemm with a vocabulary-sized weight and a
    handful of rows runs 2-4x slower the usual way round (measured on SmolLM2's 49,152 x 576 head,
    5 rows: 17.3 ms against 5.5 ms; our kernel, which takes up to 16 rows, 3x faster again).
    """
    rows = hidden.shape[0]
    if isinstance(weight, PackedWeight):
        return matmul(hidden, weight).to(hidden.dtype)
    if weight.dtype in (torch.float32, torch.bfloat16) and uses_kernel(hidden, weight.dtype):
        return matmul(hidden, PackedWeight(str(weight.dtype).removeprefix("torch."), weight)).to(hidden.dtype)
    if hidden.device.type == "cpu" and hidden.dtype == torch.float32 and 1 < rows <= 32:
        return torch.mm(weight, hidden.t()).t().contiguous()  # [vocab, N] -> [N, vocab]
    return F.linear(hidden, weight)
