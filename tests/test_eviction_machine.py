"""The pool, kv manager and scheduler with eviction policies, without a model (hypothesis).

Random add / step / fork / abort on a small pool, requests under streaming, h2o or snapkv with
small budgets (and some under none). ``slots`` plays the runner: it performs each step's slot moves
(all reads first), block copies and swaps, writes every computed token's (position, token) into the
slot its plan gives, and then reads back what each sequence's attention would read. So the machine
checks, at every step:

* free + used == total, reference counts match the tables, ended requests hold nothing;
* no evicted slot is read and no live slot is lost: the slots a sequence attends to hold exactly
  its live tokens (each once, at its position, with its token), plus this step's;
* every block the prefix cache offers still holds the tokens its hash names, in position order.
"""

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import NULL_BLOCK, KVCacheManager
from kvcache.cache.policies import KVPolicy, PolicyState
from kvcache.config import SamplingParams, SchedulerConfig
from kvcache.engine.request import Request, RequestStatus
from kvcache.engine.scheduler import Scheduler

POLICIES = ["streaming", "h2o", "snapkv", None]


def real_blocks(r: Request) -> list[int]:
    return [b for table in r.block_tables for b in table if b != NULL_BLOCK]


class EvictingSchedulerMachine(RuleBasedStateMachine):
    windows: tuple = (None,)
    mode = "recompute"

    def __init__(self):
        super().__init__()
        self.bs = 4
        self.num_blocks = 14 * len(self.windows)
        self.pool = BlockPool(self.num_blocks)
        self.kv = KVCacheManager(self.pool, self.bs, self.windows)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                               long_prefill_token_threshold=6, preemption_mode=self.mode),
                               self.kv, max_model_len=64)
        self.slots: dict[int, tuple[int, int]] = {}  # slot -> (position, token) written there
        self.host: dict[str, list[dict[int, tuple[int, int]]]] = {}  # swapped-out block contents
        self.ended: list[Request] = []
        self.tokens_of_hash: dict[bytes, list[int]] = {}
        self.n = 0

    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=24), max_tokens=st.integers(1, 16),
          policy=st.sampled_from(POLICIES), budget=st.integers(3, 12))
    def add(self, prompt, max_tokens, policy, budget):
        r = Request(f"r{self.n}", prompt, SamplingParams(max_tokens=max_tokens))
        self.n += 1
        if policy is not None and budget < len(prompt) + max_tokens:
            governed = tuple(g for g, w in enumerate(self.windows) if w is None)
            r.kv_state = PolicyState(KVPolicy(policy, budget, sinks=1, window=3, kernel=3), budget, governed)
        try:
            self.sched.add(r)
        except ValueError:
            assert self.kv.worst_case_blocks(len(prompt), len(prompt) + max_tokens, 1, self.sched.config.prefill_chunk,
                                             r.kv_state.budget if r.kv_state else None) > self.num_blocks

    def _forkable(self) -> list[Request]:
        return [r for r in self.sched.running if 0 < r.num_computed_tokens == r.num_tokens - 1]

    @precondition(lambda self: self._forkable())
    @rule(i=st.integers(0, 50), token=st.integers(0, 3))
    def fork(self, i, token):
        """A sample forks off a request that just sampled, as n > 1 does: it shares every computed
        token's KV (and the policy's state) and samples its own next token."""
        parent = self._forkable()[i % len(self._forkable())]
        child = Request(f"r{self.n}", parent.prompt_token_ids, parent.params)
        self.n += 1
        child.all_token_ids = parent.all_token_ids[:-1] + [token]
        self.kv.fork(parent, child)
        self.sched.add_running(child)

    def _slot(self, s, g: int, index: int) -> int:
        table = s.block_tables[g]
        return table[index // self.bs] * self.bs + index % self.bs

    def _run(self, plan) -> None:
        """What the runner does with a plan, on ``slots``, checking every read."""
        if plan.slot_moves:
            read = [self.slots.get(src) for src, _ in plan.slot_moves]  # all reads before any write
            for (_, dst), value in zip(plan.slot_moves, read):
                self.slots[dst] = value
        for rid, blocks in plan.swap_out:
            self.host[rid] = [{o: self.slots.get(b * self.bs + o) for o in range(self.bs)} for b in blocks]
        for src, dst in plan.block_copies:
            for o in range(self.bs):
                self.slots[dst * self.bs + o] = self.slots.get(src * self.bs + o)
        for rid, blocks in plan.swap_in:
            for b, saved in zip(blocks, self.host.pop(rid)):
                for o, value in saved.items():
                    self.slots[b * self.bs + o] = value
        by_id = {r.request_id: r for r in self.sched.running}
        for s in plan.sequences:
            r = by_id[s.request_id]
            for g in range(len(self.windows)):
                off = s.kv_offset(g)
                for pos in range(s.start_position, s.seq_len):
                    self.slots[self._slot(s, g, pos - off)] = (pos, r.all_token_ids[pos])
        for s in plan.sequences:
            self._check_reads(by_id[s.request_id], s)

    def _check_reads(self, r: Request, s) -> None:
        """The slots the step's attention reads hold the sequence's live tokens, and only those."""
        for g, window in enumerate(self.windows):
            off = s.kv_offset(g)
            state = r.kv_state
            if state is not None and g in state.groups:
                state.sync(g, r.num_computed_tokens)  # the kept tokens before this step
                live = set(state.groups[g].positions) | set(range(s.start_position, s.seq_len))
                assert len(state.groups[g].positions) + len(s.token_ids) == s.seq_len - off
            else:
                assert off == 0
                first = 0 if window is None else max(0, s.start_position - window + 1)
                live = set(range(first, s.seq_len))
            first_index = 0 if window is None else max(0, s.start_position - window + 1) - off
            read = [self.slots.get(self._slot(s, g, i)) for i in range(max(0, first_index), s.seq_len - off)]
            positions = [value[0] for value in read if value is not None]
            assert None not in read and sorted(positions) == sorted(live), (g, sorted(positions), sorted(live))
            assert all(tok == r.all_token_ids[pos] for pos, tok in read)

    @rule(token=st.integers(0, 3))
    def step(self, token):
        plan = self.sched.schedule()
        assert plan.num_tokens <= 16
        self._run(plan)
        for r in self.sched.step_done():
            r.all_token_ids.append(token)
            if len(r.output_token_ids) >= r.params.max_tokens:
                self.sched.finish(r, "length")
                self.ended.append(r)
        by_id = {r.request_id: r for r in self.sched.running}
        for s in plan.sequences:  # attention weights back to the policies, made-up but varied
            r = by_id.get(s.request_id)
            if r is not None and s.score_rows:
                weights = tuple(None if not rows else torch.tensor(
                    [float((p * 7 + r.all_token_ids[p]) % 5) for p in r.kv_state.groups[g].positions]
                    + [1.0] * (r.num_computed_tokens - r.kv_state.evicted(g) - len(r.kv_state.groups[g].positions)))
                    for g, rows in enumerate(s.score_rows))
                self.kv.observe(r, weights, s.score_rows)

    @precondition(lambda self: self.sched.running or self.sched.waiting)
    @rule(i=st.integers(0, 50))
    def abort(self, i):
        live = self.sched.running + list(self.sched.waiting)
        r = live[i % len(live)]
        self.sched.finish(r, "abort")
        self.host.pop(r.request_id, None)
        self.ended.append(r)

    @invariant()
    def free_plus_used_is_total_and_counts_match_tables(self):
        assert self.pool.num_free + self.pool.num_used == self.pool.num_blocks
        held: dict[int, int] = {}
        for r in self.sched.running:
            for b in real_blocks(r):
                held[b] = held.get(b, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_count == held.get(block.block_id, 0)

    @invariant()
    def ended_and_waiting_hold_nothing(self):
        for r in self.ended + list(self.sched.waiting):
            assert real_blocks(r) == []
        for r in self.ended:
            assert r.status is RequestStatus.FINISHED

    @invariant()
    def tables_cover_the_live_tokens(self):
        for r in self.sched.running:
            for g, table in enumerate(r.block_tables):
                stored = r.num_computed_tokens - self.kv.num_evicted(r, g)
                assert len(table) == -(-stored // self.bs)

    @invariant()
    def every_registered_hash_matches_what_its_block_holds(self):
        for r in self.sched.running + self.ended + list(self.sched.waiting):
            for i, block_hash in enumerate(r.block_hashes):
                self.tokens_of_hash[block_hash] = (i, r.all_token_ids[i * self.bs:(i + 1) * self.bs])
        for block in self.pool.blocks:
            if block.block_hash is not None:
                index, tokens = self.tokens_of_hash[block.block_hash]
                held = [self.slots.get(block.block_id * self.bs + o) for o in range(self.bs)]
                assert held == [(index * self.bs + o, t) for o, t in enumerate(tokens)], block.block_id


class EvictingSwapMachine(EvictingSchedulerMachine):
    mode = "swap"


class EvictingWindowedMachine(EvictingSchedulerMachine):
    """A hybrid model: the policy governs the full group; the 5-token sliding groups need none."""

    windows = (5, None, 5)


TestEvictingScheduler = EvictingSchedulerMachine.TestCase
TestEvictingScheduler.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestEvictingSwap = EvictingSwapMachine.TestCase
TestEvictingSwap.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestEvictingWindowed = EvictingWindowedMachine.TestCase
TestEvictingWindowed.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


def test_a_fork_shares_only_the_hashes_of_blocks_its_parent_computed():
    """Found by TestEvictingSwap: a request whose last prompt token was still to compute already had
    the hash of that token's block (a prompt's hashes are all made when it is looked up); a fork of it
    with another last token copied that hash and registered its own block under it, so the prefix
    cache offered the parent's block for the child's tokens."""
    machine = EvictingSwapMachine()
    machine.add(budget=3, max_tokens=2, policy="streaming", prompt=[0] * 7)
    machine.add(budget=3, max_tokens=3, policy="streaming", prompt=[0, 0, 0, 0])
    machine.add(budget=3, max_tokens=3, policy="streaming", prompt=[0, 0, 0, 1, 0])
    machine.add(budget=7, max_tokens=1, policy="streaming", prompt=[0, 0, 1, 0, 0, 0, 0, 0])
    machine.step(token=0)
    machine.step(token=0)
    machine.fork(i=0, token=0)
    machine.fork(i=0, token=0)
    machine.fork(i=21, token=1)
    machine.step(token=0)
    machine.every_registered_hash_matches_what_its_block_holds()
