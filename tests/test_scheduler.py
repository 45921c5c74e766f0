"""Scheduler planning without a model: random add / step / abort on a tiny pool (hypothesis)."""

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import NULL_BLOCK, KVCacheManager
from kvcache.config import SamplingParams, SchedulerConfig
from kvcache.engine.request import Request, RequestStatus
from kvcache.engine.scheduler import Scheduler


def real_blocks(r: Request) -> list[int]:
    return [b for table in r.block_tables for b in table if b != NULL_BLOCK]


class SchedulerMachine(RuleBasedStateMachine):
    windows: tuple = (None,)

    def __init__(self):
        super().__init__()
        self.bs = 4
        self.pool = BlockPool(12 * len(self.windows))
        self.kv = KVCacheManager(self.pool, self.bs, self.windows)
        self.mode = "recompute"
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                               long_prefill_token_threshold=6), self.kv, max_model_len=64)
        self.ended: list[Request] = []
        self.n = 0
        self.swapped_out: set[str] = set()

    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=20), max_tokens=st.integers(1, 12))
    def add(self, prompt, max_tokens):
        r = Request(f"r{self.n}", prompt, SamplingParams(max_tokens=max_tokens))
        self.n += 1
        try:
            self.sched.add(r)
        except ValueError:
            assert self.kv.worst_case_blocks(len(prompt), len(prompt) + max_tokens, 1,
                                             self.sched.config.prefill_chunk) > self.pool.num_blocks

    @rule(token=st.integers(0, 3))
    def step(self, token):
        plan = self.sched.schedule()
        assert plan.num_tokens <= 16
        for s in plan.sequences:
            for g, table in enumerate(s.block_tables):
                assert len(table) == -(-s.seq_len // self.bs)
                # every block a query of this step can see is there
                assert NULL_BLOCK not in table[self.kv.first_live_block(g, s.start_position):]
        for rid, _ in plan.swap_out:
            self.swapped_out.add(rid)
        for rid, _ in plan.swap_in:
            self.swapped_out.remove(rid)
        for r in self.sched.step_done():
            r.all_token_ids.append(token)
            if len(r.output_token_ids) >= r.params.max_tokens:
                self.sched.finish(r, "length")
                self.ended.append(r)

    @precondition(lambda self: self.sched.running or self.sched.waiting)
    @rule(i=st.integers(0, 50))
    def abort(self, i):
        live = self.sched.running + list(self.sched.waiting)
        r = live[i % len(live)]
        self.sched.finish(r, "abort")
        self.swapped_out.discard(r.request_id)
        self.ended.append(r)

    @invariant()
    def pool_accounting(self):
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
    def running_tables_cover_their_tokens(self):
        for r in self.sched.running:
            assert [len(t) for t in r.block_tables] == [-(-r.num_computed_tokens // self.bs)] * len(self.windows)


class SwapSchedulerMachine(SchedulerMachine):
    def __init__(self):
        super().__init__()
        self.sched.config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                            long_prefill_token_threshold=6, preemption_mode="swap")


class WindowedSchedulerMachine(SchedulerMachine):
    """A hybrid model: two 5-token sliding groups around a full one, sharing the pool."""

    windows = (5, None, 5)


class WindowedSwapSchedulerMachine(WindowedSchedulerMachine, SwapSchedulerMachine):
    pass


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
TestSwapScheduler = SwapSchedulerMachine.TestCase
TestSwapScheduler.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
TestWindowedScheduler = WindowedSchedulerMachine.TestCase
TestWindowedScheduler.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
TestWindowedSwapScheduler = WindowedSwapSchedulerMachine.TestCase
TestWindowedSwapScheduler.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
