"""Per-request block tables, one per cache group: allocate, append, window-free, free, fork
(copy-on-write), rollback and prefix lookup.

The request carries its tables (``block_tables[g]`` for cache group g) and the chain hashes of
its full blocks (``block_hashes``, the same for every group); this class is the only writer of
both. Reference counts and free lists stay inside :class:`BlockPool`, which every group draws
from. A group's table covers exactly ceil(num_tokens_with_kv / block_size) entries:

    tokens:         |t0 .. t15|t16 .. t31|t32 .. t47|t48 t49 . . |
    full group:     [   b7    ,    b2    ,    b4    ,     b9      ]   <- last block partly filled
    sliding group:  [  NULL   ,    b5    ,    b1    ,     b3      ]   <- window 24: t0..t15 unseen
                     released: no future query's window reaches it (vLLM's null block)

Full blocks are hashed and shareable; the partial one is private, or copied on write.

A request under an eviction policy (``seq.kv_state``, see :mod:`kvcache.cache.policies`) holds
fewer tokens than it computed in the groups the policy governs: its live tokens fill slots
0 .. live-1 of the table in any order, and the table covers ceil(live / block_size) entries.
:meth:`KVCacheManager.evict` drops what the policy says, fills the holes with the last live slots
and gives back blocks past the end; from the first eviction on, a group registers no more hashes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol, Sequence

from kvcache.cache.block_pool import BlockHash, BlockPool, hash_block
from kvcache.cache.policies import PolicyState
from kvcache.cache.tiers import TierBlock

NULL_BLOCK = -1  # a table entry whose block a sliding window gave back


def _in_pool(entry: int | TierBlock) -> bool:
    """Is this table entry (of a prefix hit) a block of the pool, not a placeholder or a tier's block?"""
    return not isinstance(entry, TierBlock) and entry != NULL_BLOCK


def _num_released(table: list[int]) -> int:
    """How many leading entries are placeholders. A window releases blocks oldest first, so the
    placeholders of a table always form its prefix; a binary search finds its end."""
    return bisect.bisect_left(table, True, key=lambda b: b != NULL_BLOCK)


class CachedSequence(Protocol):
    """What the kv manager needs to know about a request (plain data, no tensors)."""

    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int
    block_tables: list[list[int]]
    block_hashes: list[BlockHash]
    cache_salt: str | None
    # optional: ``kv_state`` (a PolicyState) when the request is under an eviction policy


def _policy(seq: CachedSequence) -> PolicyState | None:
    return getattr(seq, "kv_state", None)


class PrefixTiers(Protocol):
    """The offload tiers below the pool, as the prefix lookup sees them (see :mod:`kvcache.cache.tiers`)."""

    def fetch(self, blocks: Sequence[tuple[int, BlockHash]], num_tokens: int) -> list[TierBlock]:
        """The leading run of ``blocks`` ((group, chain hash)) some tier holds intact, found within
        the time computing ``num_tokens`` tokens would take."""


@dataclass(frozen=True)
class PrefixHit:
    """The leading ``num_blocks`` full blocks of a sequence found cached, in every group.

    ``tables[g]`` lists group g's blocks for them, NULL_BLOCK where g's window no longer needs one,
    and a :class:`TierBlock` for one found in an offload tier (it gets a fresh block on admission).
    """

    num_blocks: int
    tables: tuple[tuple[int | TierBlock, ...], ...]

    @staticmethod
    def none(num_groups: int) -> "PrefixHit":
        return PrefixHit(0, ((),) * num_groups)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, windows: Sequence[int | None] = (None,)) -> None:
        """``windows[g]`` is cache group g's sliding window in tokens (None: full attention)."""
        if not windows or any(w is not None and w < 1 for w in windows):
            raise ValueError("The kv manager needs one window (None or >= 1 token) per cache group.")
        self.pool = pool
        self.block_size = block_size
        self.windows = tuple(windows)
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found
        self._pending_copies: dict[int, int] = {}  # dst block -> src block, executed before the next forward
        self._pending_moves: list[tuple[int, int]] = []  # (src slot, dst slot), executed first of all
        self.num_tokens_evicted = 0  # every group together, since the start
        self.num_blocks_evicted = 0  # blocks given back because their tokens were evicted
        self.tiers: PrefixTiers | None = None  # offload tiers asked when the pool misses
        self._pending_loads: dict[int, TierBlock] = {}  # fresh block -> tier bytes, copied before the next forward

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def first_live_block(self, group: int, position: int) -> int:
        """Index of the first block a query at ``position`` (or later) can still see in ``group``:
        it sees keys at positions > position - window."""
        window = self.windows[group]
        return 0 if window is None else max(0, position - window + 1) // self.block_size

    def tables(self, seq: CachedSequence) -> list[list[int]]:
        """The sequence's block tables, one per group (created empty on first use)."""
        if not seq.block_tables:
            seq.block_tables.extend([] for _ in self.windows)
        return seq.block_tables

    def num_blocks_held(self, seq: CachedSequence) -> int:
        """Real blocks the sequence references now, every group together (placeholders not counted)."""
        return sum(len(table) - _num_released(table) for table in seq.block_tables)

    def worst_case_blocks(self, num_prompt_tokens: int, num_tokens: int, num_samples: int,
                          max_chunk: int, kv_budget: int | None = None) -> int:
        """The most blocks ``num_samples`` samples of one prompt can hold at once when each grows to
        ``num_tokens`` tokens, computing at most ``max_chunk`` per step: the prompt's full blocks are
        shared, and a sliding group holds no more than its window's blocks plus one step's. Under an
        eviction policy of ``kv_budget`` tokens a full-attention group holds at most the budget plus
        one step's tokens per sample, shared or not."""
        shared_full = num_prompt_tokens // self.block_size
        total = 0
        for window in self.windows:
            each = self.blocks_for(num_tokens)
            shared = shared_full
            if window is not None:
                each = min(each, (window + max_chunk - 2) // self.block_size + 2)
                shared = min(shared, each)
            elif kv_budget is not None:
                each, shared = min(each, self.blocks_for(kv_budget + max_chunk) + 1), 0
            total += shared + num_samples * (each - shared)
        return total

    # --- prefix cache ---------------------------------------------------------------------

    def _update_hashes(self, seq: CachedSequence, num_tokens: int) -> None:
        """Extend ``seq.block_hashes`` to cover every full block of its first ``num_tokens`` tokens."""
        bs = self.block_size
        while len(seq.block_hashes) < num_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash_block(parent, seq.all_token_ids[i * bs:(i + 1) * bs], seq.cache_salt))

    def find_cached_prefix(self, seq: CachedSequence) -> PrefixHit:
        """The longest run of leading full blocks cached in every group, as far as each group needs:
        a full-attention group every block of the run, a sliding group only those the next query's
        window reaches.

        At least one token is always left to compute, since the model must produce logits.
        Takes no reference and counts nothing (see :meth:`count_prefix_lookup`).
        """
        if not self.pool.enable_prefix_caching:
            return PrefixHit.none(self.num_groups)
        num_tokens = len(seq.all_token_ids)
        self._update_hashes(seq, num_tokens)
        hashes = seq.block_hashes[: (num_tokens - 1) // self.block_size]
        found: list[list] = [[self.pool.lookup(h, g) for h in hashes] for g in range(self.num_groups)]
        n = len(hashes)
        while n and not all(self._covers(found[g], g, n) for g in range(self.num_groups)):
            n -= 1
        if self.tiers is not None and n < len(hashes):
            n = self._extend_from_tiers(hashes, found, n)
        tables = tuple(tuple(NULL_BLOCK if i < self.first_live_block(g, n * self.block_size) else found[g][i]
                             for i in range(n)) for g in range(self.num_groups))
        return PrefixHit(n, tables)

    def _extend_from_tiers(self, hashes: list[BlockHash], found: list[list], n: int) -> int:
        """Lengthen the pool's run of ``n`` cached blocks with blocks from the offload tiers: the
        missing blocks each group needs for a run of ``limit`` blocks are fetched in block order
        (``found[g][i]`` becomes a TierBlock); a miss at block j shortens the run to j, which may
        need earlier blocks of a sliding group, so the loop asks again until nothing is missing."""
        limit = len(hashes)
        while limit > n:
            wanted = [(g, i) for i in range(n, limit) for g in range(self.num_groups)
                      if found[g][i] is None and i >= self.first_live_block(g, limit * self.block_size)]
            got = self.tiers.fetch([(g, hashes[i]) for g, i in wanted], (limit - n) * self.block_size)
            for (g, i), block in zip(wanted, got):
                found[g][i] = block
            if len(got) == len(wanted):
                return limit
            limit = wanted[len(got)][1]
        return n

    def _covers(self, found: list[int | None], group: int, n: int) -> bool:
        """Does group ``group`` hold every block that a query right after ``n`` blocks can see?"""
        return all(b is not None for b in found[self.first_live_block(group, n * self.block_size):n])

    def count_prefix_lookup(self, seq: CachedSequence, hit: PrefixHit) -> None:
        """Count one admitted lookup: its tokens as queries, its cached tokens as hits."""
        if self.pool.enable_prefix_caching:
            self.prefix_cache_queries += len(seq.all_token_ids)
            self.prefix_cache_hits += hit.num_blocks * self.block_size

    # --- allocation -----------------------------------------------------------------------

    def can_allocate(self, seq: CachedSequence, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        tables = self.tables(seq)
        hit = hit or PrefixHit.none(self.num_groups)
        computed = seq.num_computed_tokens + hit.num_blocks * self.block_size
        needed, freed = 0, 0
        for g, table in enumerate(tables):
            entries = table + list(hit.tables[g]) if hit.num_blocks else table
            stored = computed - self.num_evicted(seq, g)
            needed += max(0, self.blocks_for(stored + num_new_tokens) - len(entries))
            needed += self._needs_copy_on_write(entries, stored, num_new_tokens)
            freed += sum(1 for b in self._outside_window(entries, g, computed) if self.pool.ref_count(b) == 1)
        revived = sum(1 for t in hit.tables for b in t if _in_pool(b) and self.pool.ref_count(b) == 0)
        loads = sum(1 for t in hit.tables for b in t if isinstance(b, TierBlock))
        return needed + loads <= self.pool.num_free - revived + freed

    def _needs_copy_on_write(self, table: list[int], computed: int, num_new_tokens: int) -> bool:
        """True when the first slot this step writes lies in a block another request also holds."""
        first = computed // self.block_size
        return num_new_tokens > 0 and first < len(table) and self.pool.ref_count(table[first]) > 1

    def _outside_window(self, table: list[int], group: int, position: int) -> list[int]:
        """Real blocks of ``table`` that no query from ``position`` on can see: those between the
        released prefix and the window, found without walking the prefix (this runs every step)."""
        return table[_num_released(table):self.first_live_block(group, position)]

    def allocate_slots(self, seq: CachedSequence, num_new_tokens: int, hit: PrefixHit | None = None,
                       num_provisional: int = 0) -> bool:
        """Make room for ``num_new_tokens`` more tokens of KV in every group; False (and no change)
        if it cannot. Blocks a sliding window has left behind go back to the pool first.

        ``hit`` is a :meth:`find_cached_prefix` result for a sequence holding no blocks yet: its
        blocks are taken (reference +1) and start the tables, and ``seq.num_computed_tokens`` is
        advanced past them. The last ``num_provisional`` new tokens are speculative drafts (not in
        ``all_token_ids``): they get slots, but no block holding one is registered by prefix hash
        (see :meth:`rollback`).
        """
        if not self.can_allocate(seq, num_new_tokens, hit):
            return False
        tables = self.tables(seq)
        if hit and hit.num_blocks:
            for table, cached in zip(tables, hit.tables):
                self.pool.take(b for b in cached if _in_pool(b))
                table.extend(cached)
            self._load_tier_blocks(seq, tables)
            seq.num_computed_tokens += hit.num_blocks * self.block_size
        computed = seq.num_computed_tokens
        end = computed + num_new_tokens
        for g, table in enumerate(tables):
            self._release_outside_window(table, g, computed)
            stored = computed - self.num_evicted(seq, g)  # slots in use (== computed without eviction)
            if self._needs_copy_on_write(table, stored, num_new_tokens):
                self._copy_last_block(table)
            elif num_new_tokens and stored % self.block_size:
                # writing into a block this sequence alone holds: if it was full once (a rollback
                # made it partial), its hash no longer describes what it will hold
                self.pool.unregister(table[stored // self.block_size])
            missing = self.blocks_for(stored + num_new_tokens) - len(table)
            if missing > 0:
                table.extend(self.pool.allocate(missing))
        self._register_full_blocks(seq, end - num_provisional)
        return True

    def _release_outside_window(self, table: list[int], group: int, position: int) -> None:
        """Give back the blocks no query from ``position`` on can see; they keep their hashes."""
        start, end = _num_released(table), self.first_live_block(group, position)
        for i in range(start, end):
            self._pending_copies.pop(table[i], None)
        self.pool.release(table[start:end])
        table[start:end] = [NULL_BLOCK] * max(0, end - start)

    # --- eviction ---------------------------------------------------------------------------

    def num_evicted(self, seq: CachedSequence, group: int) -> int:
        """Tokens of ``seq`` that group ``group`` computed and no longer holds (its policy dropped them)."""
        state = _policy(seq)
        return 0 if state is None else state.evicted(group)

    def kv_offsets(self, seq: CachedSequence) -> tuple[int, ...]:
        """Per group, how far slot indices lag positions: the slot of a token computed now is its
        position minus this. Empty when the sequence evicted nothing (every offset 0)."""
        state = _policy(seq)
        if state is None or not any(live.evicted for live in state.groups.values()):
            return ()
        return tuple(state.evicted(g) for g in range(self.num_groups))

    def score_rows(self, seq: CachedSequence, num_new_tokens: int) -> tuple[int, ...]:
        """Per group, how many of this step's last query rows the sequence's policy wants attention
        weights of (empty: none anywhere)."""
        state = _policy(seq)
        rows = 0 if state is None else state.score_rows(num_new_tokens)
        return tuple(rows if g in state.groups else 0 for g in range(self.num_groups)) if rows else ()

    def observe(self, seq: CachedSequence, weights: tuple, rows: tuple[int, ...]) -> None:
        """Hand a step's attention weights (per group: [live] summed over layers, heads and the
        ``rows[g]`` query rows asked for, or None) to the sequence's policy."""
        state = _policy(seq)
        if state is None:
            return
        for g, w in enumerate(weights):
            if w is not None and g in state.groups:
                state.sync(g, seq.num_computed_tokens)
                state.observe(g, w, rows[g])

    def evict(self, seq: CachedSequence) -> int:
        """Drop the tokens the sequence's policy evicts now, in every group it governs: the last live
        slots move into the holes (moves for the runner, see :meth:`take_pending_moves`), blocks no
        live token uses go back to the pool, and a block whose tokens change loses its prefix hash.
        A shared block that would change is first replaced by a private copy; when the pool has no
        block for that, the eviction waits for a later step. Returns the tokens evicted."""
        state = _policy(seq)
        if state is None or not seq.block_tables:
            return 0
        total = 0
        for g in state.groups:
            state.sync(g, seq.num_computed_tokens)
            drop = state.to_drop(g)
            if drop and self._compact(seq.block_tables[g], state, g, drop):
                total += len(drop)
        self.num_tokens_evicted += total
        return total

    def _compact(self, table: list[int], state: PolicyState, group: int, drop: list[int]) -> bool:
        """Move the live slots past the new end into the dropped slots below it and release the
        blocks past it. A block that changes gets a private copy first when another request holds
        it (always: False, and no change, when the pool has no block for that) or when it is a
        findable prefix (while free blocks last: the prefix stays cached for others).

            live 10, drop [1, 5, 8]  ->  moves 7 -> 1, 9 -> 5  ->  live 7 (slots 0 .. 6)
        """
        bs = self.block_size
        live = len(state.groups[group].positions)
        end = live - len(drop)
        dropped = set(drop)
        holes = [i for i in drop if i < end]
        sources = [i for i in range(end, live) if i not in dropped]
        changed = sorted({h // bs for h in holes})
        tail = table[self.blocks_for(end):]
        room = self.pool.num_free + sum(1 for b in tail if self.pool.ref_count(b) == 1)
        shared = [j for j in changed if self.pool.ref_count(table[j]) > 1]
        if len(shared) > room:
            return False
        cached = [j for j in changed if j not in shared and self.pool.blocks[table[j]].block_hash is not None]
        shared = set(shared + cached[:room - len(shared)])
        slot = [table[i // bs] * bs + i % bs for i in range(live)]  # where each slot index lives now
        moves = dict(zip(holes, sources))  # slot index -> the slot index whose token fills it
        del table[self.blocks_for(end):]
        self.pool.release(reversed(tail))
        self.num_blocks_evicted += len(tail)
        for j in changed:
            if j in shared:
                self.pool.release([table[j]])
                (table[j],) = self.pool.allocate(1)
                for i in range(j * bs, min(end, (j + 1) * bs)):
                    moves.setdefault(i, i)  # the whole block is copied into the private one
            else:
                self.pool.unregister(table[j])
        self._pending_moves.extend((slot[src], table[dst // bs] * bs + dst % bs) for dst, src in moves.items())
        state.compacted(group, list(zip(sources, holes)), end)
        return True

    def take_pending_moves(self) -> list[tuple[int, int]]:
        """(src slot, dst slot) moves the runner performs first in the next step, all reads before
        all writes."""
        moves, self._pending_moves = self._pending_moves, []
        return moves

    def reset_policy(self, seq: CachedSequence) -> None:
        """The sequence starts over (preempted by recompute): its policy forgets what it kept."""
        state = _policy(seq)
        if state is not None:
            state.reset()

    def blocks_to_save(self, seq: CachedSequence) -> tuple[int, ...]:
        """The blocks holding KV a future query can see, every group in order (what swap-out keeps)."""
        return tuple(b for g, table in enumerate(self.tables(seq))
                     for b in table[self.first_live_block(g, seq.num_computed_tokens):])

    def restore(self, seq: CachedSequence, num_new_tokens: int) -> tuple[int, ...] | None:
        """Fresh blocks for a swapped-out sequence's visible computed tokens plus this step's new ones.

        Returns the blocks its saved KV (:meth:`blocks_to_save`, same order) must be copied into,
        or None (and no change) if they do not fit.
        """
        computed = seq.num_computed_tokens
        tables = self.tables(seq)
        spans = [(self.first_live_block(g, computed), self.blocks_for(computed - self.num_evicted(seq, g)))
                 for g in range(self.num_groups)]
        count = sum(hi - lo for lo, hi in spans)
        if any(tables) or count > self.pool.num_free:
            return None
        fresh = self.pool.allocate(count)
        taken = 0
        for table, (lo, hi) in zip(tables, spans):
            table.extend([NULL_BLOCK] * lo + fresh[taken:taken + hi - lo])
            taken += hi - lo
        if not self.allocate_slots(seq, num_new_tokens):
            self.free(seq)
            return None
        return tuple(fresh)

    def _copy_last_block(self, table: list[int]) -> None:
        shared = table[-1]
        (private,) = self.pool.allocate(1)
        self._pending_copies[private] = self._pending_copies.pop(shared, shared)
        self.pool.release([shared])
        table[-1] = private

    def _register_full_blocks(self, seq: CachedSequence, num_tokens_with_kv: int,
                              first_token: int | None = None) -> None:
        """Make blocks that become full in this step findable by prefix hash, in every group.

        Blocks full before this step were registered when they filled (or came from the prefix
        cache), so only blocks from the one holding ``first_token`` (default ``num_computed_tokens``)
        on are looked at.
        """
        if not self.pool.enable_prefix_caching:
            return
        self._update_hashes(seq, num_tokens_with_kv)
        first = seq.num_computed_tokens if first_token is None else first_token
        for g, table in enumerate(seq.block_tables):
            if self.num_evicted(seq, g):
                continue  # its slots no longer hold the tokens in position order
            for i in range(first // self.block_size, num_tokens_with_kv // self.block_size):
                self.pool.register(table[i], seq.block_hashes[i], g)

    def _load_tier_blocks(self, seq: CachedSequence, tables: list[list]) -> None:
        """Give every TierBlock entry of the tables a fresh block, findable by its hash at once
        (its bytes are copied in before the step's forward, see :meth:`take_pending_loads`)."""
        for g, table in enumerate(tables):
            for i, entry in enumerate(table):
                if isinstance(entry, TierBlock):
                    (block_id,) = self.pool.allocate(1)
                    self.pool.register(block_id, seq.block_hashes[i], g)
                    self._pending_loads[block_id] = entry
                    table[i] = block_id

    def take_pending_loads(self) -> list[tuple[int, TierBlock]]:
        """(block, tier bytes) copies the runner must perform before this step's forward."""
        loads = list(self._pending_loads.items())
        self._pending_loads.clear()
        return loads

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block copies the runner must perform before this step's forward."""
        copies = [(src, dst) for dst, src in self._pending_copies.items()]
        self._pending_copies.clear()
        return copies

    # --- release and sharing --------------------------------------------------------------

    def free(self, seq: CachedSequence) -> None:
        """Return every block of the sequence; tail blocks first so they are evicted first."""
        for table in seq.block_tables:
            held = [b for b in table if b != NULL_BLOCK]
            for block_id in held:
                self._pending_copies.pop(block_id, None)
                if self._pending_loads.pop(block_id, None) is not None:
                    self.pool.unregister(block_id)  # its bytes never arrived
            self.pool.release(reversed(held))
            table.clear()

    def fork(self, parent: CachedSequence, child: CachedSequence) -> None:
        """Let ``child`` share all of ``parent``'s blocks; a shared partial block is copied on write."""
        if any(child.block_tables):
            raise RuntimeError(f"Request {child.request_id} already holds blocks; cannot fork into it.")
        for parent_table, child_table in zip(self.tables(parent), self.tables(child)):
            self.pool.take(b for b in parent_table if b != NULL_BLOCK)
            child_table.extend(parent_table)
        # only the hashes of blocks the parent has computed: a hash past them (a prompt's are all made
        # when it is looked up) may name a token the child does not share, and would be registered
        # for the child's block (found by tests/test_eviction_machine.py: a fork of a request whose
        # last prompt token was still to compute)
        child.block_hashes[:] = parent.block_hashes[:parent.num_computed_tokens // self.block_size]
        child.num_computed_tokens = parent.num_computed_tokens
        state = _policy(parent)
        if state is not None:
            child.kv_state = state.copy()

    def rollback(self, seq: CachedSequence, num_tokens: int, verified_from: int) -> None:
        """After verifying drafts: keep KV for the first ``num_tokens`` tokens (all verified now),
        free whole blocks past them, and make the blocks that filled with verified tokens since
        position ``verified_from`` (this step's first draft) findable by prefix hash.

            written this step:  [ ... t | d1 d2 d3 d4 ]     verified: d1 d2 (and t)
            kept:               [ ... t   d1 d2 ]           d3 d4's slots are past the end
        """
        self.truncate(seq, num_tokens)
        self._register_full_blocks(seq, num_tokens, first_token=verified_from)

    def truncate(self, seq: CachedSequence, num_tokens: int) -> None:
        """Keep KV for the first ``num_tokens`` tokens only (rollback); frees whole blocks past them.

        Dropped whole blocks keep their prefix hashes (their contents still match them). A kept
        block that becomes partial keeps its hash until it is written again (see allocate_slots).
        """
        if self._released_before(seq, num_tokens):
            raise RuntimeError(f"Cannot roll {seq.request_id} back to {num_tokens} tokens: its window "
                               "already released blocks a query there would see.")
        keep = self.blocks_for(num_tokens)
        for table in seq.block_tables:
            self.pool.release(reversed([b for b in table[keep:] if b != NULL_BLOCK]))
            del table[keep:]
        del seq.block_hashes[num_tokens // self.block_size:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

    def _released_before(self, seq: CachedSequence, num_tokens: int) -> bool:
        """Has a sliding window released a block that a query right after ``num_tokens`` would see?"""
        keep = self.blocks_for(num_tokens)
        return any(NULL_BLOCK in table[self.first_live_block(g, num_tokens):keep]
                   for g, table in enumerate(seq.block_tables))

    def adopt(self, source: CachedSequence, seq: CachedSequence, num_tokens: int) -> bool:
        """Let ``seq`` (holding nothing yet) share ``source``'s KV of the first ``num_tokens`` tokens,
        which both sequences hold alike (a chat's next turn continuing the last); the partial last
        block is shared and copied on write. False, and no change, when ``source``'s window has
        already released blocks a query there would see, or its policy evicted tokens."""
        if self._released_before(source, num_tokens) or self.kv_offsets(source):
            return False
        own = _policy(seq)  # the new request's own policy (fork would copy the source's)
        self.fork(source, seq)
        self.truncate(seq, num_tokens)
        if own is not None or _policy(source) is not None:
            seq.kv_state = own  # it counts the adopted tokens as live when it next looks
        return True
