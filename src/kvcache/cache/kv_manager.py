"""Per-request block tables: allocate, append, free, fork (copy-on-write) and prefix lookup.

The request carries its block table (``block_ids``) and the hashes of its full blocks
(``block_hashes``); this class is the only writer of both. Reference counts and free lists stay
inside :class:`BlockPool`.

A request's table covers exactly ceil(num_tokens_with_kv / block_size) blocks:

    tokens:  |t0 .. t15|t16 .. t31|t32 t33 . . . |
    table:   [   b7    ,    b2    ,     b9       ]   <- last block partly filled
              full: hashed, shareable             partial: private, or copied on write
"""

from __future__ import annotations

from typing import Protocol

from kvcache.cache.block_pool import BlockHash, BlockPool, hash_block


class CachedSequence(Protocol):
    """What the kv manager needs to know about a request (plain data, no tensors)."""

    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    block_hashes: list[BlockHash]
    cache_salt: str | None


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found
        self._pending_copies: dict[int, int] = {}  # dst block -> src block, executed before the next forward

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ---------------------------------------------------------------------

    def _update_hashes(self, seq: CachedSequence, num_tokens: int) -> None:
        """Extend ``seq.block_hashes`` to cover every full block of its first ``num_tokens`` tokens."""
        bs = self.block_size
        while len(seq.block_hashes) < num_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash_block(parent, seq.all_token_ids[i * bs:(i + 1) * bs], seq.cache_salt))

    def find_cached_prefix(self, seq: CachedSequence) -> list[int]:
        """Blocks already holding this sequence's leading full blocks, longest chain first.

        At least one token is always left to compute, since the model must produce logits.
        Takes no reference and counts nothing (see :meth:`count_prefix_lookup`).
        """
        if not self.pool.enable_prefix_caching:
            return []
        num_tokens = len(seq.all_token_ids)
        self._update_hashes(seq, num_tokens)
        hits: list[int] = []
        for block_hash in seq.block_hashes[: (num_tokens - 1) // self.block_size]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def count_prefix_lookup(self, seq: CachedSequence, num_hit_blocks: int) -> None:
        """Count one admitted lookup: its tokens as queries, its cached tokens as hits."""
        if self.pool.enable_prefix_caching:
            self.prefix_cache_queries += len(seq.all_token_ids)
            self.prefix_cache_hits += num_hit_blocks * self.block_size

    # --- allocation -----------------------------------------------------------------------

    def can_allocate(self, seq: CachedSequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        return self._blocks_needed(seq, num_new_tokens, cached) <= self.pool.num_free - \
            sum(1 for b in cached if self.pool.ref_count(b) == 0)

    def _blocks_needed(self, seq: CachedSequence, num_new_tokens: int, cached: list[int]) -> int:
        have = len(seq.block_ids) + len(cached)
        computed = seq.num_computed_tokens + len(cached) * self.block_size
        needed = max(0, self.blocks_for(computed + num_new_tokens) - have)
        return needed + (1 if self._needs_copy_on_write(seq, computed, num_new_tokens) else 0)

    def _needs_copy_on_write(self, seq: CachedSequence, computed: int, num_new_tokens: int) -> bool:
        """True when the first slot this step writes lies in a block another request also holds."""
        first = computed // self.block_size
        return num_new_tokens > 0 and first < len(seq.block_ids) and \
            self.pool.ref_count(seq.block_ids[first]) > 1

    def allocate_slots(self, seq: CachedSequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens of KV; False (and no change) if it cannot.

        ``cached`` are prefix-hit blocks from :meth:`find_cached_prefix`; they are taken (reference
        +1) and become the start of the table, and ``seq.num_computed_tokens`` is advanced past them.
        """
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        if cached:
            self.pool.take(cached)
            seq.block_ids.extend(cached)
            seq.num_computed_tokens += len(cached) * self.block_size
        if self._needs_copy_on_write(seq, seq.num_computed_tokens, num_new_tokens):
            self._copy_last_block(seq)
        elif num_new_tokens and seq.num_computed_tokens % self.block_size:
            # writing into a block this sequence alone holds: if it was full once (a rollback
            # made it partial), its hash no longer describes what it will hold
            self.pool.unregister(seq.block_ids[seq.num_computed_tokens // self.block_size])
        end = seq.num_computed_tokens + num_new_tokens
        missing = self.blocks_for(end) - len(seq.block_ids)
        if missing > 0:
            seq.block_ids.extend(self.pool.allocate(missing))
        self._register_full_blocks(seq, end)
        return True

    def restore(self, seq: CachedSequence, num_new_tokens: int) -> tuple[int, ...] | None:
        """Fresh blocks for a swapped-out sequence's computed tokens plus this step's new ones.

        Returns the blocks its saved KV must be copied into, or None (and no change) if they do not fit.
        """
        restored = self.blocks_for(seq.num_computed_tokens)
        total = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        if seq.block_ids or total > self.pool.num_free:
            return None
        seq.block_ids.extend(self.pool.allocate(restored))
        if not self.allocate_slots(seq, num_new_tokens):
            raise RuntimeError("restore: the blocks counted as free could not be allocated.")
        return tuple(seq.block_ids[:restored])

    def _copy_last_block(self, seq: CachedSequence) -> None:
        shared = seq.block_ids[-1]
        (private,) = self.pool.allocate(1)
        self._pending_copies[private] = self._pending_copies.pop(shared, shared)
        self.pool.release([shared])
        seq.block_ids[-1] = private

    def _register_full_blocks(self, seq: CachedSequence, num_tokens_with_kv: int) -> None:
        """Make blocks that become full in this step findable by prefix hash.

        Blocks full before this step were registered when they filled (or came from the prefix
        cache), so only blocks from the one holding ``num_computed_tokens`` on are looked at.
        """
        if not self.pool.enable_prefix_caching:
            return
        self._update_hashes(seq, num_tokens_with_kv)
        for i in range(seq.num_computed_tokens // self.block_size, num_tokens_with_kv // self.block_size):
            self.pool.register(seq.block_ids[i], seq.block_hashes[i])

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block copies the runner must perform before this step's forward."""
        copies = [(src, dst) for dst, src in self._pending_copies.items()]
        self._pending_copies.clear()
        return copies

    # --- release and sharing --------------------------------------------------------------

    def free(self, seq: CachedSequence) -> None:
        """Return every block of the sequence; tail blocks first so they are evicted first."""
        for block_id in seq.block_ids:
            self._pending_copies.pop(block_id, None)
        self.pool.release(reversed(seq.block_ids))
        seq.block_ids.clear()

    def fork(self, parent: CachedSequence, child: CachedSequence) -> None:
        """Let ``child`` share all of ``parent``'s blocks; a shared partial block is copied on write."""
        if child.block_ids:
            raise RuntimeError(f"Request {child.request_id} already holds blocks; cannot fork into it.")
        self.pool.take(parent.block_ids)
        child.block_ids.extend(parent.block_ids)
        child.block_hashes[:] = parent.block_hashes
        child.num_computed_tokens = parent.num_computed_tokens

    def truncate(self, seq: CachedSequence, num_tokens: int) -> None:
        """Keep KV for the first ``num_tokens`` tokens only (rollback); frees whole blocks past them.

        Dropped whole blocks keep their prefix hashes (their contents still match them). A kept
        block that becomes partial keeps its hash until it is written again (see allocate_slots).
        """
        keep = self.blocks_for(num_tokens)
        dropped = seq.block_ids[keep:]
        self.pool.release(reversed(dropped))
        del seq.block_ids[keep:]
        del seq.block_hashes[num_tokens // self.block_size:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)
