"""Physical KV blocks: the free queue, reference counts and the prefix-hash map.

This is the only code that touches free lists and reference counts. A block is *free* when no
request references it; a free block may still carry a prefix hash, and stays findable until it is
handed out again. The free queue is ordered least-recently-freed first, so prefix eviction is LRU
for free.

    free + used == total        (always)
    ref_count >= 0              (a violation raises, it is never clamped)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_key: str | None) -> BlockHash:
    """Chain hash of one full block: hash(parent hash, the block's tokens, extra keys such as a salt)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\x00" * 16)
    h.update(b"|".join(str(t).encode() for t in token_ids))
    if extra_key:
        h.update(b"#salt#" + extra_key.encode())
    return h.digest()


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    group: int = 0  # the cache group whose tokens ``block_hash`` describes


class BlockPool:
    """``num_blocks`` physical blocks, handed out by reference count."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"The KV cache needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._by_hash: dict[tuple[int, BlockHash], KVBlock] = {}  # (group, chain hash) -> block
        # for the offload tiers (off unless the engine has them): (block id, group, chain hash) of
        # cached blocks handed out again (their KV is still intact until the step runs), and of
        # blocks registered as they fill
        self.record_evictions = False
        self.record_fills = False
        self._evicted: list[tuple[int, int, BlockHash]] = []
        self._filled: list[tuple[int, int, BlockHash]] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a findable prefix."""
        return sum(1 for b in self._free.values() if b.block_hash is not None)

    def allocate(self, count: int) -> list[int]:
        """Hand out ``count`` blocks (ref_count 1), evicting the least recently freed first."""
        if count > len(self._free):
            raise RuntimeError(f"Asked for {count} blocks with only {len(self._free)} free.")
        taken = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if self.record_evictions and block.block_hash is not None:
                self._evicted.append((block.block_id, block.group, block.block_hash))
            self._forget_hash(block)
            block.ref_count = 1
            taken.append(block.block_id)
        return taken

    def take(self, block_ids: Iterable[int]) -> None:
        """Add a reference to existing blocks (a prefix hit or a fork); revives free ones."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; a block nobody references joins the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"Block {block_id} released with reference count {block.ref_count}.")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None or not self.enable_prefix_caching:
                    self._forget_hash(block)
                self._free[block_id] = block

    def lookup(self, block_hash: BlockHash, group: int = 0) -> int | None:
        """The block holding cache group ``group``'s KV for the full block with this chain hash."""
        block = self._by_hash.get((group, block_hash)) if self.enable_prefix_caching else None
        return None if block is None else block.block_id

    def register(self, block_id: int, block_hash: BlockHash, group: int = 0) -> None:
        """Make a full block of cache group ``group`` findable by its prefix hash (the first wins).

        Groups share the pool but not contents: the same tokens in two groups are two blocks.
        """
        if not self.enable_prefix_caching or (group, block_hash) in self._by_hash:
            return
        block = self.blocks[block_id]
        if block.block_hash is None:
            block.block_hash, block.group = block_hash, group
            self._by_hash[(group, block_hash)] = block
            if self.record_fills:
                self._filled.append((block_id, group, block_hash))

    def take_evicted(self) -> list[tuple[int, int, BlockHash]]:
        """(block id, group, chain hash) of every cached block handed out since the last call."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def take_filled(self) -> list[tuple[int, int, BlockHash]]:
        """(block id, group, chain hash) of every block registered since the last call."""
        filled, self._filled = self._filled, []
        return filled

    def unregister(self, block_id: int) -> None:
        """Make a block unfindable by prefix hash (its tokens are about to change)."""
        self._forget_hash(self.blocks[block_id])

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            self._forget_hash(block)

    def _forget_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._by_hash.get((block.group, block.block_hash)) is block:
                del self._by_hash[(block.group, block.block_hash)]
            block.block_hash = None
