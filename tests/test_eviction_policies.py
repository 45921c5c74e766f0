"""Eviction policies without a model: budgets, what each policy keeps, and the kv manager's compaction."""

import math

import pytest
import torch

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import KVCacheManager
from kvcache.cache.policies import KVPolicy, PolicyState
from kvcache.config import SamplingParams
from kvcache.engine.request import Request


@pytest.mark.parametrize("name,budget,message", [
    ("lru", 0.2, "Unknown kv_policy 'lru'"),
    ("h2o", None, "needs a kv_budget"),
    ("h2o", 0, "kv_budget must be"),
    ("h2o", -5, "kv_budget must be"),
    ("h2o", 1.5, "kv_budget must be"),
    ("h2o", float("nan"), "kv_budget must be"),
    ("h2o", True, "kv_budget must be"),
    ("h2o", "512", "kv_budget must be"),
])
def test_bad_policies_and_budgets_are_value_errors(name, budget, message):
    with pytest.raises(ValueError, match=message):
        KVPolicy(name, budget)


def test_sampling_params_check_policy_and_budget():
    with pytest.raises(ValueError, match="^kv_policy must be one of full, streaming, h2o, snapkv"):
        SamplingParams(kv_policy="H2O")
    with pytest.raises(ValueError, match="^kv_budget must be"):
        SamplingParams(kv_policy="h2o", kv_budget=0.0)
    assert SamplingParams(kv_policy="snapkv", kv_budget=0.25).kv_budget == 0.25


def test_budget_in_tokens_and_fractions():
    assert KVPolicy("streaming", 100).tokens_for(1000) == 100
    assert KVPolicy("streaming", 0.2).tokens_for(4096) == math.ceil(0.2 * 4096) == 820
    assert KVPolicy("streaming", 1.0).tokens_for(50) is None  # holds everything: runs as full
    assert KVPolicy("h2o", 64).tokens_for(64) is None
    assert KVPolicy("full").tokens_for(10 ** 6) is None
    with pytest.raises(ValueError, match="more than the 4 attention sinks"):
        KVPolicy("h2o", 4).tokens_for(100)


def _state(name, budget, n, **kw):
    state = PolicyState(KVPolicy(name, budget, **kw), budget, (0,))
    state.sync(0, n)
    return state


def test_streaming_keeps_sinks_and_the_most_recent():
    state = _state("streaming", 6, 10, sinks=2)
    assert state.to_drop(0) == [2, 3, 4, 5]  # keeps 0 1 and 6 7 8 9


def test_h2o_keeps_sinks_recent_and_the_heaviest_in_between():
    state = _state("h2o", 6, 12, sinks=1, recent=0.5)  # 1 sink, 3 recent, 2 heavy hitters
    weights = torch.zeros(12)
    weights[[4, 7]] = torch.tensor([5.0, 3.0])
    weights[2] = 1.0
    state.observe(0, weights, 4)
    state.observe(0, weights, 4)  # accumulated: the ranking is by the sum
    drop = state.to_drop(0)
    assert sorted(set(range(12)) - set(drop)) == [0, 4, 7, 9, 10, 11]


def test_snapkv_compresses_by_the_window_then_slides_a_recent_window():
    state = _state("snapkv", 8, 20, sinks=1, window=3, kernel=1)
    obs = torch.zeros(20)
    obs[[5, 9, 12, 14]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    state.observe(0, obs, 3)
    drop = state.to_drop(0)
    kept = sorted(set(range(20)) - set(drop))
    assert kept == [0, 5, 9, 12, 14, 17, 18, 19]  # sink, top 4 of those before the window, the window
    live = state.groups[0]
    assert live.pinned == {5, 9, 12, 14}
    # as if the kv manager had compacted (the kept slots in order), then two tokens were decoded
    live.positions, live.evicted = kept, 12
    live.scores = torch.zeros(8, dtype=torch.float64)
    state.sync(0, 22)
    drop = state.to_drop(0)  # no fresh observation: pinned + sink stay, the oldest others go
    assert sorted(live.positions[i] for i in drop) == [17, 18]


def _seq(rid, n, policy=None, budget=None):
    r = Request(rid, list(range(n)), SamplingParams(max_tokens=64))
    if policy:
        r.kv_state = PolicyState(KVPolicy(policy, budget, sinks=1), budget, (0,))
    return r


def test_compaction_fills_holes_from_the_end_and_frees_the_tail():
    pool = BlockPool(8, enable_prefix_caching=False)  # no cached prefix to keep: blocks change in place
    kv = KVCacheManager(pool, 4)
    r = _seq("a", 10, "streaming", 7)
    assert kv.allocate_slots(r, 10)
    r.num_computed_tokens = 10
    table = list(r.block_tables[0])
    assert kv.evict(r) == 3  # streaming, 1 sink: drops positions 1 2 3
    live = r.kv_state.groups[0]
    assert len(live.positions) == 7 and sorted(live.positions) == [0, 4, 5, 6, 7, 8, 9]
    assert r.block_tables[0] == table[:2] and pool.num_used == 2  # the third block went back
    moves = kv.take_pending_moves()
    slot = lambda i: table[i // 4] * 4 + i % 4  # noqa: E731
    assert sorted(moves) == sorted([(slot(7), slot(1)), (slot(8), slot(2)), (slot(9), slot(3))])
    assert kv.kv_offsets(r) == (3,) and kv.num_tokens_evicted == 3 and kv.num_blocks_evicted == 1
    assert kv.allocate_slots(r, 1)  # the next token goes to slot index 7, in the second block
    assert len(r.block_tables[0]) == 2


def test_a_shared_block_is_copied_before_its_slots_change_and_loses_no_hash():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, 4)
    donor = _seq("donor", 9)
    assert kv.allocate_slots(donor, 9)
    donor.num_computed_tokens = 9
    r = _seq("r", 12, "streaming", 6)
    hit = kv.find_cached_prefix(r)
    assert hit.num_blocks == 2
    assert kv.allocate_slots(r, 12 - 8, hit)
    r.num_computed_tokens = 12
    shared = list(r.block_tables[0][:2])
    hashed = [pool.blocks[b].block_hash for b in shared]
    kv.evict(r)  # drops positions 1..6: holes in both shared blocks
    assert all(b not in shared for b in r.block_tables[0])  # private copies
    assert [pool.blocks[b].block_hash for b in shared] == hashed  # the donor's blocks keep their hashes
    assert all(pool.ref_count(b) == 1 for b in shared)
    moves = dict((dst, src) for src, dst in kv.take_pending_moves())
    assert len(moves) == 6  # every live slot of the copied blocks is written
    assert kv.find_cached_prefix(_seq("probe", 12)).tables[0] == tuple(shared)  # the donor's, not r's


def test_evicted_blocks_are_never_found_by_prefix_hash():
    pool = BlockPool(12)
    kv = KVCacheManager(pool, 4)
    r = _seq("r", 16, "h2o", 6)
    assert kv.allocate_slots(r, 16)
    r.num_computed_tokens = 16
    table = list(r.block_tables[0])
    kv.evict(r)  # h2o with no scores yet: keeps the sink, 3 recent and 2 by (equal) score
    # both blocks changed, in private copies: the registered originals stay findable, untouched
    assert not set(r.block_tables[0]) & set(table)
    assert all(pool.blocks[b].block_hash is None for b in r.block_tables[0])
    assert all(pool.blocks[b].block_hash is not None and pool.ref_count(b) == 0 for b in table)
    assert kv.find_cached_prefix(_seq("probe", 16)).tables[0] == tuple(table[:3])
    assert kv.allocate_slots(r, 10) and r.num_computed_tokens == 16
    r.num_computed_tokens = 26
    r.all_token_ids.extend(range(16, 26))
    kv.free(r)  # what it wrote after evicting was never registered
    assert sum(b.block_hash is not None for b in pool.blocks) == 4


def test_without_a_free_block_a_cached_block_changes_in_place_and_loses_its_hash():
    pool = BlockPool(4)
    kv = KVCacheManager(pool, 4)
    r = _seq("r", 16, "streaming", 6)
    assert kv.allocate_slots(r, 16)
    r.num_computed_tokens = 16
    table = list(r.block_tables[0])
    kv.evict(r)  # drops 1..10: the two tail blocks come back and become the copies of blocks 0, 1
    assert pool.num_used == 2 and kv.find_cached_prefix(_seq("probe", 16)).tables[0] == tuple(table[:2])
    pool2 = BlockPool(2)
    kv2 = KVCacheManager(pool2, 4)
    q = _seq("q", 8, "streaming", 5)
    assert kv2.allocate_slots(q, 8)
    q.num_computed_tokens = 8
    kv2.evict(q)  # no block to copy into: block 0 changes where it is, and forgets its hash
    assert pool2.blocks[q.block_tables[0][0]].block_hash is None
    assert kv2.find_cached_prefix(_seq("probe", 8)).num_blocks == 0


def test_swap_restores_only_the_live_slots():
    pool = BlockPool(10)
    kv = KVCacheManager(pool, 4)
    r = _seq("r", 14, "streaming", 5)
    assert kv.allocate_slots(r, 14)
    r.num_computed_tokens = 14
    kv.evict(r)
    saved = kv.blocks_to_save(r)
    assert len(saved) == 2  # 5 live tokens
    kv.free(r)
    restored = kv.restore(r, 1)
    assert restored is not None and len(restored) == 2 and len(r.block_tables[0]) == 2


def test_adopting_a_kept_requests_kv_keeps_the_new_requests_own_policy():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, 4)
    kept = _seq("kept", 10, "h2o", 8)
    assert kv.allocate_slots(kept, 10)
    kept.num_computed_tokens = 10
    kept.kv_state.sync(0, 10)
    nxt = _seq("next", 12, "streaming", 6)
    own = nxt.kv_state
    assert kv.adopt(kept, nxt, 9) and nxt.num_computed_tokens == 9
    assert nxt.kv_state is own and own.groups[0].positions == []
    own.sync(0, nxt.num_computed_tokens)
    assert own.groups[0].positions == list(range(9))
    kv.evict(kept)  # the kept request evicts: nothing more may be adopted from it
    assert not kv.adopt(kept, _seq("later", 12), 9)
