"""Block pool and kv manager invariants: unit tests and a hypothesis state machine."""

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import NULL_BLOCK, KVCacheManager
from kvcache.engine.request import Request
from kvcache.config import SamplingParams


def _req(rid, tokens, salt=None):
    return Request(rid, list(tokens), SamplingParams(max_tokens=8, cache_salt=salt))


def test_release_below_zero_raises():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(RuntimeError):
        pool.release([b])


def test_prefix_hit_shares_blocks_and_lru_eviction():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, 4)
    a = _req("a", range(10))
    assert kv.allocate_slots(a, 10)
    a_blocks = list(a.block_ids)
    kv.free(a)  # full blocks keep their hashes while free
    b = _req("b", list(range(10)) + [99])
    hit = kv.find_cached_prefix(b)
    assert hit.num_blocks == 2 and hit.tables == (tuple(a_blocks[:2]),)
    assert kv.allocate_slots(b, 11 - 8, hit)
    assert b.num_computed_tokens == 8 and b.block_ids[:2] == a_blocks[:2]
    # another tenant never sees them
    c = _req("c", list(range(10)) + [99], salt="tenant-2")
    assert kv.find_cached_prefix(c).num_blocks == 0


def test_fork_shares_and_copies_the_partial_block_on_write():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, 4)
    parent = _req("p", range(6))
    assert kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = _req("c", range(6))
    kv.fork(parent, child)
    assert all(pool.ref_count(b) == 2 for b in parent.block_ids)
    child.all_token_ids.append(7)
    assert kv.allocate_slots(child, 1)  # writes slot 6, inside the shared partial block
    assert child.block_ids[0] == parent.block_ids[0] and child.block_ids[1] != parent.block_ids[1]
    assert kv.take_pending_copies() == [(parent.block_ids[1], child.block_ids[1])]
    assert pool.ref_count(parent.block_ids[1]) == 1


def test_adopt_shares_a_common_prefix_and_refuses_what_a_window_released():
    pool = BlockPool(16)
    kv = KVCacheManager(pool, 4, (None, 6))  # a full group and a 6-token sliding group
    a = _req("a", range(15))
    assert kv.allocate_slots(a, 14)
    a.num_computed_tokens = 14
    assert kv.allocate_slots(a, 1)  # the step at position 14 releases the sliding blocks 0 and 1
    a.num_computed_tokens = 15
    assert a.block_tables[1][:2] == [NULL_BLOCK, NULL_BLOCK]
    b = _req("b", list(range(10)) + [7, 7])
    assert not kv.adopt(a, b, 10) and not any(b.block_tables)  # position 10 would see block 1
    c = _req("c", list(range(15)) + [5])
    assert kv.adopt(a, c, 15) and c.num_computed_tokens == 15 and c.block_tables == a.block_tables
    assert kv.allocate_slots(c, 1)  # the shared partial block is copied, in both groups
    assert sorted(src for src, _ in kv.take_pending_copies()) == sorted(t[3] for t in a.block_tables)
    kv.free(a)
    kv.free(c)
    assert pool.num_used == 0


class PoolMachine(RuleBasedStateMachine):
    """Random add / step / abort / fork / finish / rollback sequences on a small pool.

    ``contents`` plays the runner: it copies blocks as the kv manager asks and writes each computed
    token into the slot its table gives, so the machine can check that every hash the pool offers
    still describes the tokens its block holds."""

    windows: tuple = (None,)

    def __init__(self):
        super().__init__()
        self.block_size = 4
        self.pool = BlockPool(24)
        self.kv = KVCacheManager(self.pool, self.block_size, self.windows)
        self.live: list[Request] = []
        self.step_start: dict[str, int] = {}  # request -> first position its last allocation computed
        self.n = 0
        self.contents: dict[int, list[int | None]] = {b: [None] * self.block_size for b in range(24)}
        self.tokens_of_hash: dict = {}

    def _write(self, r: Request, start: int, end: int) -> None:
        """Run the step's block copies, then write tokens [start, end) of ``r`` into its slots."""
        for src, dst in self.kv.take_pending_copies():
            self.contents[dst] = list(self.contents[src])
        for table in r.block_tables:
            for pos in range(start, end):
                self.contents[table[pos // self.block_size]][pos % self.block_size] = r.all_token_ids[pos]
        self.step_start[r.request_id] = start

    @rule(prompt=st.lists(st.integers(0, 5), min_size=1, max_size=30), salt=st.sampled_from([None, "x"]))
    def add(self, prompt, salt):
        r = _req(f"r{self.n}", prompt, salt)
        self.n += 1
        hit = self.kv.find_cached_prefix(r)
        if self.kv.allocate_slots(r, len(prompt) - hit.num_blocks * self.block_size, hit):
            self._write(r, hit.num_blocks * self.block_size, len(prompt))
            r.num_computed_tokens = len(prompt)
            self.live.append(r)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), token=st.integers(0, 5))
    def step(self, i, token):
        r = self.live[i % len(self.live)]
        r.all_token_ids.append(token)
        if self.kv.allocate_slots(r, 1):
            self._write(r, r.num_computed_tokens, r.num_computed_tokens + 1)
            r.num_computed_tokens += 1
        else:
            r.all_token_ids.pop()
            self.kv.take_pending_copies()

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        parent = self.live[i % len(self.live)]
        child = _req(f"r{self.n}", parent.all_token_ids)
        self.n += 1
        self.kv.fork(parent, child)
        self.step_start[child.request_id] = self.step_start[parent.request_id]
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish_or_abort(self, i):
        self.kv.free(self.live.pop(i % len(self.live)))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), keep=st.integers(1, 40))
    def rollback(self, i, keep):
        r = self.live[i % len(self.live)]
        keep = min(keep, r.num_computed_tokens)
        before = [list(t) for t in r.block_tables]
        try:
            self.kv.truncate(r, keep)
        except RuntimeError:  # a window already released blocks a query at `keep` would see
            assert any(NULL_BLOCK in t[self.kv.first_live_block(g, keep):-(-keep // self.block_size)]
                       for g, t in enumerate(before))
            assert r.block_tables == before
            return
        del r.all_token_ids[keep:]
        self.step_start[r.request_id] = min(self.step_start[r.request_id], keep)

    @invariant()
    def every_registered_hash_matches_the_tokens_its_block_holds(self):
        bs = self.block_size
        for r in self.live:
            for i, block_hash in enumerate(r.block_hashes):
                self.tokens_of_hash[block_hash] = r.all_token_ids[i * bs:(i + 1) * bs]
        for block in self.pool.blocks:
            if block.block_hash is not None:
                assert self.contents[block.block_id] == self.tokens_of_hash[block.block_hash], block.block_id

    @invariant()
    def free_plus_used_is_total(self):
        assert self.pool.num_free + self.pool.num_used == self.pool.num_blocks

    @invariant()
    def reference_counts_match_tables(self):
        held: dict[int, int] = {}
        for r in self.live:
            for b in (b for table in r.block_tables for b in table if b != NULL_BLOCK):
                held[b] = held.get(b, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_count == held.get(block.block_id, 0) >= 0
        assert self.pool.num_used == len(held)

    @invariant()
    def tables_are_exactly_as_long_as_tokens_need(self):
        for r in self.live:
            assert [len(t) for t in r.block_tables] == [-(-r.num_computed_tokens // self.block_size)] * len(self.windows)

    @invariant()
    def placeholders_exactly_where_windows_released_blocks(self):
        """Before the last step's first position's window: placeholders; from it on: real blocks
        (so no query ever reads a released block)."""
        for r in self.live:
            for g, table in enumerate(r.block_tables):
                first = self.kv.first_live_block(g, self.step_start[r.request_id])
                assert all((b == NULL_BLOCK) == (i < first) for i, b in enumerate(table)), (g, table)


class WindowedPoolMachine(PoolMachine):
    """The same machine on a hybrid model: one full-attention group and two 6-token sliding ones."""

    windows = (6, None, 6)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestWindowedPoolMachine = WindowedPoolMachine.TestCase
TestWindowedPoolMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
