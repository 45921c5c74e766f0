"""KV codecs: fp8 (e4m3), int8 and int4, each with fp16 scales. Pure tensor math, no layout.

A codec turns float values into codes plus per-group parameters and back. Which values form a
group is the caller's choice, given as the dimension the statistics run over (``dim``); the
storage uses the KIVI grouping (keys per channel over a block of tokens, values per token):

    fp8   code = e4m3(x / s),            s = amax / 448          params (s,)
    int8  code = round(x / s) in ±127,   s = amax / 127          params (s,)
    int4  code = round((x - z) / s),     s = (max - min) / 15,   params (s, z), z = min;
          two codes a byte (even index in the low nibble), so the last dim halves when packed

Scales and zero points are stored as float16; the codes are computed with the rounded scale, so
decode(encode(x)) is what the cache returns. Bounds (per group, before packing):
fp8 |err| <= amax / 16 (3 mantissa bits); int8 |err| <= s / 2 = amax / 254; int4 |err| <= s / 2.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
_TINY_SCALE = 2.0 ** -24  # the smallest positive float16; an all-zero group keeps a usable scale
_MAX_SCALE = 65504.0  # the largest float16


def _to_scale(x: torch.Tensor) -> torch.Tensor:
    """Clamp to what a float16 scale can hold and round through float16 (the stored value)."""
    return x.clamp(_TINY_SCALE, _MAX_SCALE).to(SCALE_DTYPE)


def _masked(x: torch.Tensor, valid: torch.Tensor | None, fill: float) -> torch.Tensor:
    return x if valid is None else torch.where(valid, x, fill)


class Codec:
    """One quantized element format: its code dtype, bits and how many fp16 params a group stores."""

    name: str
    code_dtype: torch.dtype
    bits: int
    num_params: int

    def code_width(self, head_dim: int) -> int:
        """Stored codes per ``head_dim`` values (half of them for packed int4)."""
        return head_dim * self.bits // 8

    def encode(self, x: torch.Tensor, dim: int,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x (float) -> (codes, params): statistics over ``dim`` (kept as size 1) on ``valid`` entries.

        Codes come back unpacked, in x's shape; params are float16, shaped like x with ``dim`` = 1.
        """
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """Unpacked codes and params broadcastable to them -> values in ``dtype``."""
        raise NotImplementedError

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        return stored


class Int8Codec(Codec):
    name, code_dtype, bits, num_params = "int8", torch.int8, 8, 1

    def encode(self, x, dim, valid=None):
        scale = _to_scale(_masked(x.abs(), valid, 0.0).amax(dim, keepdim=True) / 127)
        codes = (x / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
        return codes, (scale,)

    def decode(self, codes, params, dtype):
        return codes.to(dtype).mul_(params[0].to(dtype))  # in place: one pass fewer over the gathered blocks


class Fp8Codec(Codec):
    """e4m3 codes, stored as their bytes (uint8): PyTorch's CPU index_copy/index_select lack float8."""

    name, code_dtype, bits, num_params = "fp8", torch.uint8, 8, 1
    MAX = 448.0  # the largest finite e4m3 value

    def encode(self, x, dim, valid=None):
        scale = _to_scale(_masked(x.abs(), valid, 0.0).amax(dim, keepdim=True) / self.MAX)
        codes = (x / scale.float()).clamp_(-self.MAX, self.MAX).to(torch.float8_e4m3fn)
        return codes, (scale,)

    def decode(self, codes, params, dtype):
        return codes.to(dtype).mul_(params[0].to(dtype))

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.uint8)

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.view(torch.float8_e4m3fn)


class Int4Codec(Codec):
    name, code_dtype, bits, num_params = "int4", torch.uint8, 4, 2

    def encode(self, x, dim, valid=None):
        low = _masked(x, valid, float("inf")).amin(dim, keepdim=True)
        high = _masked(x, valid, float("-inf")).amax(dim, keepdim=True)
        scale = _to_scale((high - low) / 15)
        zero = low.to(SCALE_DTYPE)
        codes = ((x - zero.float()) / scale.float()).round_().clamp_(0, 15).to(torch.uint8)
        return codes, (scale, zero)

    def decode(self, codes, params, dtype):
        scale, zero = params
        return codes.to(dtype).mul_(scale.to(dtype)).add_(zero.to(dtype))

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., 2k] codes 0..15 -> [..., k] bytes: even index in the low nibble, odd in the high."""
        return codes[..., 0::2] | (codes[..., 1::2] << 4)

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        """[..., k] bytes -> [..., 2k] codes."""
        out = torch.empty(*stored.shape, 2, dtype=torch.uint8, device=stored.device)  # [..., k, 2]
        torch.bitwise_and(stored, 15, out=out[..., 0])
        torch.bitwise_right_shift(stored, 4, out=out[..., 1])
        return out.flatten(-2)


CODECS: dict[str, Codec] = {c.name: c for c in (Fp8Codec(), Int8Codec(), Int4Codec())}


def codec_for(kv_format: str) -> Codec:
    if kv_format not in CODECS:
        raise ValueError(f"{kv_format!r} is not a quantized KV format; use one of {', '.join(CODECS)}.")
    return CODECS[kv_format]
