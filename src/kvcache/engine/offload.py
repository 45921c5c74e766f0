"""The engine's side of the KV offload tiers (:mod:`kvcache.cache.tiers`): the fingerprint that keeps
keys apart across worlds, write-back of the blocks the pool evicts, write-through of blocks that
fill, hits counted when a step copies them in, and which pool blocks came from which tier.

    step:  schedule (pool miss -> tiers fetched; evictions noted) -> runner: save evicted, copy tier
           blocks in, forward -> after_step: blocks that filled -> write queues; loads -> hit counts
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, Mapping, Sequence

import torch

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import KVCacheManager
from kvcache.cache.offload_config import OffloadConfig
from kvcache.cache.storage import KVCache
from kvcache.cache.tiers import TieredStore
from kvcache.runtime.plan import SchedulerOutput

FINGERPRINT_VERSION = b"kvcache-offload-1"
WEIGHT_SAMPLES = 64  # values read from each weight tensor for its identity
ASSUMED_FLOPS = 100e9  # a CPU's prefill speed (FLOP/s), assumed until the engine has timed its own steps


def assumed_seconds_per_token(num_params: int) -> float:
    """What prefilling one token costs before the engine has measured it: 2 FLOPs per weight at
    ASSUMED_FLOPS (SmolLM2-135M: 2.7 ms; an idle 2-core AVX-512 machine does about 1 ms)."""
    return 2 * num_params / ASSUMED_FLOPS


def weights_identity(weights: Mapping[str, Any]) -> bytes:
    """A digest of the weights: every tensor's name, shape and dtype, and 64 values spread over it
    (a packed weight: each of its planes, codes and scales).

    Cheap (no pass over all the weights), and enough to tell two checkpoints apart: fine-tuning or
    quantizing changes nearly every value, so it changes sampled ones.
    """
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        value = weights[name]
        for i, t in enumerate(value.planes() if hasattr(value, "planes") else (value,)):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // WEIGHT_SAMPLES)
            sample = flat[::step][:WEIGHT_SAMPLES].to("cpu", torch.float32).contiguous()
            h.update(f"{name}|{i}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(sample.numpy().tobytes())
    return h.digest()


def kv_fingerprint(weights_id: bytes, model_config: Any, model_dtype: str, storage: KVCache) -> bytes:
    """Everything besides the tokens (and the salt, in the chain hash) that makes a block's KV differ:
    the weights and the model's config, the dtype it computes in, the device type, the KV format,
    block size, every cache group's spec and layers, and the page layout a block body holds."""
    h = hashlib.blake2b(digest_size=16)
    for part in (FINGERPRINT_VERSION, weights_id, repr(model_config), model_dtype, storage.device.type,
                 storage.kv_format, storage.block_size, repr(storage.groups), repr(storage.block_layout())):
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x1f")
    return h.digest()


class EngineOffload:
    """Wires a :class:`TieredStore` to one engine's pool, kv manager, storage and runner."""

    def __init__(self, config: OffloadConfig, fingerprint: bytes, storage: KVCache, pool: BlockPool,
                 kv: KVCacheManager, seconds_per_token: float) -> None:
        self.store = TieredStore.from_config(config, fingerprint, storage.block_nbytes)
        self.store.seconds_per_token = seconds_per_token  # until the engine's own steps are timed
        self.storage = storage
        self.pool = pool
        pool.record_evictions = self.store.wants_evicted
        pool.record_fills = self.store.wants_filled
        kv.tiers = self.store
        self.origins: dict[int, tuple[str, int, bytes]] = {}  # pool block -> (tier, group, chain hash) it came as
        # pending stores are written on close(), when this object is collected, or at normal exit
        self._finalizer = weakref.finalize(self, self.store.close)

    def save_evicted(self, blocks: Sequence[tuple[int, bytes]], bodies: Sequence[memoryview]) -> None:
        """The runner's hook for blocks a step hands out again: their KV goes down to host memory."""
        self.store.save_evicted(blocks, bodies)

    def after_step(self, plan: SchedulerOutput, forward_seconds: float) -> None:
        """After a step ran: count its tier loads as hits, queue the blocks that filled (and are still
        registered) for the write-through tiers, and time the step as the recompute cost."""
        loaded = {block_id for block_id, _ in plan.tier_loads}
        self.store.record_loads([block for _, block in plan.tier_loads])
        for block_id, block in plan.tier_loads:
            meta = self.pool.blocks[block_id]
            self.origins[block_id] = (block.tier, meta.group, meta.block_hash)
        filled = [(b, g, h) for b, g, h in self.pool.take_filled()
                  if b not in loaded and self._holds(b, g, h)]
        if filled:
            self.store.store([(g, h) for _, g, h in filled], self.storage.export_blocks([b for b, _, _ in filled]))
        if not plan.tier_loads and plan.num_tokens >= 64:
            self.store.observe_compute(plan.num_tokens, forward_seconds)

    def discard_step(self) -> None:
        """A step failed: the blocks it registered hold no KV worth storing."""
        self.pool.take_filled()

    def _holds(self, block_id: int, group: int, block_hash: bytes | None) -> bool:
        block = self.pool.blocks[block_id]
        return block.block_hash is not None and block.block_hash == block_hash and block.group == group

    def block_origins(self) -> dict[int, str]:
        """Pool blocks that still hold the KV a tier gave them -> that tier's name (for the live page)."""
        for block_id, (_, group, block_hash) in list(self.origins.items()):
            if not self._holds(block_id, group, block_hash):
                del self.origins[block_id]
        return {block_id: tier for block_id, (tier, _, _) in self.origins.items()}

    def stats(self) -> dict[str, dict[str, int | bool]]:
        return self.store.stats()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every pending write-through store is written."""
        return self.store.flush(timeout)

    def close(self) -> None:
        """Write pending stores, stop the writer threads, release host memory and connections."""
        self._finalizer()
