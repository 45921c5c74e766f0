"""Speculative decoding, the parts that need no model: proposing draft tokens by prompt lookup,
and verifying them against the target model's logits so that the output keeps its distribution.

    context:  ... a b c d ... a b c          (the last n tokens, "a b c", occurred before)
    draft:                          d ...    (what followed them then, up to k tokens)

Verification (Leviathan et al., 2023; Chen et al., 2023) takes the target's logits at the k + 1
positions the drafts were fed to: position i scores what comes after draft i - 1. Greedy requests
accept drafts while they equal the target's argmax, then take the argmax where they stop: exactly
the tokens decoding without drafts would give. Sampled requests accept draft i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection they draw from max(p_i - q_i, 0), renormalised;
if every draft is accepted they draw one more token from p_k. The result is distributed as the
target alone would sample it, whatever the drafts were. A prompt-lookup draft is deterministic,
q_i = one-hot(d_i): acceptance is p_i(d_i), and a rejection draws from p_i without d_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvcache.config import SamplingParams
from kvcache.engine.request import Request
from kvcache.runtime.sampler import probabilities


@dataclass(frozen=True)
class NgramProposer:
    """Prompt lookup: match the last ``n`` tokens (longest n first, from ``max_n`` down to ``min_n``)
    at their most recent earlier occurrence in the context, and propose what followed, up to ``k``."""

    k: int
    max_n: int = 4
    min_n: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.k!r}.")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"The n-gram sizes must satisfy 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}.")

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        """Up to ``k`` draft tokens to follow ``token_ids`` (empty when no n-gram recurs)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            start = _last_earlier_match(ids, n)
            if start is not None:
                follow = ids[start + n:start + n + self.k]
                return follow.tolist()
        return []


def _last_earlier_match(ids: np.ndarray, n: int) -> int | None:
    """Start of the most recent occurrence of ``ids[-n:]`` that ends before the last token."""
    tail = ids[-n:]
    # candidate starts: every position whose token equals the tail's first, excluding the tail itself
    candidates = np.flatnonzero(ids[:len(ids) - n] == tail[0])
    for start in candidates[::-1]:
        if np.array_equal(ids[start:start + n], tail):
            return int(start)
    return None


def verify(logits: torch.Tensor, drafts: Sequence[int], params: SamplingParams,
           generator: torch.Generator | None, best: Sequence[int] | None = None) -> list[int]:
    """The tokens a request keeps from one verification step: the accepted drafts plus one token of
    the target's own (a correction or a bonus), so always between 1 and len(drafts) + 1 tokens.

    ``logits`` [len(drafts) + 1, V]: row i holds the target's logits after the context and drafts
    0..i-1 (``best``: each row's argmax, when the caller has it). Drafts are deterministic
    (q = one-hot), as prompt lookup's are.
    """
    if logits.shape[0] != len(drafts) + 1:
        raise ValueError(f"verify needs {len(drafts) + 1} rows of logits, got {logits.shape[0]}.")
    if params.greedy:
        best = logits.argmax(dim=-1).tolist() if best is None else list(best)
        kept = 0
        while kept < len(drafts) and drafts[kept] == best[kept]:
            kept += 1
        return list(drafts[:kept]) + [best[kept]]
    probs = probabilities(logits.float(), params)  # [k + 1, V]
    accept_draws = torch.rand(len(drafts), generator=generator, device=probs.device).tolist()
    for i, draft in enumerate(drafts):
        if accept_draws[i] < float(probs[i, draft]):
            continue
        residual = probs[i].clone()
        residual[draft] = 0.0  # max(p - one_hot(d), 0): the draft is the only token q gave mass to
        if float(residual.sum()) > 0.0:  # else all of p was on the draft (a rounding miss): it stands
            return list(drafts[:i]) + [int(torch.multinomial(residual, 1, generator=generator))]
    return list(drafts) + [int(torch.multinomial(probs[len(drafts)], 1, generator=generator))]


@dataclass
class SpecCounters:
    """Totals over the engine's life: drafts verified, drafts accepted, verification steps."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0

    def count(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.verifications += 1

    def stats(self) -> dict[str, float | int]:
        return {
            "spec_drafted_tokens": self.drafted,
            "spec_accepted_tokens": self.accepted,
            "spec_verifications": self.verifications,
            "spec_acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "spec_mean_accepted_length": self.accepted / self.verifications if self.verifications else 0.0,
        }


class NgramDrafter:
    """Prompt-lookup drafts per request, with a back-off where they do not pay: after a
    verification that kept none of its drafts a request waits before drafting again (1, 2, 4 ..
    ``max_backoff`` steps), and one that keeps some starts afresh."""

    def __init__(self, proposer: NgramProposer, max_backoff: int = 16) -> None:
        self.proposer = proposer
        self.max_backoff = max_backoff
        self._backoff: dict[str, int] = {}  # request id -> steps to wait after the next miss
        self._wait: dict[str, int] = {}  # request id -> steps left without drafts

    def propose(self, request_id: str, token_ids: Sequence[int]) -> list[int]:
        wait = self._wait.get(request_id, 0)
        if wait:
            self._wait[request_id] = wait - 1
            return []
        return self.proposer.propose(token_ids)

    def propose_all(self, requests: Sequence[Request]) -> list[list[int]]:
        """Drafts for each request, in order (see :meth:`propose`)."""
        return [self.propose(r.request_id, r.all_token_ids) for r in requests]

    def free_cache(self, request_id: str) -> None:
        """Nothing is cached per request (the request was preempted; its back-off stands)."""

    def observe(self, request_id: str, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` drafts kept ``accepted`` of them."""
        if accepted:
            self._backoff.pop(request_id, None)
            return
        backoff = self._backoff.get(request_id, 1)
        self._wait[request_id] = backoff
        self._backoff[request_id] = min(2 * backoff, self.max_backoff)

    def forget(self, request_id: str) -> None:
        self._backoff.pop(request_id, None)
        self._wait.pop(request_id, None)

    def stats(self) -> dict[str, int]:
        """Nothing beyond the engine's counters: prompt lookup holds no KV."""
        return {}
