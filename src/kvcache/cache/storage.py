"""The KV tensors: one allocation per layer group, written by slot mapping, read by block ids.

Each group (see :mod:`kvcache.cache.spec`) owns one byte buffer, sized exactly as the planner
counts it, carved into typed regions that all have the block dimension third:

    plain (fp32/bf16/fp16)   k, v        [layers, kv_heads, num_blocks, block_size, head_dim]
    quantized (fp8/int8/int4, KIVI grouping)
        k_codes, v_codes                 [layers, kv_heads, num_blocks, block_size, code_width]
        k_scale (+ k_zero for int4)      [layers, kv_heads, num_blocks, head_dim]   per channel per block
        v_scale (+ v_zero for int4)      [layers, kv_heads, num_blocks, block_size, head_dim / group]

Head-major, so reading blocks gives [kv_heads, blocks, block_size, head_dim] with no transpose.
A slot is ``block_id * block_size + offset``. Attention sees only a :class:`LayerCache`:
``write(k, v, slot_mapping)``, ``read_blocks(block_ids, dtype)`` and ``dequantized()``; every
read goes through the group's format, so a quantized cache's error shows in prefill as in decode.
"""

from __future__ import annotations

import math

import torch

from kvcache.cache.quant import SCALE_DTYPE, Codec, codec_for
from kvcache.cache.spec import KVCacheGroup, page_group, pool_block_bytes
from kvcache.sizing import group_size_for, kv_dtype

PLAIN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LayerCache:
    """One layer's handle on its group's storage; what attention receives instead of tensors."""

    def __init__(self, group: "GroupStorage", local_index: int, group_id: int | None = None) -> None:
        self.group = group
        self.group_id = group.group.group_id if group_id is None else group_id  # whose tables address it
        self.local_index = local_index

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store keys and values [num_tokens, kv_heads, head_dim] at ``slot_mapping`` [num_tokens]."""
        self.group.write(self.local_index, k, v, slot_mapping)

    def read_blocks(self, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of these blocks as the format returns them: each [kv_heads, len(ids), block_size, hd]."""
        return self.group.read_blocks(self.local_index, block_ids, dtype)

    def read_keys(self, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Keys alone of these blocks, decoded: [kv_heads, len(ids), block_size, hd]."""
        return self.group.read_keys(self.local_index, block_ids, dtype)

    def weighted_values(self, weights: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """sum_t weights[..., t] x value_t over the blocks' first S tokens per sequence.

        weights [kv_heads, n, group, S]; block_ids [n * W] (W blocks per sequence, W * block_size >= S)
        -> [kv_heads, n, group, hd]. A quantized group folds its value scales into the weights
        instead of decoding every value.
        """
        return self.group.weighted_values(self.local_index, weights, block_ids)

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

    def layout(self) -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
        """(name, shape, dtype, holds a value per token) of each region, widest dtype first."""
        raise NotImplementedError

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        raise NotImplementedError

    def read_blocks(self, layer: int, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def read_keys(self, layer: int, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def weighted_values(self, layer: int, weights: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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

    def take_blocks(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [region[:, :, index].to("cpu", copy=True) for region in self.regions.values()]

    def put_blocks(self, index: torch.Tensor, data: list[torch.Tensor]) -> None:
        for region, part in zip(self.regions.values(), data):
            region[:, :, index] = part.to(self.device)


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

    def weighted_values(self, layer, weights, block_ids):
        heads, n, _, length = weights.shape
        values = self.regions["v"][layer].index_select(1, block_ids).to(weights.dtype)  # [heads, n * W, bs, hd]
        return torch.matmul(weights, values.view(heads, n, -1, values.shape[-1])[:, :, :length])


class QuantizedGroup(GroupStorage):
    """fp8 / int8 / int4 codes with fp16 params: keys per channel over a block, values per token.

    A key block's scale covers every token in it, so writing a token into a block re-encodes the
    block's valid tokens (those before it, decoded, plus the new ones) with the statistics of all
    of them. A scale that does not change re-encodes to the same codes; one that grows re-rounds
    the earlier tokens once to the coarser grid.
    """

    def __init__(self, group: KVCacheGroup, num_blocks: int, block_size: int,
                 device: torch.device | str) -> None:
        self.codec: Codec = codec_for(group.spec.kv_format)
        self.value_group = group_size_for(kv_dtype(group.spec.kv_format), group.spec.head_dim, None)
        super().__init__(group, num_blocks, block_size, device)
        self._plan_slots: torch.Tensor | None = None
        self._plan: tuple[torch.Tensor, ...] = ()

    def layout(self):
        layers, heads, blocks, bs, hd = self._dims()
        width, groups = self.codec.code_width(hd), hd // self.value_group
        params = ("scale", "zero")[:self.codec.num_params]
        return ([(f"k_{p}", (layers, heads, blocks, hd), SCALE_DTYPE, False) for p in params]
                + [(f"v_{p}", (layers, heads, blocks, bs, groups), SCALE_DTYPE, True) for p in params]
                + [("k_codes", (layers, heads, blocks, bs, width), self.codec.code_dtype, True),
                   ("v_codes", (layers, heads, blocks, bs, width), self.codec.code_dtype, True)])

    def _params(self, kind: str, layer: int) -> list[torch.Tensor]:
        return [self.regions[f"{kind}_{p}"][layer] for p in ("scale", "zero")[:self.codec.num_params]]

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
        _, heads, blocks, bs, hd = self._dims()
        codec = self.codec
        touched, rows, offsets, keep_old, valid = self._block_plan(slot_mapping)
        # keys: re-encode every touched block, per channel, over its valid tokens
        old, _ = self.read_blocks(layer, touched, torch.float32)  # [heads, nb, bs, hd]
        old = torch.where(keep_old[None, :, :, None], old, 0.0)
        old[:, rows, offsets] = k.transpose(0, 1).float()  # k [T, heads, hd]
        codes, params = codec.encode(old, dim=2, valid=valid[None, :, :, None])
        self.regions["k_codes"][layer].index_copy_(1, touched, codec.pack(codes))
        for region, p in zip(self._params("k", layer), params):
            region.index_copy_(1, touched, p.squeeze(2))  # [heads, nb, hd]
        # values: encode each token's groups of value_group
        tokens = v.shape[0]
        grouped = v.transpose(0, 1).float().reshape(heads, tokens, hd // self.value_group, self.value_group)
        codes, params = codec.encode(grouped, dim=-1)
        flat = self.regions["v_codes"][layer].view(heads, blocks * bs, -1)
        flat.index_copy_(1, slot_mapping, codec.pack(codes.view(heads, tokens, hd)))
        for region, p in zip(self._params("v", layer), params):
            region.view(heads, blocks * bs, -1).index_copy_(1, slot_mapping, p.squeeze(-1))

    def read_blocks(self, layer, block_ids, dtype):
        heads, hd, g = self.group.spec.num_kv_heads, self.group.spec.head_dim, self.value_group
        codec = self.codec
        v_codes = codec.unpack(self.regions["v_codes"][layer].index_select(1, block_ids))
        m, bs = v_codes.shape[1], v_codes.shape[2]
        v_params = tuple(p.index_select(1, block_ids).unsqueeze(-1) for p in self._params("v", layer))
        values = codec.decode(v_codes.view(heads, m, bs, hd // g, g), v_params, dtype).view(heads, m, bs, hd)
        return self.read_keys(layer, block_ids, dtype), values

    def read_keys(self, layer, block_ids, dtype):
        codec = self.codec
        k_codes = codec.unpack(self.regions["k_codes"][layer].index_select(1, block_ids))  # [heads, m, bs, hd]
        k_params = tuple(p.index_select(1, block_ids).unsqueeze(2) for p in self._params("k", layer))
        return codec.decode(k_codes, k_params, dtype)

    def weighted_values(self, layer, weights, block_ids):
        """With v = code x scale (+ zero) per token group: sum_t w_t v_t = (w x scale) @ codes (+ w @ zero)."""
        heads, n, group, length = weights.shape
        hd, g = self.group.spec.head_dim, self.value_group
        dtype = weights.dtype
        codes = self.codec.unpack(self.regions["v_codes"][layer].index_select(1, block_ids)).to(dtype)
        codes = codes.view(heads, n, -1, hd // g, g)[:, :, :length]  # [heads, n, S, G, g]
        params = [p.index_select(1, block_ids).to(dtype).view(heads, n, -1, hd // g)[:, :, :length]
                  for p in self._params("v", layer)]  # each [heads, n, S, G]
        scaled = weights.unsqueeze(-1) * params[0].unsqueeze(2)  # [heads, n, group, S, G]
        out = torch.einsum("kngsG,knsGc->kngGc", scaled, codes)  # [heads, n, group, G, g]
        if len(params) > 1:  # int4's zero point: + sum_t w_t zero_t
            out += torch.einsum("kngs,knsG->kngG", weights, params[1]).unsqueeze(-1)
        return out.reshape(heads, n, group, hd)


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
        """Bytes per token slot of a full page, every slot and scale included (rounded down)."""
        return self.nbytes // (self.num_blocks * self.block_size)

    @property
    def bytes_per_element(self) -> float:
        """Bytes per cached key or value, packing and scales included."""
        spec, slots = self.pages.group.spec, len(self.pages.group.layers)
        return self.nbytes / (self.num_blocks * self.block_size * slots * 2 * spec.num_kv_heads * spec.head_dim)

    def planned_nbytes(self) -> int:
        """What the planner says ``num_blocks`` blocks cost (equal to :attr:`nbytes`, tested)."""
        return self.num_blocks * pool_block_bytes(self.groups, self.block_size)

    def bytes_held(self, num_tokens: int) -> int:
        """Bytes the KV of one sequence of ``num_tokens`` tokens occupies in its layers, read off the
        allocated regions; a sliding layer holds at most its window."""
        slots = len(self.pages.group.layers)
        return sum(self.pages.bytes_held(min(num_tokens, g.spec.window or num_tokens)) * len(g.layers) // slots
                   for g in self.groups)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst (copy-on-write of shared partial blocks)."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        self.pages.copy_blocks(src, dst)

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """A host copy of some blocks (every region), for swapping out."""
        return self.pages.take_blocks(torch.tensor(block_ids, device=self.device))

    def write_blocks(self, block_ids: list[int], data: list[torch.Tensor]) -> None:
        """Put a host copy from :meth:`read_blocks` back, into (possibly other) block ids."""
        self.pages.put_blocks(torch.tensor(block_ids, device=self.device), data)


def _allocate(group: KVCacheGroup, num_blocks: int, block_size: int, device: torch.device) -> GroupStorage:
    """The group's storage, or a ValueError when ``device`` cannot hold or convert its format."""
    cls = QuantizedGroup if group.spec.quantized else PlainGroup
    try:
        probe = cls(group, 1, block_size, device)
        probe.layers[0].write(torch.zeros(1, group.spec.num_kv_heads, group.spec.head_dim, device=device),
                              torch.zeros(1, group.spec.num_kv_heads, group.spec.head_dim, device=device),
                              torch.zeros(1, dtype=torch.long, device=device))
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise ValueError(f"The KV cache format {group.spec.kv_format} cannot be stored on device "
                         f"{device} ({str(err).splitlines()[0]}).") from None
    return cls(group, num_blocks, block_size, device)
