"""Weights kept in their storage format (float32, bfloat16, Q8_0, Q4_1) and the matmul that reads them.

A :class:`PackedWeight` is a [N, K] matrix in one format:

    float32 / bfloat16   data [N, K]
    q8_0                 data int8 [N, K],       scale fp16 [N, K/32]            value = scale * q
    q4_1                 data uint8 [N, K/2],    scale, minimum fp16 [N, K/32]   value = scale * q + minimum
                         (a block's 16 bytes: values 0..15 in the low nibbles, 16..31 in the high ones,
                          as in GGUF, so a GGUF's Q4_1 and Q4_0 tensors are taken as they are)

:func:`matmul` multiplies activations by one. For the few rows of a decode step it calls the C
kernel (``kvcache.kernels``), which reads the weights once at the memory bandwidth; for many rows
(prefill) it widens the weight to float32 and lets PyTorch's GEMM run. Activations stay float32
for every format (weight-only quantization): both paths compute x @ dequantize(W)^T to float32
rounding, so a decode step and a prefill of the same tokens agree and cached generation stays
equal to recomputation. (Rounding activations to int8 as well, llama.cpp's scheme, is cheaper
but moved SmolLM2's logits by up to 1.0 between the two paths; see matmul.c.)
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from kvcache import kernels
from kvcache.config import parse_weights_dtype

BLOCK = 32
WEIGHT_FORMATS = ("float32", "bfloat16", "q8_0", "q4_1")
QUANTIZED = ("q8_0", "q4_1")
# above: widen and use PyTorch's GEMM. On the AVX2 EPYC (2026-12-03) the kernel took SmolLM2's
# layer matrices at 9-16 float32 rows in 44-50 ms against PyTorch's 103-127, and its 49,152-row
# head at 9 rows in 7.2 ms against 21.5 (weight @ hidden^T), so float rows go as far as quantized ones
KERNEL_MAX_ROWS = {"float32": 16, "bfloat16": 16, "q8_0": 16, "q4_1": 16}


@dataclass(frozen=True)
class PackedWeight:
    """A [rows, cols] weight matrix in one storage format (see the module docstring)."""

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor | None = None  # fp16 [rows, cols / 32]
    minimum: torch.Tensor | None = None  # fp16 [rows, cols / 32] (q4_1)

    def __post_init__(self) -> None:
        if self.fmt not in WEIGHT_FORMATS:
            raise ValueError(f"Unknown weight format {self.fmt!r}; use one of {', '.join(WEIGHT_FORMATS)}.")

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.data.shape
        return rows, width * 2 if self.fmt == "q4_1" else width

    @property
    def nbytes(self) -> int:
        planes = (self.data, self.scale, self.minimum)
        return sum(p.numel() * p.element_size() for p in planes if p is not None)

    def planes(self) -> tuple[torch.Tensor, ...]:
        return tuple(p for p in (self.data, self.scale, self.minimum) if p is not None)

    def rows(self, index: torch.Tensor | slice) -> "PackedWeight":
        """The rows ``index`` selects, in the same format."""
        pick = (lambda p: None if p is None else p[index])
        return PackedWeight(self.fmt, pick(self.data), pick(self.scale), pick(self.minimum))

    def to(self, device: torch.device | str) -> "PackedWeight":
        move = (lambda p: None if p is None else p.to(device))
        return PackedWeight(self.fmt, move(self.data), move(self.scale), move(self.minimum))


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Row-wise concatenation (fused Q/K/V, gate/up); parts in other formats are widened to float32."""
    fmt = parts[0].fmt
    if any(p.fmt != fmt for p in parts):
        return PackedWeight("float32", torch.cat([dequantize(p) for p in parts]))
    cat = (lambda planes: None if planes[0] is None else torch.cat(planes))
    return PackedWeight(fmt, cat([p.data for p in parts]), cat([p.scale for p in parts]),
                        cat([p.minimum for p in parts]))


# --- formats ---------------------------------------------------------------------------------

def quantize(weight: torch.Tensor, fmt: str) -> PackedWeight:
    """A float weight [N, K] in format ``fmt`` (K a multiple of 32 for q8_0 and q4_1)."""
    if fmt == "float32":
        return PackedWeight(fmt, weight.float().contiguous())
    if fmt == "bfloat16":
        return PackedWeight(fmt, weight.to(torch.bfloat16).contiguous())
    rows, cols = weight.shape
    if fmt not in QUANTIZED:
        raise ValueError(f"Unknown weight format {fmt!r}; use one of {', '.join(WEIGHT_FORMATS)}.")
    if cols % BLOCK:
        raise ValueError(f"{fmt} keeps blocks of {BLOCK} values; a row of {cols} is not a multiple of it.")
    blocks = weight.float().reshape(rows, cols // BLOCK, BLOCK)  # [N, K/32, 32]
    if fmt == "q8_0":
        scale = (blocks.abs().amax(-1) / 127).to(torch.float16)  # [N, K/32]
        inverse = torch.where(scale > 0, 1 / scale.float(), torch.zeros((), dtype=torch.float32))
        q = torch.round(blocks * inverse.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return PackedWeight(fmt, q.reshape(rows, cols), scale)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = ((high - low) / 15).to(torch.float16)
    minimum = low.to(torch.float16)
    inverse = torch.where(scale > 0, 1 / scale.float(), torch.zeros((), dtype=torch.float32))
    q = torch.round((blocks - minimum.float().unsqueeze(-1)) * inverse.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return PackedWeight(fmt, pack_nibbles(q).reshape(rows, cols // 2), scale, minimum)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 -> [..., 16] bytes: value i in byte i's low nibble, value 16 + i in its high one."""
    return q[..., :16] | (q[..., 16:] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values 0..15 (the inverse of :func:`pack_nibbles`)."""
    return torch.cat([packed & 15, packed >> 4], dim=-1)


def dequantize(weight: PackedWeight) -> torch.Tensor:
    """The float32 matrix [N, K] a packed weight stands for (exactly the values the kernel multiplies)."""
    if weight.fmt in ("float32", "bfloat16"):
        return weight.data.float()
    rows, cols = weight.shape
    scale = weight.scale.float().unsqueeze(-1)  # [N, K/32, 1]
    if weight.fmt == "q8_0":
        return (weight.data.reshape(rows, -1, BLOCK).float() * scale).reshape(rows, cols)
    q = unpack_nibbles(weight.data.reshape(rows, -1, BLOCK // 2)).float()  # [N, K/32, 32]
    return (q * scale + weight.minimum.float().unsqueeze(-1)).reshape(rows, cols)


# --- the matmul ------------------------------------------------------------------------------

def uses_kernel(x: torch.Tensor, weight_dtype: torch.dtype | str) -> bool:
    """Whether :func:`matmul` takes x's rows through the C kernel for weights of this format."""
    fmt = weight_dtype if isinstance(weight_dtype, str) else str(weight_dtype).removeprefix("torch.")
    return x.device.type == "cpu" and x.shape[0] <= KERNEL_MAX_ROWS[fmt] and kernels.library() is not None


def matmul(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
           decode_rows: bool = True) -> torch.Tensor:
    """x [M, K] (any float dtype) @ weight^T + bias -> float32 [M, N]. ``decode_rows`` False (rows of
    a prompt) keeps them off the kernel: a prompt's rows are multiplied the same way however many."""
    if decode_rows and uses_kernel(x, weight.fmt):
        return _kernel_matmul(kernels.library(), x, weight, bias)
    if weight.fmt == "bfloat16" and x.dtype == torch.bfloat16 and (x.device.type != "cpu" or kernels.native_bf16()):
        y = torch.nn.functional.linear(x, weight.data).float()  # the hardware's own bf16 GEMM
    else:
        y = torch.nn.functional.linear(x.float(), widen(weight))
    return y if bias is None else y + bias.float()


def widen(weight: PackedWeight) -> torch.Tensor:
    """The float32 matrix of ``weight`` for PyTorch's GEMM: the tensor itself for float32, else
    :func:`dequantize` (in the C kernel when it is there: one pass, both cores)."""
    if weight.fmt == "float32":
        return weight.data
    lib = kernels.library() if weight.data.device.type == "cpu" else None
    if lib is None:
        return dequantize(weight)
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    lib.kv_widen(kernels.FORMAT_CODES[weight.fmt], rows, cols, weight.data.data_ptr(), _ptr(weight.scale),
                 _ptr(weight.minimum), out.data_ptr(), torch.get_num_threads())
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _kernel_matmul(lib: ctypes.CDLL, x: torch.Tensor, weight: PackedWeight,
                   bias: torch.Tensor | None) -> torch.Tensor:
    rows, cols = x.shape
    x32 = x.float().contiguous()
    y = torch.empty(rows, weight.data.shape[0], dtype=torch.float32)
    bias32 = None if bias is None else bias.float().contiguous()
    lib.kv_matmul(kernels.FORMAT_CODES[weight.fmt], rows, y.shape[1], cols, x32.data_ptr(), weight.data.data_ptr(),
                  _ptr(weight.scale), _ptr(weight.minimum), _ptr(bias32), y.data_ptr(), torch.get_num_threads())
    return y


# --- modules ---------------------------------------------------------------------------------

class _KeepsFormat(nn.Module):
    """A module whose packed planes must never be cast (a model's ``.to(dtype)`` would turn the
    int8 / fp16 planes into something else); only a device move applies to them. The float dtype
    the module hands out follows the casts."""

    out_dtype: torch.dtype

    def _hold(self, weight: PackedWeight) -> None:
        self.fmt = weight.fmt
        self.register_buffer("data", weight.data)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("minimum", weight.minimum)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.fmt, self.data, self.scale, self.minimum)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, device=self._device()))
        self.out_dtype = probe.dtype
        for name, buf in self._buffers.items():
            if buf is not None and buf.device != probe.device:
                self._buffers[name] = buf.to(probe.device)
        return self

    def _device(self) -> torch.device:
        return next(iter(self._buffers.values())).device


class PackedLinear(_KeepsFormat):
    """``y = x @ W^T + b`` with W kept in its storage format; a drop-in for ``nn.Linear``."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self._hold(weight)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor, decode_rows: bool = True) -> torch.Tensor:
        """x [..., K] -> [..., N]; ``decode_rows`` as in :func:`matmul`."""
        flat = x.reshape(-1, self.in_features)  # [M, K]
        y = matmul(flat, self.packed, self.bias, decode_rows)  # [M, N] float32
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


class PackedEmbedding(_KeepsFormat):
    """An embedding table kept in its storage format: rows are widened as they are looked up.
    :attr:`packed` is the table as a weight, for a tied output head."""

    def __init__(self, weight: PackedWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._hold(weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.out_dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> [T, dim] in the model's dtype: the same values as :func:`dequantize`, in one C
        call where the kernels are instead of several PyTorch operators (each of which runs with the
        caches a decode step has just flushed)."""
        return widen(self.packed.rows(tokens)).to(self.out_dtype)


def weight_formats(model: nn.Module) -> str:
    """The formats a model's weights are held in, most bytes first, e.g. "q4_1 + q8_0 + float32"."""
    held: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, _KeepsFormat):
            held[module.fmt] = held.get(module.fmt, 0) + sum(b.numel() * b.element_size()
                                                              for b in module.buffers(recurse=False))
    for p in model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        held[name] = held.get(name, 0) + p.numel() * p.element_size()
    return " + ".join(sorted(held, key=held.get, reverse=True))


def project(linear: nn.Module, x: torch.Tensor, decode_rows: bool) -> torch.Tensor:
    """``linear(x)``, telling a :class:`PackedLinear` whether the rows decode (an ``nn.Linear`` takes x alone)."""
    return linear(x, decode_rows) if isinstance(linear, PackedLinear) else linear(x)


def held_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model holds: its parameters and every packed plane."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, _KeepsFormat):
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total


# --- which weights are packed, and in what format --------------------------------------------

_PROJECTIONS = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo") + tuple(
    f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def packable(name: str) -> bool:
    """Whether the HF-named weight is one the engine keeps packed: a decoder layer's attention and
    MLP projections, the token embedding and the output head."""
    return name in _VOCAB or (name.startswith("model.layers.") and name.endswith(_PROJECTIONS))


def weight_format(name: str, stored: str | None, weights_dtype: str, compute_dtype: str) -> str | None:
    """The format the engine keeps weight ``name`` in (None: a plain tensor in the model's dtype).

    ``stored`` is the format the file holds it in: a packed one, "bfloat16" for a bfloat16 tensor,
    None for a float32 one. ``auto`` keeps the file's blocks and bfloat16 tensors as they are and
    float32 ones in the model's dtype; ``int4`` keeps the token
    embedding and output head in int8 (their rows are looked up one by one and they set every
    logit, so llama.cpp's 4-bit files keep them at 6-8 bits too)."""
    if not packable(name):
        return None
    if weights_dtype == "auto":
        fmt = stored or compute_dtype
    elif weights_dtype in ("float32", "bfloat16"):
        fmt = weights_dtype
    else:
        fmt = "q8_0" if weights_dtype == "int8" or name in _VOCAB else "q4_1"
    return None if (name in _VOCAB and fmt == compute_dtype) else fmt


def format_bytes(fmt: str | None, shape: tuple[int, ...], compute_dtype: str) -> int:
    """Bytes a weight of this shape takes in ``fmt`` (None: a plain tensor in the compute dtype)."""
    values = 1
    for d in shape:
        values *= d
    per_value = {"float32": 4.0, "bfloat16": 2.0, "q8_0": 1 + 2 / BLOCK, "q4_1": 0.5 + 4 / BLOCK}
    return int(values * per_value[fmt or compute_dtype])


def planned_weight_bytes(shapes: dict[str, tuple[tuple[int, ...], str | None]], weights_dtype: str,
                         compute_dtype: str, tied: bool) -> dict[str, int]:
    """The bytes the engine will hold for weights of these shapes (as :func:`kvcache.models.loader.weight_shapes`
    reads them) in ``weights_dtype``, per format, without loading them: the planner's side of
    ``stats()["weight_bytes"]``. With ``tied`` embeddings an ``lm_head`` in the file is not held."""
    weights_dtype = parse_weights_dtype(weights_dtype)
    held: dict[str, int] = {}
    for name, (shape, stored) in shapes.items():
        if "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue
        fmt = weight_format(name, stored, weights_dtype, compute_dtype) or compute_dtype
        held[fmt] = held.get(fmt, 0) + format_bytes(fmt, shape, compute_dtype)
    return held


def prepare_weights(weights: dict[str, torch.Tensor | PackedWeight], weights_dtype: str,
                    compute_dtype: str) -> dict[str, torch.Tensor | PackedWeight]:
    """Each weight in the format the engine keeps it in (see :func:`weight_format`): packed weights
    already in their target format are passed through untouched, others are widened and/or
    quantized. Raises ValueError when a quantized format does not fit a weight's row length."""
    weights_dtype = parse_weights_dtype(weights_dtype)
    prepared: dict[str, torch.Tensor | PackedWeight] = {}
    for name, w in weights.items():
        # a file's bfloat16 tensors count as stored in that format: auto keeps them so
        stored = w.fmt if isinstance(w, PackedWeight) else "bfloat16" if w.dtype == torch.bfloat16 else None
        fmt = weight_format(name, stored, weights_dtype, compute_dtype)
        if fmt is None:
            prepared[name] = dequantize(w) if isinstance(w, PackedWeight) else w
        elif fmt == stored:
            prepared[name] = w if isinstance(w, PackedWeight) else PackedWeight(fmt, w)
        else:
            source = dequantize(w) if isinstance(w, PackedWeight) else w
            if fmt in QUANTIZED and source.shape[1] % BLOCK:
                raise ValueError(f"{weights_dtype} weights keep blocks of {BLOCK} values, but {name} has rows of "
                                 f"{source.shape[1]}; use --weights-dtype float32 or bfloat16 for this model.")
            prepared[name] = quantize(source, fmt)
    return prepared
