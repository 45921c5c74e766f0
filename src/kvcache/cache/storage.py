"""The KV tensors: one allocation per layer group, written by slot mapping, read by block ids.

Each group (see :mod:`kvcache.cache.spec`) owns one byte buffer, sized exactly as the planner
counts it, carved into typed regions that all have the block dimension third:

    plain (fp32/bf16/fp16)   k, v        [layers, kv_heads, num_blocks, block_size, head_dim]
    MLA latent (fp32/bf16/fp16)  k       [layers, 1, num_blocks, block_size, latent_dim]   ([c | k_pe], no v)
    MLA latent (fp8/int8/int4)   v_codes, v_scale (+ v_zero)   per token, in groups, as values are
    quantized (fp8/int8/int4)
        k_codes, v_codes                 [layers, kv_heads, num_blocks, block_size, code_width]
        v_scale (+ v_zero for int4)      [layers, kv_heads, num_blocks, block_size, head_dim / group]   per token
        k_scale (fp8, int8)              [layers, kv_heads, num_blocks, block_size, head_dim / group]   per token
        k_scale + k_zero (int4)          [layers, kv_heads, num_blocks, head_dim]   per channel per block (KIVI)

Head-major, so reading blocks gives [kv_heads, blocks, block_size, head_dim] with no transpose.
A slot is ``block_id * block_size + offset``. Attention sees only a :class:`LayerCache`:
``write(k, v, slot_mapping)``, ``read_blocks(block_ids, dtype)``, the decode reads ``key_scores``
and ``weighted_values`` (which fold per-token scales into the matmuls) and ``dequantized()``; every
read goes through the group's format, so a quantized cache's error shows in prefill as in decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvcache.cache.quant import SCALE_DTYPE, Codec, codec_for, hadamard_rotation
from kvcache.cache.spec import KVCacheGroup, page_group, pool_block_bytes
from kvcache.sizing import group_size_for, kv_dtype

PLAIN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class QuantizedTensors:
    """One layer of a quantized group as stored, for a kernel that decodes it in place (read only).

    codes: [kv_heads, num_blocks, block_size, code_width] (int8 codes; fp8 bytes; int4 two a byte,
    value j low nibble, j + head_dim / 2 high). Params are float16 (scale, then zero if the codec has one):
    values per token, [kv_heads, num_blocks, block_size, head_dim / value_group]; keys the same when
    ``rotation`` is set (int8: keys stored as k @ rotation), else per channel per block,
    [kv_heads, num_blocks, head_dim]. A value is code x scale x ``unit`` (+ zero); fp8's code is its
    byte widened as :meth:`~kvcache.cache.quant.Fp8Codec.planes` does (the e4m3 value x 2^-8).
    """

    kv_format: str  # fp8, int8, int4
    value_group: int
    unit: float
    k_codes: torch.Tensor
    k_params: tuple[torch.Tensor, ...]
    v_codes: torch.Tensor
    v_params: tuple[torch.Tensor, ...]
    rotation: torch.Tensor | None  # [head_dim, head_dim] float32, or None: keys per channel


class LayerCache:
    """One layer's handle on its group's storage; what attention receives instead of tensors."""

    def __init__(self, group: "GroupStorage", local_index: int, group_id: int | None = None) -> None:
        self.group = group
        self.group_id = group.group.group_id if group_id is None else group_id  # whose tables address it
        self.local_index = local_index

    @property
    def num_kv_heads(self) -> int:
        return self.group.group.spec.num_kv_heads

    def write(self, k: torch.Tensor, v: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
        """Store keys and values [num_tokens, kv_heads, head_dim] at ``slot_mapping`` [num_tokens]
        (an MLA layer: its latent vectors [num_tokens, 1, latent_dim] as ``k``, and ``v`` None)."""
        self.group.write(self.local_index, k, v, slot_mapping)

    def read_blocks(self, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of these blocks as the format returns them: each [kv_heads, len(ids), block_size, hd]."""
        return self.group.read_blocks(self.local_index, block_ids, dtype)

    def read_keys(self, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Keys alone of these blocks, decoded: [kv_heads, len(ids), block_size, hd]."""
        return self.group.read_keys(self.local_index, block_ids, dtype)

    def key_scores(self, queries: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """q . k for every key of these blocks: queries [kv_heads, n, group, hd]; block_ids [n * W]
        (W blocks per sequence) -> [kv_heads, n, group, W * block_size]. A quantized group with
        per-token key scales applies them to the scores instead of decoding every key."""
        return self.group.key_scores(self.local_index, queries, block_ids)

    def weighted_values(self, weights: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """sum_t weights[..., t] x value_t over the blocks' first S tokens per sequence.

        weights [kv_heads, n, group, S]; block_ids [n * W] (W blocks per sequence, W * block_size >= S)
        -> [kv_heads, n, group, hd]. A quantized group folds its value scales into the weights
        instead of decoding every value.
        """
        return self.group.weighted_values(self.local_index, weights, block_ids)

    def plain_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's keys and values as stored, each [kv_heads, num_blocks, block_size, head_dim],
        for a fused kernel that reads them in place; None unless the group keeps plain fp32/bf16
        keys and values (quantized and latent groups have their own layouts)."""
        if type(self.group) is not PlainGroup or self.group.group.spec.kv_format not in ("fp32", "bf16"):
            return None
        return self.group.regions["k"][self.local_index], self.group.regions["v"][self.local_index]

    def quantized_tensors(self) -> QuantizedTensors | None:
        """This layer's codes and params as stored, for a kernel that reads them in place; None unless
        the group keeps quantized keys and values (plain and MLA latent groups have other layouts)."""
        group = self.group
        if type(group) is not QuantizedGroup:
            return None
        return QuantizedTensors(group.group.spec.kv_format, group.value_group, group.codecs["v"].unit,
                                group.regions["k_codes"][self.local_index], tuple(group._params("k", self.local_index)),
                                group.regions["v_codes"][self.local_index], tuple(group._params("v", self.local_index)),
                                group.rotation)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer decoded to float32, [kv_heads, num_blocks, block_size, hd] each (for the reference)."""
        every = torch.arange(self.group.num_blocks, device=self.group.device)
        return self.group.read_blocks(self.local_index, every, torch.float32)


class GroupStorage:
    """One group's allocation and its format's write/read; subclasses per format family."""

    def __init__(self, group: KVCacheGroup, num_blocks: int, block_size: int,
                 device: torch.device | str) -> None:
        self.group = group
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        layout = self.layout()
        total = sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for _, shape, dtype, _ in layout)
        self.buffer = torch.zeros(total, dtype=torch.uint8, device=self.device)
        self.regions: dict[str, torch.Tensor] = {}
        self.per_token: dict[str, bool] = {}
        offset = 0
        for name, shape, dtype, per_token in layout:  # widest elements first keeps every view aligned
            size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            self.regions[name] = self.buffer[offset:offset + size].view(dtype).view(shape)
            self.per_token[name] = per_token
            offset += size
        self.layers = [LayerCache(self, i) for i in range(len(group.layers))]
        self._scratch: dict[str, torch.Tensor] = {}

    def layout(self) -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
        """(name, shape, dtype, holds a value per token) of each region, widest dtype first."""
        raise NotImplementedError

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        raise NotImplementedError

    def read_blocks(self, layer: int, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def read_keys(self, layer: int, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def key_scores(self, layer: int, queries: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weighted_values(self, layer: int, weights: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Reused memory for a decode read's temporaries, which never leave this object's methods.

        A fresh tensor of tens of MB costs a page fault per 4 KiB on first touch (measured here: a
        new 50 MB buffer takes ~10x as long to fill as a reused one), every layer of every step.
        """
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < size:
            buf = self._scratch[name] = torch.empty(size, dtype=torch.uint8, device=self.device)
        return buf[:size].view(dtype).view(shape)

    def gather(self, name: str, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
        """Region ``name`` of ``layer`` at these blocks, [heads, len(ids), ...], in scratch memory."""
        region = self.regions[name][layer]
        out = self.scratch(name, (region.shape[0], len(block_ids), *region.shape[2:]), region.dtype)
        return torch.index_select(region, 1, block_ids, out=out)

    def _dims(self) -> tuple[int, int, int, int, int]:
        spec = self.group.spec
        return len(self.group.layers), spec.num_kv_heads, self.num_blocks, self.block_size, spec.head_dim

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def bytes_held(self, num_tokens: int) -> int:
        """Bytes one sequence of ``num_tokens`` tokens occupies in this group, read off the regions."""
        total = 0
        for name, region in self.regions.items():
            nbytes = region.numel() * region.element_size()
            if self.per_token[name]:
                total += nbytes * num_tokens // (self.num_blocks * self.block_size)
            else:
                total += nbytes * -(-num_tokens // self.block_size) // self.num_blocks
        return total

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for region in self.regions.values():
            region[:, :, dst] = region[:, :, src]

    @property
    def moves_slots(self) -> bool:
        """Whether one token's slot can be copied alone: every region holds values per token (a
        per-channel key scale covers a whole block, so its tokens cannot move one by one)."""
        return all(self.per_token.values())

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slot src[i] to slot dst[i] in every layer and region, all reads before any write."""
        if not self.moves_slots:
            raise RuntimeError(f"The {self.group.spec.kv_format} cache keeps per-block key scales; its "
                               "tokens cannot move slot by slot.")
        for region in self.regions.values():
            flat = region.flatten(2, 3)  # [layers, heads, num_blocks * block_size, ...]
            flat[:, :, dst] = flat[:, :, src]

    def take_blocks(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [region[:, :, index].to("cpu", copy=True) for region in self.regions.values()]

    def put_blocks(self, index: torch.Tensor, data: list[torch.Tensor]) -> None:
        for region, part in zip(self.regions.values(), data):
            region[:, :, index] = part.to(self.device)

    def export_blocks(self, index: torch.Tensor) -> torch.Tensor:
        """The blocks' bytes as stored, one row per block, every region's slice in layout order:
        [len(index), bytes per block] uint8 on the CPU (the offload tiers' block body)."""
        n = len(index)
        parts = [region[:, :, index].movedim(2, 0).reshape(n, -1).view(torch.uint8)  # [n, region bytes per block]
                 for region in self.regions.values()]
        return torch.cat(parts, dim=1).cpu()

    def import_blocks(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Write rows from :meth:`export_blocks` ([len(index), bytes per block] uint8) into these blocks."""
        n, offset = len(index), 0
        for region in self.regions.values():
            shape = (region.shape[0], region.shape[1], *region.shape[3:])  # one block: [layers, heads, ...]
            size = math.prod(shape) * region.element_size()
            part = rows[:, offset:offset + size].contiguous().view(region.dtype).view(n, *shape)
            region[:, :, index] = part.movedim(0, 2).to(self.device)  # [layers, heads, n, ...]
            offset += size

    def block_layout(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """(region, dtype, shape of one block's slice) in layout order: what a block body holds."""
        return tuple((name, str(r.dtype), (r.shape[0], r.shape[1], *r.shape[3:])) for name, r in self.regions.items())


class PlainGroup(GroupStorage):
    """Keys and values kept as they are, in fp32, bf16 or fp16."""

    def layout(self):
        layers, heads, blocks, bs, hd = self._dims()
        dtype = PLAIN_DTYPES[self.group.spec.kv_format]
        shape = (layers, heads, blocks, bs, hd)
        return [("k", shape, dtype, True), ("v", shape, dtype, True)]

    def write(self, layer, k, v, slot_mapping):
        _, heads, blocks, bs, hd = self._dims()
        for name, x in (("k", k), ("v", v)):
            flat = self.regions[name][layer].view(heads, blocks * bs, hd)
            flat.index_copy_(1, slot_mapping, x.transpose(0, 1).to(flat.dtype))  # x [T, heads, hd]

    def read_blocks(self, layer, block_ids, dtype):
        return self.read_keys(layer, block_ids, dtype), self.regions["v"][layer].index_select(1, block_ids).to(dtype)

    def read_keys(self, layer, block_ids, dtype):
        return self.regions["k"][layer].index_select(1, block_ids).to(dtype)

    def key_scores(self, layer, queries, block_ids):
        heads, n, _, hd = queries.shape
        keys = self.gather("k", layer, block_ids).to(queries.dtype).view(heads, n, -1, hd)  # [heads, n, W * bs, hd]
        return torch.matmul(queries, keys.transpose(-1, -2))

    def weighted_values(self, layer, weights, block_ids):
        heads, n, _, length = weights.shape
        values = self.gather("v", layer, block_ids).to(weights.dtype)  # [heads, n * W, bs, hd]
        return torch.matmul(weights, values.view(heads, n, -1, values.shape[-1])[:, :, :length])


class LatentGroup(PlainGroup):
    """MLA layers: one latent vector per token ([c | k_pe], latent_dim values), kept as it is, and no
    separate values. Read as the keys of one kv head; the "values" a decode weighs are the same
    vectors, whole (the caller keeps the first kv_lora_rank values, the latent c)."""

    def layout(self):
        layers, heads, blocks, bs, hd = self._dims()  # heads == 1, hd == latent_dim
        return [("k", (layers, heads, blocks, bs, hd), PLAIN_DTYPES[self.group.spec.kv_format], True)]

    def write(self, layer, k, v, slot_mapping):
        _, heads, blocks, bs, hd = self._dims()
        flat = self.regions["k"][layer].view(heads, blocks * bs, hd)
        flat.index_copy_(1, slot_mapping, k.transpose(0, 1).to(flat.dtype))  # k [T, 1, latent_dim]

    def read_blocks(self, layer, block_ids, dtype):
        latent = self.read_keys(layer, block_ids, dtype)  # [1, len(ids), bs, latent_dim]
        return latent, latent

    def weighted_values(self, layer, weights, block_ids):
        heads, n, _, length = weights.shape
        latent = self.gather("k", layer, block_ids).to(weights.dtype)  # [1, n * W, bs, latent_dim]
        return torch.matmul(weights, latent.view(heads, n, -1, latent.shape[-1])[:, :, :length])


class QuantizedGroup(GroupStorage):
    """fp8 / int8 / int4 codes with fp16 params. Values per token (groups of ``value_group``); keys
    per token too after a Hadamard rotation (int8: its codec has no zero point, which the folded
    ``key_scores`` relies on), or per channel over a block (fp8 with a zero point, int4; KIVI).

    A per-channel key scale covers every token of its block, so writing a token into a block
    re-encodes the block's valid tokens (those before it, decoded, plus the new ones) with the
    statistics of all of them. A scale that does not change re-encodes to the same codes; one that
    grows re-rounds the earlier tokens once to the coarser grid.
    """

    def __init__(self, group: KVCacheGroup, num_blocks: int, block_size: int,
                 device: torch.device | str) -> None:
        fmt = kv_dtype(group.spec.kv_format)
        self.codecs: dict[str, Codec] = {"k": codec_for(fmt.name, keys=True), "v": codec_for(fmt.name)}
        self.value_group = group_size_for(fmt, group.spec.head_dim, None)
        self.keys_per_channel = fmt.keys_per_channel
        # per-token keys are stored rotated (k @ R), which spreads their outlier channels
        self.rotation = None if self.keys_per_channel else hadamard_rotation(group.spec.head_dim).to(device)
        super().__init__(group, num_blocks, block_size, device)
        self._plan_slots: torch.Tensor | None = None
        self._plan: tuple[torch.Tensor, ...] = ()

    def layout(self):
        layers, heads, blocks, bs, hd = self._dims()
        codec, groups = self.codecs["v"], hd // self.value_group
        if self.keys_per_channel:
            keys = [(f"k_{p}", (layers, heads, blocks, hd), SCALE_DTYPE, False) for p in self._names("k")]
        else:
            keys = [(f"k_{p}", (layers, heads, blocks, bs, groups), SCALE_DTYPE, True) for p in self._names("k")]
        values = [(f"v_{p}", (layers, heads, blocks, bs, groups), SCALE_DTYPE, True) for p in self._names("v")]
        return (keys + values
                + [("k_codes", (layers, heads, blocks, bs, codec.code_width(hd)), codec.code_dtype, True),
                   ("v_codes", (layers, heads, blocks, bs, codec.code_width(hd)), codec.code_dtype, True)])

    def _names(self, kind: str) -> tuple[str, ...]:
        return ("scale", "zero")[:self.codecs[kind].num_params]

    def _params(self, kind: str, layer: int) -> list[torch.Tensor]:
        return [self.regions[f"{kind}_{p}"][layer] for p in self._names(kind)]

    def _block_plan(self, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per step (shared by the group's layers): the touched blocks and which of their tokens count.

        Returns (blocks [nb], row of each token's block [T], offsets [T], keep_old [nb, bs], valid [nb, bs]):
        a block's tokens before the first one written this step are kept; tokens up to the last one
        written are valid (later slots hold stale data and stay out of the statistics).
        """
        if slot_mapping is not self._plan_slots:
            bs = self.block_size
            blocks, rows = torch.unique(slot_mapping // bs, return_inverse=True)
            offsets = slot_mapping % bs
            first = torch.full_like(blocks, bs).scatter_reduce_(0, rows, offsets, "amin")
            last = torch.zeros_like(blocks).scatter_reduce_(0, rows, offsets, "amax")
            pos = torch.arange(bs, device=slot_mapping.device)
            self._plan = (blocks, rows, offsets, pos < first[:, None], pos <= last[:, None])
            self._plan_slots = slot_mapping
        return self._plan

    def write(self, layer, k, v, slot_mapping):
        if self.keys_per_channel:
            self._write_channel_keys(layer, k, slot_mapping)
        else:
            self._write_per_token("k", layer, k.float() @ self.rotation, slot_mapping)
        self._write_per_token("v", layer, v, slot_mapping)

    def _write_channel_keys(self, layer: int, k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Re-encode every touched block, per channel, over its valid tokens."""
        codec = self.codecs["k"]
        touched, rows, offsets, keep_old, valid = self._block_plan(slot_mapping)
        old = self.read_keys(layer, touched, torch.float32)  # [heads, nb, bs, hd]
        old = torch.where(keep_old[None, :, :, None], old, 0.0)
        old[:, rows, offsets] = k.transpose(0, 1).float()  # k [T, heads, hd]
        codes, params = codec.encode(old, dim=2, valid=valid[None, :, :, None])
        self.regions["k_codes"][layer].index_copy_(1, touched, codec.pack(codes))
        for region, p in zip(self._params("k", layer), params):
            region.index_copy_(1, touched, p.squeeze(2))  # [heads, nb, hd]

    def _write_per_token(self, kind: str, layer: int, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Encode each token's groups of ``value_group`` values: x [T, heads, hd]."""
        _, heads, blocks, bs, hd = self._dims()
        codec, tokens = self.codecs[kind], x.shape[0]
        grouped = x.transpose(0, 1).float().reshape(heads, tokens, hd // self.value_group, self.value_group)
        codes, params = codec.encode(grouped, dim=-1)
        flat = self.regions[f"{kind}_codes"][layer].view(heads, blocks * bs, -1)
        flat.index_copy_(1, slot_mapping, codec.pack(codes.view(heads, tokens, hd)))
        for region, p in zip(self._params(kind, layer), params):
            region.view(heads, blocks * bs, -1).index_copy_(1, slot_mapping, p.squeeze(-1))

    def _planes(self, kind: str, layer: int, block_ids: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Raw codes of these blocks as the codec's planes, each [heads, m, bs, hd / planes], in scratch memory."""
        return self.codecs[kind].planes(self.gather(f"{kind}_codes", layer, block_ids), dtype, self.scratch)

    def _block_params(self, kind: str, layer: int, block_ids: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """(scale x unit, zero) of these blocks in ``dtype``: [heads, m, bs, G] per token or [heads, m, hd] per channel."""
        params = [p.index_select(1, block_ids).to(dtype) for p in self._params(kind, layer)]
        params[0] *= self.codecs[kind].unit
        return params

    def _decode(self, kind: str, layer: int, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Keys or values of these blocks, decoded into new memory: [heads, m, bs, hd] (keys as stored: rotated)."""
        codes = self.codecs[kind].raw(self.regions[f"{kind}_codes"][layer].index_select(1, block_ids), dtype)
        params = self._block_params(kind, layer, block_ids, dtype)
        if kind == "k" and self.keys_per_channel:
            params = [p.unsqueeze(2) for p in params]  # [heads, m, 1, hd]
        else:
            heads, m, bs, hd = codes.shape
            codes = codes.view(heads, m, bs, -1, self.value_group)  # [heads, m, bs, G, g]
            params = [p.unsqueeze(-1) for p in params]  # [heads, m, bs, G, 1]
        out = codes.mul_(params[0])
        return (out.add_(params[1]) if len(params) > 1 else out).flatten(3)

    def read_blocks(self, layer, block_ids, dtype):
        return self.read_keys(layer, block_ids, dtype), self._decode("v", layer, block_ids, dtype)

    def read_keys(self, layer, block_ids, dtype):
        keys = self._decode("k", layer, block_ids, dtype)
        return keys if self.keys_per_channel else keys @ self.rotation.T.to(dtype)  # k = (k @ R) @ R^T

    def key_scores(self, layer, queries, block_ids):
        """Scales folded into the products instead of decoding every key:
        per token (int8, rotated): q . k_t = sum_G scale_tG ((q @ R)_G . code_tG)
        per channel (fp8, int4):   q . k_t = (q x scale_b) . code_t + q . zero_b   for t in block b
        """
        heads, n, group, hd = queries.shape
        planes = self._planes("k", layer, block_ids, queries.dtype)  # each [heads, n * W, bs, hd / planes]
        params = self._block_params("k", layer, block_ids, queries.dtype)
        width, bs = planes[0].shape[-1], planes[0].shape[2]
        if self.keys_per_channel:
            q = queries.unsqueeze(2)  # [heads, n, 1, group, hd]
            scale = params[0].view(heads, n, -1, 1, hd)  # [heads, n, W, 1, hd]
            scaled = torch.mul(q, scale, out=self.scratch("q", (heads, n, scale.shape[2], group, hd), q.dtype))
            scores = sum(torch.matmul(scaled[..., i * width:(i + 1) * width],
                                      plane.view(heads, n, -1, bs, width).transpose(-1, -2))
                         for i, plane in enumerate(planes))  # [heads, n, W, group, bs]
            if len(params) > 1:
                scores += torch.matmul(q, params[1].view(heads, n, -1, hd, 1))  # [heads, n, W, group, 1]
            return scores.transpose(2, 3).reshape(heads, n, group, -1)  # [heads, n, group, W * bs]
        g = self.value_group
        queries = queries @ self.rotation.to(queries.dtype)  # q . k = (q @ R) . (k @ R), R orthonormal
        codes = planes[0] if len(planes) == 1 else torch.cat(planes, -1)
        codes = codes.view(heads, n, -1, hd // g, g)  # [heads, n, S, G, g]
        scale = params[0].view(heads, n, 1, -1, hd // g)  # [heads, n, 1, S, G]
        if hd // g == 1:  # one group per token: one matmul, then the per-token scales
            return torch.matmul(queries, codes.view(heads, n, -1, hd).transpose(-1, -2)).mul_(scale[..., 0])
        q = queries.reshape(heads, n, group, hd // g, g)
        return torch.einsum("kngGc,knsGc->kngsG", q, codes).mul_(scale).sum(-1)  # [heads, n, group, S]

    def weighted_values(self, layer, weights, block_ids):
        """With v = code x scale (+ zero) per token group: sum_t w_t v_t = (w x scale) @ codes (+ w @ zero),
        plane by plane (int4's nibble halves are read as two contiguous planes, never interleaved)."""
        heads, n, group, length = weights.shape
        g = self.value_group
        planes = self._planes("v", layer, block_ids, weights.dtype)  # each [heads, n * W, bs, hd / planes]
        if planes[0].shape[-1] % g:  # a group spans planes: join them
            planes = [torch.cat(planes, -1)]
        width = planes[0].shape[-1]
        per_plane = width // g  # scale groups in one plane
        params = [p.view(heads, n, -1, p.shape[-1])[:, :, :length]  # each [heads, n, S, G]
                  for p in self._block_params("v", layer, block_ids, weights.dtype)]
        outs = []
        for i, plane in enumerate(planes):
            groups = slice(i * per_plane, (i + 1) * per_plane)
            codes = plane.view(heads, n, -1, width)[:, :, :length]  # [heads, n, S, width]
            scaled = weights.unsqueeze(3) * params[0][..., groups].transpose(2, 3).unsqueeze(2)  # [.., group, G', S]
            # every row's products with every group's codes, then each group's own: G' x the flops of
            # one small matmul, but the codes are read where they lie (an einsum would copy them)
            out = torch.matmul(scaled.reshape(heads, n, group * per_plane, -1), codes)
            out = out.view(heads, n, group, per_plane, per_plane, g).diagonal(dim1=3, dim2=4)  # [.., group, g, G']
            if len(params) > 1:  # int4's zero point: + sum_t w_t zero_t
                out = out + torch.matmul(weights, params[1][..., groups]).unsqueeze(3)  # [.., group, 1, G']
            outs.append(out.transpose(3, 4).reshape(heads, n, group, width))
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)  # [heads, n, group, hd]


class QuantizedLatentGroup(QuantizedGroup):
    """MLA latent vectors in fp8 / int8 / int4: encoded per token in groups of ``value_group``, with
    the values' codec (one vector per token, no keys, so no per-channel statistics). Keys scores
    decode the blocks read; the weighted sum folds the scales in, as for values."""

    def layout(self):
        layers, heads, blocks, bs, hd = self._dims()  # heads == 1, hd == latent_dim
        codec = self.codecs["v"]
        return ([(f"v_{p}", (layers, heads, blocks, bs, hd // self.value_group), SCALE_DTYPE, True)
                 for p in self._names("v")]
                + [("v_codes", (layers, heads, blocks, bs, codec.code_width(hd)), codec.code_dtype, True)])

    def write(self, layer, k, v, slot_mapping):
        self._write_per_token("v", layer, k, slot_mapping)  # k [T, 1, latent_dim]

    def read_keys(self, layer, block_ids, dtype):
        return self._decode("v", layer, block_ids, dtype)  # [1, len(ids), bs, latent_dim]

    def read_blocks(self, layer, block_ids, dtype):
        latent = self.read_keys(layer, block_ids, dtype)
        return latent, latent

    def key_scores(self, layer, queries, block_ids):
        heads, n, _, hd = queries.shape
        latent = self.read_keys(layer, block_ids, queries.dtype).view(heads, n, -1, hd)  # [1, n, W * bs, hd]
        return torch.matmul(queries, latent.transpose(-1, -2))


class KVCache:
    """Every group's KV in one allocation of pages, sized by the planner; ``layers[i]`` is layer i's cache.

    Groups have equal layer counts (see :func:`~kvcache.cache.spec.group_layers`), so one page
    layout serves them all: a block id is a page with one slot per layer of a group, and since a
    block id belongs to one group's table at a time, layer j of every group uses page slot j.

        pages: [slot 0 | slot 1 | slot 2] x num_blocks     (Gemma-3-270M: 3 slots)
        group 0 (sliding, layers 0 1 2) -> slots 0 1 2 of the blocks in its tables
        group 5 (global,  layers 5 11 17) -> slots 0 1 2 of the blocks in its tables
    """

    def __init__(self, groups: tuple[KVCacheGroup, ...], num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.groups = groups
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.pages = _allocate(page_group(groups), num_blocks, block_size, self.device)
        num_layers = sum(len(g.layers) for g in groups)
        self.layers: list[LayerCache] = [None] * num_layers  # type: ignore[list-item]
        for group in groups:
            for slot, index in enumerate(group.layers):
                self.layers[index] = LayerCache(self.pages, slot, group.group_id)

    @property
    def kv_format(self) -> str:
        """The element format every layer stores."""
        return self.pages.group.spec.kv_format

    @property
    def nbytes(self) -> int:
        """Bytes allocated: every page."""
        return self.pages.nbytes

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block id (one page)."""
        return self.nbytes // self.num_blocks

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token costs in every layer, scales included (rounded down): a page's bytes per
        token slot, times as many pages as the model's layers fill."""
        layers = sum(len(g.layers) for g in self.groups)
        return self.nbytes * layers // (self.num_blocks * self.block_size * len(self.pages.group.layers))

    @property
    def bytes_per_element(self) -> float:
        """Bytes per cached key or value, packing and scales included."""
        spec, slots = self.pages.group.spec, len(self.pages.group.layers)
        values = spec.latent_dim or 2 * spec.num_kv_heads * spec.head_dim  # per token per layer
        return self.nbytes / (self.num_blocks * self.block_size * slots * values)

    def planned_nbytes(self) -> int:
        """What the planner says ``num_blocks`` blocks cost (equal to :attr:`nbytes`, tested)."""
        return self.num_blocks * pool_block_bytes(self.groups, self.block_size)

    def bytes_held(self, num_tokens: int | Sequence[int]) -> int:
        """Bytes the KV of one sequence of ``num_tokens`` tokens (or of that many per group, when an
        eviction policy left the groups apart) occupies in its layers, read off the allocated regions;
        a sliding layer holds at most its window."""
        slots = len(self.pages.group.layers)
        tokens = [num_tokens] * len(self.groups) if isinstance(num_tokens, int) else list(num_tokens)
        return sum(self.pages.bytes_held(min(n, g.spec.window or n)) * len(g.layers) // slots
                   for g, n in zip(self.groups, tokens))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst (copy-on-write of shared partial blocks)."""
        if pairs:
            self.pages.copy_blocks(*self._sources_and_destinations(pairs))

    @property
    def moves_slots(self) -> bool:
        """Whether :meth:`move_slots` works for this format (what an eviction policy needs)."""
        return self.pages.moves_slots

    def move_slots(self, pairs: list[tuple[int, int]]) -> None:
        """Copy token slots src -> dst (an eviction compacting live tokens), all reads first."""
        if pairs:
            self.pages.move_slots(*self._sources_and_destinations(pairs))

    def _sources_and_destinations(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, dst) index tensors on the cache's device from (src, dst) pairs."""
        src, dst = zip(*pairs)
        return torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """A host copy of some blocks (every region), for swapping out."""
        return self.pages.take_blocks(torch.tensor(block_ids, device=self.device))

    def write_blocks(self, block_ids: list[int], data: list[torch.Tensor]) -> None:
        """Put a host copy from :meth:`read_blocks` back, into (possibly other) block ids."""
        self.pages.put_blocks(torch.tensor(block_ids, device=self.device), data)

    def export_blocks(self, block_ids: list[int]) -> list[memoryview]:
        """Each block's bytes exactly as stored (every region, the format's own encoding), one
        :attr:`block_nbytes`-long view per block, for the offload tiers."""
        rows = self.pages.export_blocks(torch.tensor(block_ids, device=self.device)).numpy()
        return [rows[i].data for i in range(len(block_ids))]

    def import_blocks(self, block_ids: list[int], bodies: list) -> None:
        """Write bodies from :meth:`export_blocks` (any bytes-like objects) into these blocks."""
        rows = torch.empty(len(block_ids), self.block_nbytes, dtype=torch.uint8)  # [n, block bytes]
        view = rows.numpy()
        for i, body in enumerate(bodies):
            view[i] = np.frombuffer(body, dtype=np.uint8)
        self.pages.import_blocks(torch.tensor(block_ids, device=self.device), rows)

    def block_layout(self) -> tuple:
        """What one block body holds: (region, dtype, per-block shape) in order."""
        return self.pages.block_layout()


def _allocate(group: KVCacheGroup, num_blocks: int, block_size: int, device: torch.device) -> GroupStorage:
    """The group's storage, or a ValueError when ``device`` cannot hold or convert its format."""
    latent = group.spec.latent_dim is not None
    if group.spec.quantized:
        cls = QuantizedLatentGroup if latent else QuantizedGroup
    else:
        cls = LatentGroup if latent else PlainGroup
    try:
        probe = cls(group, 1, block_size, device)
        probe.layers[0].write(torch.zeros(1, group.spec.num_kv_heads, group.spec.head_dim, device=device),
                              torch.zeros(1, group.spec.num_kv_heads, group.spec.head_dim, device=device),
                              torch.zeros(1, dtype=torch.long, device=device))
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise ValueError(f"The KV cache format {group.spec.kv_format} cannot be stored on device "
                         f"{device} ({str(err).splitlines()[0]}).") from None
    return cls(group, num_blocks, block_size, device)
