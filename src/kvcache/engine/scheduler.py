"""Continuous batching: waiting and running queues, a token budget per step, chunked prefill, preemption.

Tokens are scheduled, not phases: each step lets every running request's ``num_computed_tokens``
catch up with its ``num_tokens`` as far as the budget allows. A decode is a request one token behind;
a chunked prefill is one many tokens behind; a prefix hit starts a request part-way.

Running requests keep their order of admission. When blocks run out, the most recently admitted
request is preempted (recompute: its blocks are freed and it starts over, usually finding its own
prefix in the cache; swap: its blocks are copied to host memory first). No new request is admitted
in a step that preempted.

Speculative drafts ride along with a decode: a request one token behind with drafts computes
that token and its drafts in one query (k + 1 tokens), as far as the budget, its max_tokens and
the context allow. Drafts never preempt anyone: if their blocks do not fit, the request decodes
plainly. After verification the engine calls :meth:`Scheduler.end_verification`, which rolls the
cache back past the last kept token.

A request under an eviction policy drops what its policy says at the start of each step, before
anything is allocated or preempted (see ``KVCacheManager.evict``), so the blocks it gives back serve
this very step; its plan carries how far its slots lag its positions and which attention weights
the policy wants back.
"""

from __future__ import annotations

from collections import deque

from kvcache.cache.kv_manager import KVCacheManager
from kvcache.config import SchedulerConfig
from kvcache.engine.request import Request, RequestStatus
from kvcache.runtime.plan import ScheduledSequence, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._scheduled: list[tuple[Request, int, int]] = []  # (request, tokens, of which drafts)

    # --- admission --------------------------------------------------------------------------

    def check_fits(self, request: Request, num_samples: int = 1) -> None:
        """Reject a request that could not run even alone in an empty pool (no livelock): its
        ``num_samples`` samples share the prompt's full blocks and need their own for the rest."""
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"The prompt has {request.num_prompt_tokens} tokens; this model's context is "
                             f"{self.max_model_len} tokens, which must also hold at least one new token.")
        worst = min(request.max_total_tokens, self.max_model_len)
        budget = request.kv_state.budget if request.kv_state is not None else None
        need = self.kv.worst_case_blocks(request.num_prompt_tokens, worst, num_samples, self.config.prefill_chunk,
                                         budget)
        have = self.kv.pool.num_blocks
        if need > have:
            samples = f"{num_samples} samples of " if num_samples > 1 else ""
            raise ValueError(f"This request needs up to {need} KV blocks ({samples}{worst} tokens) but the whole "
                             f"cache has {have}; shorten it, ask for fewer tokens or samples, or give the "
                             "engine more KV memory.")

    def add(self, request: Request) -> None:
        self.check_fits(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Admit a request that already holds blocks (a forked sample)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int, int]] = []
        swap_out: list[tuple[str, tuple[int, ...]]] = []
        swap_in: list[tuple[str, tuple[int, ...]]] = []
        preempted: list[str] = []
        for request in self.running:
            if request.kv_state is not None:
                self.kv.evict(request)

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._chunk(request, request.num_computed_tokens, budget)
            num_spec = self._num_spec(request, budget)
            # drafts never preempt anyone: with fewer free blocks than requests left to run, or
            # none for the drafts, the request decodes plainly
            if num_spec and (self.kv.pool.num_free <= len(self.running) - i or not self.kv.allocate_slots(
                    request, num_new + num_spec, num_provisional=num_spec)):
                num_spec = 0
            while not num_spec and not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim, swap_out)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new + num_spec, num_spec))
                budget -= num_new + num_spec
                i += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = self._admit(request, budget, swap_in)
            if num_new is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new, 0))
            budget -= num_new

        for request, _, _ in scheduled:
            request.peak_blocks = max(request.peak_blocks, self.kv.num_blocks_held(request))
        self._scheduled = scheduled
        return SchedulerOutput(
            sequences=tuple(self._plan(r, n, s) for r, n, s in scheduled),
            slot_moves=tuple(self.kv.take_pending_moves()),
            block_copies=tuple(self.kv.take_pending_copies()),
            swap_out=tuple(swap_out),
            swap_in=tuple(swap_in),
            preempted=tuple(preempted),
            evicted=tuple(self.kv.pool.take_evicted()),
            tier_loads=tuple(self.kv.take_pending_loads()),
        )

    def _chunk(self, request: Request, computed: int, budget: int) -> int:
        return min(request.num_tokens - computed, budget, self.config.prefill_chunk)

    def _num_spec(self, request: Request, budget: int) -> int:
        """How many of the request's drafts to verify this step: only at a plain decode, inside the
        budget, and never so many that the kept tokens could pass max_tokens or the context."""
        if not request.spec_token_ids or request.num_computed_tokens != request.num_tokens - 1:
            return 0
        room = min(request.max_total_tokens, self.max_model_len) - request.num_tokens - 1
        return max(0, min(len(request.spec_token_ids), room, budget - 1))

    def _admit(self, request: Request, budget: int, swap_in: list) -> int | None:
        """Give a waiting request its blocks; the number of tokens it computes now, or None."""
        if request.status is RequestStatus.SWAPPED:
            num_new = self._chunk(request, request.num_computed_tokens, budget)
            restored = self.kv.restore(request, num_new)
            if restored is None:
                return None
            swap_in.append((request.request_id, restored))
            return num_new
        hit = self.kv.find_cached_prefix(request)
        num_new = self._chunk(request, hit.num_blocks * self.kv.block_size, budget)
        if not self.kv.allocate_slots(request, num_new, hit):
            return None
        self.kv.count_prefix_lookup(request, hit)
        if request.num_preemptions == 0:
            request.num_cached_prompt_tokens = hit.num_blocks * self.kv.block_size
        return num_new

    def _plan(self, request: Request, num_new: int, num_spec: int) -> ScheduledSequence:
        start = request.num_computed_tokens
        tokens = request.all_token_ids[start:start + num_new - num_spec] + request.spec_token_ids[:num_spec]
        return ScheduledSequence(
            request_id=request.request_id,
            token_ids=tuple(tokens),
            start_position=start,
            block_tables=tuple(tuple(table) for table in request.block_tables),
            sample=start + num_new - num_spec == request.num_tokens,
            num_spec_tokens=num_spec,
            kv_offsets=self.kv.kv_offsets(request) if request.kv_state is not None else (),
            score_rows=self.kv.score_rows(request, num_new) if request.kv_state is not None else (),
            prompt=start < request.num_prompt_tokens or num_new - num_spec > 1,
        )

    def _preempt(self, request: Request, swap_out: list) -> None:
        request.spec_token_ids = []
        if self.config.preemption_mode == "swap" and request.num_computed_tokens > 0:
            swap_out.append((request.request_id, self.kv.blocks_to_save(request)))
            self.kv.free(request)
            request.status = RequestStatus.SWAPPED
        else:
            self.kv.free(request)
            self.kv.reset_policy(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def step_done(self) -> list[Request]:
        """Advance ``num_computed_tokens`` of everything scheduled (drafts included); return those
        due a sample (a verifying request's drafts are the first rows - 1 of its spec_token_ids)."""
        due = []
        for request, num_new, num_spec in self._scheduled:
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens + num_spec:
                due.append(request)
        self._scheduled = []
        return due

    def end_verification(self, request: Request, num_spec: int) -> None:
        """After a step that verified ``num_spec`` drafts appended the tokens it kept: the cache
        keeps KV for every token but the last (the next step's input) and drops the rest.

            before:  computed = p + 1 + num_spec      tokens = p + 1 + kept
            after:   computed = tokens - 1            (kept <= accepted drafts + 1)
        """
        request.spec_token_ids = []
        if request.is_finished:
            return  # its blocks are already back
        verified_from = request.num_computed_tokens - num_spec
        if request.num_tokens - 1 > request.num_computed_tokens:
            raise RuntimeError(f"Request {request.request_id} kept more tokens than it verified.")
        self.kv.rollback(request, request.num_tokens - 1, verified_from)

    def forget_step(self) -> None:
        """Drop the step in flight (its execution failed): nothing it scheduled advances."""
        self._scheduled = []

    # --- endings ----------------------------------------------------------------------------

    def finish(self, request: Request, reason: str, keep_blocks: bool = False) -> None:
        """Stop a request (finished or aborted) and return its blocks at once, unless the caller
        keeps them (it then frees them through the kv manager itself)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if not keep_blocks:
            self.kv.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
