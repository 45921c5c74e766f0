"""Drafts from a second, smaller model with the target's vocabulary (``speculative="draft"``).

The draft model keeps its own paged KV cache: its own storage, block pool and kv manager, sized
with the target's block count by the same planner (see :func:`kvcache.cache.spec.num_blocks_for_budget`).
It cannot share the target's pool: a block id there is a page laid out for the target's layers,
heads and head dim, and a draft model generally has other ones.

Each request has a :class:`DraftSequence` mirroring it in the draft's cache. One proposal step:

    target tokens:   [ t0 .............. t(n-1) ]
    draft KV:        [ t0 ....... tc ]                      (c < n: what it computed before)
    catch up:                        [ .. t(n-1) ] -> d1    (one forward, batched over requests)
    draft:                                         d1 -> d2, ..., d(k-1) -> dk   (k - 1 decodes)
    draft KV after:  [ t0 .............. t(n-1) d1 .. d(k-1) ]

The drafts are greedy (the draft model's argmax), so q is one-hot on each draft and the engine's
rejection rule (:func:`kvcache.engine.speculative.verify`) stays exact for sampled requests too.
At the next proposal the draft's KV is rolled back to the longest prefix it shares with the
request's tokens (the accepted drafts stay, the rejected ones go) and the rest is fed again.
A draft whose cache is full proposes nothing for that request; speculation is optional.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from kvcache.cache.block_pool import BlockHash, BlockPool
from kvcache.cache.kv_manager import KVCacheManager
from kvcache.cache.storage import KVCache
from kvcache.config import ModelConfig, SchedulerConfig
from kvcache.engine.request import Request
from kvcache.models.families import CausalLM
from kvcache.models.loader import LoadedModel, load_model
from kvcache.runtime.plan import ScheduledSequence, SchedulerOutput
from kvcache.runtime.runner import ModelRunner


def load_draft_model(path: str, target: ModelConfig) -> LoadedModel:
    """The draft model at ``path``; a ValueError if it cannot be loaded or its vocabulary size
    differs from the target's (a draft token id must mean the same token to both)."""
    try:
        loaded = load_model(path)
    except ValueError as err:
        raise ValueError(f"The draft model could not be loaded: {err}") from None
    if loaded.config.vocab_size != target.vocab_size:
        raise ValueError(f"The draft model's vocabulary has {loaded.config.vocab_size} tokens but the "
                         f"target's has {target.vocab_size}; a draft model must share the target's "
                         "vocabulary.")
    return loaded


@dataclass
class DraftSequence:
    """One request as the draft's cache sees it (a :class:`~kvcache.cache.kv_manager.CachedSequence`).

        all_token_ids: the request's tokens (committed by the target) at the last proposal
        drafted:       the drafts fed to the draft model since (provisional, never hashed)
        KV covers:     (all_token_ids + drafted)[:num_computed_tokens]
    """

    request_id: str
    cache_salt: str | None
    all_token_ids: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_tables: list[list[int]] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)

    @property
    def fed_token_ids(self) -> list[int]:
        return self.all_token_ids + self.drafted


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n, end = 0, min(len(a), len(b))
    while n < end and a[n] == b[n]:
        n += 1
    return n


class DraftModelDrafter:
    """Greedy drafts of ``k`` tokens per request from ``model``, over its own paged KV cache
    ``storage`` (with a block pool and kv manager of its own); batches and chunks its forwards
    within the scheduler's token budget and prefill chunk."""

    def __init__(self, model: CausalLM, storage: KVCache, k: int, scheduler_config: SchedulerConfig,
                 enable_prefix_caching: bool = True) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {k!r}.")
        self.model = model
        self.k = k
        self.storage = storage
        self.pool = BlockPool(storage.num_blocks, enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, storage.block_size, tuple(g.spec.window for g in storage.groups))
        self.runner = ModelRunner(model, storage)
        self.max_len = model.config.max_position_embeddings
        self.token_budget = scheduler_config.max_num_batched_tokens
        self.chunk = scheduler_config.prefill_chunk
        self.sequences: dict[str, DraftSequence] = {}

    # --- the drafter interface the engine calls ----------------------------------------------

    def propose_all(self, requests: Sequence[Request]) -> list[list[int]]:
        """Up to ``k`` greedy drafts to follow each request's tokens, in order (empty for a request
        the draft's cache or context cannot hold now). The draft's KV ends covering each request's
        tokens and its drafts but the last."""
        seqs = [self._sync(r) for r in requests]
        live = [s for s in seqs if s is not None]
        last = self._catch_up(live)  # request id -> the draft model's argmax after its tokens
        for seq in live:
            if seq.request_id in last:
                seq.drafted = [last[seq.request_id]]
        for _ in range(self.k - 1):
            growing = [s for s in live if s.drafted and self._can_feed_draft(s)]
            if not growing:
                break
            nxt = self._forward([(s, s.drafted[-1:]) for s in growing])
            for seq in growing:
                seq.drafted.append(nxt[seq.request_id])
        return [[] if s is None else list(s.drafted) for s in seqs]

    def observe(self, request_id: str, drafted: int, accepted: int) -> None:
        """Nothing to learn: the next proposal rolls the draft's cache back to what was kept."""

    def free_cache(self, request_id: str) -> None:
        """Give back the request's draft blocks (it was preempted); it starts over when it drafts again."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.kv.free(seq)

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted: its draft blocks go back to the draft's pool."""
        self.free_cache(request_id)

    # --- keeping the draft's cache in step with the request ----------------------------------

    def _sync(self, request: Request) -> DraftSequence | None:
        """The request's draft sequence with its KV rolled back to the longest prefix it shares with
        the request's tokens, leaving at least the last token to feed; None if it cannot draft now."""
        tokens = request.all_token_ids
        if len(tokens) + self.k > self.max_len:
            self.free_cache(request.request_id)
            return None
        seq = self.sequences.get(request.request_id)
        if seq is None:
            seq = self.sequences[request.request_id] = DraftSequence(request.request_id, request.cache_salt)
        keep = min(common_prefix(seq.fed_token_ids[:seq.num_computed_tokens], tokens), len(tokens) - 1)
        if keep < seq.num_computed_tokens:
            try:
                self.kv.truncate(seq, keep)
            except RuntimeError:  # a sliding window already released what the rollback needs
                self._restart(seq)
        seq.all_token_ids = list(tokens)
        seq.drafted = []
        return seq

    def _restart(self, seq: DraftSequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.block_hashes.clear()

    def _catch_up(self, seqs: list[DraftSequence]) -> dict[str, int]:
        """Feed every sequence its tokens past its KV, in chunks inside the token budget; the draft
        model's argmax after each sequence's last token, for those whose blocks fit."""
        last: dict[str, int] = {}
        pending = list(seqs)
        while pending:
            budget, batch, waiting = self.token_budget, [], []
            for seq in pending:
                if budget == 0:
                    waiting.append(seq)
                    continue
                n = self._allocate_catch_up(seq, min(budget, self.chunk))
                if n is None:
                    self._restart(seq)  # no room in the draft's pool: no drafts this step
                    continue
                start = seq.num_computed_tokens
                batch.append((seq, seq.all_token_ids[start:start + n]))
                budget -= n
                if start + n < len(seq.all_token_ids):
                    waiting.append(seq)
            last.update(self._forward(batch))
            pending = waiting
        return last

    def _allocate_catch_up(self, seq: DraftSequence, limit: int) -> int | None:
        """Slots for the next (at most ``limit``) tokens of the sequence, a prefix-cache hit first
        when it holds no blocks; how many tokens to feed, or None if they do not fit."""
        hit = self.kv.find_cached_prefix(seq) if not any(seq.block_tables) else None
        start = seq.num_computed_tokens + (hit.num_blocks * self.kv.block_size if hit else 0)
        n = min(len(seq.all_token_ids) - start, limit)
        return n if self.kv.allocate_slots(seq, n, hit) else None

    def _can_feed_draft(self, seq: DraftSequence) -> bool:
        """Slots for the sequence's last draft (provisional, like every draft before it)."""
        provisional = seq.num_computed_tokens + 1 - len(seq.all_token_ids)
        return self.kv.allocate_slots(seq, 1, num_provisional=provisional)

    def _forward(self, batch: list[tuple[DraftSequence, list[int]]]) -> dict[str, int]:
        """Run the draft model on each sequence's ``tokens`` (slots already allocated) and advance
        its ``num_computed_tokens``; the argmax after the last token of every sequence whose fed
        tokens now end at the end of what it knows."""
        if not batch:
            return {}
        sequences = []
        for seq, tokens in batch:
            start = seq.num_computed_tokens
            sequences.append(ScheduledSequence(
                request_id=seq.request_id, token_ids=tuple(tokens), start_position=start,
                block_tables=tuple(tuple(t) for t in seq.block_tables),
                sample=start + len(tokens) == len(seq.fed_token_ids)))
        output = self.runner.execute(SchedulerOutput(sequences=tuple(sequences),
                                                     block_copies=tuple(self.kv.take_pending_copies())))
        for seq, tokens in batch:
            seq.num_computed_tokens += len(tokens)
        best = output.logits.argmax(dim=-1).tolist()  # [num sampling sequences]
        return dict(zip(output.request_ids, best))

    # --- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {"draft_num_blocks_total": self.pool.num_blocks, "draft_num_blocks_free": self.pool.num_free,
                "draft_num_blocks_used": self.pool.num_used, "draft_kv_cache_bytes": self.storage.nbytes,
                "draft_kv_bytes_used": self.pool.num_used * self.storage.block_nbytes}
