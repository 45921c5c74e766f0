"""The plain-data plan a scheduler hands the runner for one step. No tensors here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step: compute KV for ``token_ids`` at positions start.. and maybe sample."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens computed this step
    start_position: int  # tokens with KV before this step
    block_tables: tuple[tuple[int, ...], ...]  # per cache group: the block table for this step
    sample: bool  # True when this step reaches the end of the known tokens
    num_spec_tokens: int = 0  # the last token_ids are drafts: a sampling sequence then gets logits
    # for its last num_spec_tokens + 1 positions (the verification rows)
    kv_offsets: tuple[int, ...] = ()  # per cache group: tokens its eviction policy dropped, so a token
    # at position p has slot index p - offset (empty: all 0, nothing evicted)
    score_rows: tuple[int, ...] = ()  # per cache group: the last query rows whose attention weights
    # the eviction policy wants back (empty: none)
    prompt: bool = False  # the tokens are a prompt's (or a recomputation's), not generated ones being
    # decoded or verified: their rows then go through PyTorch's GEMM (AttentionMetadata.prefill_tokens)

    def kv_offset(self, group: int) -> int:
        return self.kv_offsets[group] if self.kv_offsets else 0

    @property
    def num_logit_rows(self) -> int:
        return self.num_spec_tokens + 1 if self.sample else 0

    @property
    def seq_len(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """The step's sequences (in admission order; the runner lays out their tensors) and the block
    moves to perform before the forward."""

    sequences: tuple[ScheduledSequence, ...] = ()
    slot_moves: tuple[tuple[int, int], ...] = ()  # (src slot, dst slot) of evictions, performed first
    block_copies: tuple[tuple[int, int], ...] = ()  # (src, dst) copy-on-write
    swap_out: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (request id, device blocks to save)
    swap_in: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (request id, device blocks to restore into)
    preempted: tuple[str, ...] = field(default=())
    # offload tiers: cached blocks handed out again, (block, group, chain hash), whose KV is saved
    # first; then blocks found in a tier, (fresh block, TierBlock), whose bytes are copied in
    evicted: tuple[tuple[int, int, bytes], ...] = ()
    tier_loads: tuple[tuple[int, Any], ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences and not self.swap_out and not self.slot_moves
