"""Turn a step's plan into tensors (tokens, positions, slot mapping, block tables) and run the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kvcache.cache.storage import KVCache
from kvcache.models.attention import AttentionMetadata, AttentionScores, build_masks
from kvcache.models.llama import LlamaForCausalLM
from kvcache.runtime.plan import ScheduledSequence, SchedulerOutput


@dataclass
class ModelOutput:
    request_ids: list[str]  # the sequences that asked to sample, in the runner's order
    logits: torch.Tensor  # [sum(num_rows), vocab] float32, each sequence's rows together
    num_rows: list[int]  # per sequence: 1, or k + 1 for a verification of k drafts
    # request id -> per cache group: the attention weights its eviction policy asked for, [live] or None
    attention_scores: dict[str, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)
    best: torch.Tensor | None = None  # [sum(num_rows)] each row's argmax, where the model computed it

    def rows(self) -> dict[str, tuple[torch.Tensor, list[int]]]:
        """Each sampling sequence's logits [num_rows, vocab] and each row's most likely token, for
        greedy requests (the model's own where it computed them with the logits, else the argmax of
        the whole batch in one call)."""
        if not self.request_ids:
            best = []
        else:
            best = (self.logits.argmax(dim=-1) if self.best is None else self.best).tolist()
        out, start = {}, 0
        for request_id, n in zip(self.request_ids, self.num_rows):
            out[request_id] = (self.logits[start:start + n], best[start:start + n])
            start += n
        return out


class ModelRunner:
    """Executes plans; never changes them. Holds the host copies of swapped-out requests."""

    def __init__(self, model: LlamaForCausalLM, storage: KVCache) -> None:
        self.model = model
        self.storage = storage
        self.device = storage.device
        self.host_blocks: dict[str, list[list[torch.Tensor]]] = {}
        # receives ((group, chain hash), bytes) of the blocks a plan evicts, before anything overwrites them
        self.on_evicted: Callable[[Sequence[tuple[int, bytes]], Sequence[memoryview]], None] | None = None

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        # cached blocks the pool handed out again are saved before anything writes to them (a slot
        # move's destination may be one)
        if plan.evicted and self.on_evicted is not None:
            self.on_evicted([(g, h) for _, g, h in plan.evicted],
                            self.storage.export_blocks([b for b, _, _ in plan.evicted]))
        # evictions first: their destinations are blocks they held (or took) before this step's
        # preemptions freed any, and their sources may be handed to others below
        self.storage.move_slots(list(plan.slot_moves))
        for request_id, block_ids in plan.swap_out:
            self.host_blocks[request_id] = self.storage.read_blocks(list(block_ids))
        self.storage.copy_blocks(list(plan.block_copies))
        for request_id, block_ids in plan.swap_in:
            self.storage.write_blocks(list(block_ids), self.host_blocks.pop(request_id))
        if plan.tier_loads:
            self.storage.import_blocks([b for b, _ in plan.tier_loads], [t.body for _, t in plan.tier_loads])
        if not plan.sequences:
            return ModelOutput([], torch.empty(0, self.model.config.vocab_size), [])
        seqs = decodes_longest_first(plan.sequences)
        tokens, positions, meta = self.prepare(seqs)
        rows = torch.tensor(logit_rows(seqs), dtype=torch.long, device=self.device)
        sampled = [s for s in seqs if s.sample]
        logits, best = self._logits(tokens, positions, meta, rows)
        return ModelOutput([s.request_id for s in sampled], logits, [s.num_logit_rows for s in sampled],
                           collected_scores(seqs, meta), best)

    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor, meta: list[AttentionMetadata],
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's float32 logits [len(rows), vocab] at the step's rows ``rows`` (in one call where
        the model has ``forward_logits``), and their argmax [len(rows)] where the model computed it
        with them, else None."""
        forward_logits = getattr(self.model, "forward_logits", None)
        if forward_logits is not None:
            return forward_logits(tokens, positions, meta, self.storage.layers, rows)
        return self.model.compute_logits(self.model(tokens, positions, meta, self.storage.layers)[rows]), None

    def drop_host_blocks(self, request_id: str) -> None:
        self.host_blocks.pop(request_id, None)

    def prepare(self, seqs: tuple[ScheduledSequence, ...]) -> tuple[torch.Tensor, torch.Tensor,
                                                                     list[AttentionMetadata]]:
        """Flatten sequences into token/position vectors and one attention metadata per cache group.

        Each group has its own slot mapping and block tables; a sliding group's tables start at the
        first block its window reaches (an entry the window released before that is read as block 0
        and masked out); groups with the same window share their masks.
        """
        tokens: list[int] = []
        positions: list[int] = []
        for s in seqs:
            tokens.extend(s.token_ids)
            positions.extend(range(s.start_position, s.seq_len))
        num_decodes = 0
        while num_decodes < len(seqs) and is_decode(seqs[num_decodes]):
            num_decodes += 1
        metas: list[AttentionMetadata] = []
        masked: dict[tuple, AttentionMetadata] = {}
        for group in self.storage.groups:
            meta = self._group_metadata(seqs, group.group_id, num_decodes, group.spec.window)
            key = (group.spec.window, tuple(meta.seq_lens))  # evictions may leave groups' lengths apart
            if key in masked:
                like = masked[key]
                meta.decode_groups, meta.decode_masks, meta.prefill_masks = \
                    like.decode_groups, like.decode_masks, like.prefill_masks
            else:
                build_masks(meta, self.device)
                masked[key] = meta
            metas.append(meta)
        return (torch.tensor(tokens, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device), metas)

    def _group_metadata(self, seqs: tuple[ScheduledSequence, ...], group: int, num_decodes: int,
                        window: int | None) -> AttentionMetadata:
        """One group's slot mapping and block tables for the step (masks are filled separately)."""
        bs = self.storage.block_size
        slots: list[int] = []
        offsets = [s.kv_offset(group) for s in seqs]  # slot index = position - offset (eviction)
        for s, off in zip(seqs, offsets):
            table = s.block_tables[group]
            slots.extend(table[i // bs] * bs + i % bs for i in range(s.start_position - off, s.seq_len - off))
        skips = [blocks_out_of_window(s, window, bs) for s in seqs]
        tables = [s.block_tables[group][skip:] for s, skip in zip(seqs, skips)]
        width = max(len(t) for t in tables)
        rows = [[max(b, 0) for b in t] + [0] * (width - len(t)) for t in tables]
        wanted = {i: s.score_rows[group] for i, s in enumerate(seqs) if s.score_rows and s.score_rows[group]}
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            query_lens=[len(s.token_ids) for s in seqs],
            seq_lens=[s.seq_len - off - skip * bs for s, off, skip in zip(seqs, offsets, skips)],
            block_tables=torch.tensor(rows, dtype=torch.long, device=self.device),  # [num_seqs, width]
            block_size=bs, num_decodes=num_decodes, sliding_window=window,
            scores=AttentionScores(wanted) if wanted else None,
            prefill_tokens=sum(len(s.token_ids) for s in seqs if s.prompt))


def blocks_out_of_window(s: ScheduledSequence, window: int | None, block_size: int) -> int:
    """Leading blocks of ``s``'s table that no query of this step can see through ``window``.

    Attention reads a sliding group's table from the first block its earliest query reaches, so
    a decode at 4,096 tokens with a 512-token window reads 33 blocks of 16, not 256 (masking is
    shift-invariant: the metadata's seq_len is counted from that block).
    """
    if window is None:
        return 0
    first_visible = s.seq_len - len(s.token_ids) - window + 1  # position of the earliest key any query sees
    return max(0, first_visible) // block_size


def collected_scores(seqs: tuple[ScheduledSequence, ...],
                     metas: list[AttentionMetadata]) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """The attention weights each sequence's policy asked for, per group ([live] float32 or None)."""
    out: dict[str, list[torch.Tensor | None]] = {}
    for g, meta in enumerate(metas):
        for i, weights in (meta.scores.totals.items() if meta.scores else ()):
            out.setdefault(seqs[i].request_id, [None] * len(metas))[g] = weights
    return {request_id: tuple(w) for request_id, w in out.items()}


def is_decode(s: ScheduledSequence) -> bool:
    return len(s.token_ids) == 1 and s.start_position > 0


def decodes_longest_first(seqs: tuple[ScheduledSequence, ...]) -> tuple[ScheduledSequence, ...]:
    """Decodes first, longest first (so length groups are contiguous), then the prefill chunks."""
    decodes = sorted((s for s in seqs if is_decode(s)), key=lambda s: -s.seq_len)
    return tuple(decodes) + tuple(s for s in seqs if not is_decode(s))


def logit_rows(seqs: tuple[ScheduledSequence, ...]) -> list[int]:
    """Rows of the flat batch whose logits are wanted: each sampling sequence's last token, or its
    last k + 1 tokens when it verifies k drafts."""
    rows, end = [], 0
    for s in seqs:
        end += len(s.token_ids)
        rows.extend(range(end - s.num_logit_rows, end))
    return rows
