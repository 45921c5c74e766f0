"""KV codecs: fp8 (e4m3), int8 and int4, each with fp16 scales. Pure tensor math, no layout.

A codec turns float values into codes plus per-group parameters and back. Which values form a
group is the caller's choice, given as the dimension the statistics run over (``dim``); the
storage groups values per token, and keys per channel over a block of tokens (fp8, int4; KIVI)
or per token after a Hadamard rotation (int8, QuaRot; see :func:`hadamard_rotation`):

    fp8   code = e4m3(x / s),            s = amax / 448          params (s,)
          keys: code = e4m3((x - z) / s),  z = (max + min) / 2, s = amax(x - z) / 448, params (s, z)
    int8  code = round(x / s) in ±127,   s = amax / 127          params (s,)
    int4  code = round((x - z) / s),     s = (max - min) / 15,   params (s, z), z = min;
          two codes a byte (value j and value j + n/2 of a row of n), so the last dim halves when packed

Scales and zero points are stored as float16; the codes are computed with the rounded scale, so
decode(pack(encode(x))) is what the cache returns. Bounds (per group, before packing):
fp8 |err| <= amax / 16 (3 mantissa bits); int8 |err| <= s / 2 = amax / 254; int4 |err| <= s / 2.
"""

from __future__ import annotations

from typing import Callable

import torch

SCALE_DTYPE = torch.float16
_TINY_SCALE = 2.0 ** -24  # the smallest positive float16; an all-zero group keeps a usable scale
_MAX_SCALE = 65504.0  # the largest float16


def _to_scale(x: torch.Tensor) -> torch.Tensor:
    """Clamp to what a float16 scale can hold and round through float16 (the stored value)."""
    return x.clamp(_TINY_SCALE, _MAX_SCALE).to(SCALE_DTYPE)


def _masked(x: torch.Tensor, valid: torch.Tensor | None, fill: float) -> torch.Tensor:
    return x if valid is None else torch.where(valid, x, fill)


Buffer = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]  # (name, shape, dtype) -> memory


def _buffer(buffer: Buffer | None, like: torch.Tensor) -> Buffer:
    return buffer or (lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=like.device))


class Codec:
    """One quantized element format: its code dtype, bits and how many fp16 params a group stores.

    Stored codes are read back with :meth:`raw`, floats r such that a value is r x scale x ``unit``
    (+ zero point): the readers fold scale x unit into their matmuls instead of decoding every value.
    """

    name: str
    code_dtype: torch.dtype
    bits: int
    num_params: int
    unit: float = 1.0

    def code_width(self, head_dim: int) -> int:
        """Stored codes per ``head_dim`` values (half of them for packed int4)."""
        return head_dim * self.bits // 8

    def encode(self, x: torch.Tensor, dim: int,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x (float) -> (codes, params): statistics over ``dim`` (kept as size 1) on ``valid`` entries.

        Codes come back unpacked, in x's shape; params are float16, shaped like x with ``dim`` = 1.
        """
        raise NotImplementedError

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes from :meth:`encode` -> what the cache stores (``code_dtype``, last dim ``code_width``)."""
        return codes

    def planes(self, stored: torch.Tensor, dtype: torch.dtype, buffer: Buffer | None = None) -> list[torch.Tensor]:
        """Stored codes -> floats in ``dtype`` (value = raw x scale x unit (+ zero)), as planes that
        split the unpacked last dim into consecutive equal ranges (int4: its two nibble halves).

        ``buffer(name, shape, dtype)`` supplies the results' (and any temporary's) memory; default: new tensors.
        """
        return [_buffer(buffer, stored)("raw", stored.shape, dtype).copy_(stored)]

    def raw(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored codes -> floats in ``dtype``, unpacked (last dim head_dim), in new memory."""
        planes = self.planes(stored, dtype)
        return planes[0] if len(planes) == 1 else torch.cat(planes, dim=-1)

    def decode(self, stored: torch.Tensor, params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """Stored codes and params broadcastable to them (unpacked) -> values in ``dtype``."""
        out = self.raw(stored, dtype).mul_(params[0].to(dtype) * self.unit)  # in place: one pass fewer
        return out.add_(params[1].to(dtype)) if len(params) > 1 else out


class Int8Codec(Codec):
    name, code_dtype, bits, num_params = "int8", torch.int8, 8, 1

    def encode(self, x, dim, valid=None):
        scale = _to_scale(_masked(x.abs(), valid, 0.0).amax(dim, keepdim=True) / 127)
        codes = (x / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
        return codes, (scale,)


class Fp8Codec(Codec):
    """e4m3 codes, stored as their bytes (uint8): PyTorch's CPU index_copy/index_select lack float8.

    PyTorch's CPU float8 -> float conversion is scalar (several times slower than the gather and
    matmul around it), so :meth:`raw` widens the bytes itself: an e4m3 byte ``s eeee mmm`` shifted
    into a float16 ``s 0eeee mmm0000000`` is the same number times 2^-8 (bias 15 instead of 7),
    subnormals included; ``unit`` = 2^8 puts the factor back through the scale.
    """

    name, code_dtype, bits = "fp8", torch.uint8, 8
    MAX = 448.0  # the largest finite e4m3 value
    unit = 256.0

    def __init__(self, centered: bool = False) -> None:
        self.centered = centered
        self.num_params = 2 if centered else 1

    def encode(self, x, dim, valid=None):
        zero = None
        if self.centered:  # the group's midpoint: a channel's offset costs no mantissa bits
            low = _masked(x, valid, float("inf")).amin(dim, keepdim=True)
            high = _masked(x, valid, float("-inf")).amax(dim, keepdim=True)
            zero = ((high + low) / 2).to(SCALE_DTYPE)
            x = x - zero.float()
        scale = _to_scale(_masked(x.abs(), valid, 0.0).amax(dim, keepdim=True) / self.MAX)
        codes = (x / scale.float()).clamp_(-self.MAX, self.MAX).to(torch.float8_e4m3fn)
        return codes, (scale,) if zero is None else (scale, zero)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.uint8)

    def planes(self, stored, dtype, buffer=None):
        new = _buffer(buffer, stored)
        # sign-extended to int16, << 7 puts eeee mmm in bits 7..13 and the sign in 14 and 15; clear 14
        half = new("wide", stored.shape, torch.int16).copy_(stored.view(torch.int8))
        half.bitwise_left_shift_(7).bitwise_and_(~0x4000)
        return [new("raw", stored.shape, dtype).copy_(half.view(torch.float16))]


class Int4Codec(Codec):
    """Asymmetric 4-bit codes, two a byte in halves: byte j holds value j (low nibble) and value
    j + head_dim / 2 (high nibble), so unpacking is two whole-plane operations, not an interleave."""

    name, code_dtype, bits, num_params = "int4", torch.uint8, 4, 2

    def encode(self, x, dim, valid=None):
        low = _masked(x, valid, float("inf")).amin(dim, keepdim=True)
        high = _masked(x, valid, float("-inf")).amax(dim, keepdim=True)
        scale = _to_scale((high - low) / 15)
        zero = low.to(SCALE_DTYPE)
        codes = ((x - zero.float()) / scale.float()).round_().clamp_(0, 15).to(torch.uint8)
        return codes, (scale, zero)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., 2k] codes 0..15 -> [..., k] bytes: code j in the low nibble, code k + j in the high."""
        half = codes.shape[-1] // 2
        return codes[..., :half] | (codes[..., half:] << 4)

    def planes(self, stored, dtype, buffer=None):
        """[..., k] bytes -> codes [..., :k] and [..., k:] as floats, each contiguous (no interleave)."""
        new = _buffer(buffer, stored)
        low = torch.bitwise_and(stored, 15, out=new("wide", stored.shape, torch.uint8))
        high = torch.bitwise_right_shift(stored, 4, out=new("wide_high", stored.shape, torch.uint8))
        return [new("raw", stored.shape, dtype).copy_(low), new("raw_high", stored.shape, dtype).copy_(high)]


CODECS: dict[str, Codec] = {c.name: c for c in (Fp8Codec(), Int8Codec(), Int4Codec())}
KEY_CODECS: dict[str, Codec] = {"fp8": Fp8Codec(centered=True), "int8": CODECS["int8"], "int4": CODECS["int4"]}


def codec_for(kv_format: str, keys: bool = False) -> Codec:
    """The codec of ``kv_format``'s values, or with ``keys`` of its keys (fp8 keys: with a zero point)."""
    if kv_format not in CODECS:
        raise ValueError(f"{kv_format!r} is not a quantized KV format; use one of {', '.join(CODECS)}.")
    return (KEY_CODECS if keys else CODECS)[kv_format]


def hadamard_rotation(n: int) -> torch.Tensor:
    """An orthonormal, symmetric [n, n] matrix that spreads each channel over many (QuaRot's trick).

    Sylvester's Hadamard matrix of the largest power of two p dividing n, divided by sqrt(p),
    repeated p-by-p along the diagonal. Keys rotated by it keep q . k (rotate q too) but lose their
    outlier channels, so one int8 scale per token fits every channel.
    """
    p = n & -n
    h = torch.ones(1, 1)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # [2m, 2m]
    return torch.block_diag(*[h / p ** 0.5] * (n // p))
