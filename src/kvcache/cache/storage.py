"""The KV tensors: one allocation, a view per layer, written by slot mapping, read by block table."""

from __future__ import annotations

import torch

from kvcache.sizing import KVShape, block_bytes

TORCH_TO_KV_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class KVStorage:
    """All layers' keys and values in one tensor, sized by the planner.

    ``self.kv``: [num_layers, 2, kv_heads, num_blocks, block_size, head_dim]
    Head-major, so a gather by block table gives [kv_heads, tokens, head_dim] with no transpose.
    A slot is ``block_id * block_size + offset``; slot mappings and block tables index into it.
    """

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        if dtype not in TORCH_TO_KV_DTYPE:
            raise ValueError(f"KV storage dtype {dtype} is not supported.")
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.kv = torch.zeros(shape.num_layers, 2, shape.num_kv_heads, num_blocks, block_size,
                              shape.head_dim, dtype=dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key cache, value cache) of one layer, each [kv_heads, num_blocks, block_size, head_dim]."""
        return self.kv[index, 0], self.kv[index, 1]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's K and V take across all layers, read off the tensor itself."""
        return self.nbytes // (self.num_blocks * self.block_size)

    def planned_nbytes(self) -> int:
        return self.num_blocks * block_bytes(self.shape, self.block_size, TORCH_TO_KV_DTYPE[self.dtype])

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of shared partial blocks)."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.kv.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.kv.device)
        self.kv[:, :, :, dst] = self.kv[:, :, :, src]

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of some blocks in host memory: [num_layers, 2, kv_heads, len(block_ids), block_size, head_dim]."""
        index = torch.tensor(block_ids, device=self.kv.device)
        return self.kv[:, :, :, index].to("cpu", copy=True)

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        index = torch.tensor(block_ids, device=self.kv.device)
        self.kv[:, :, :, index] = data.to(self.kv.device)
