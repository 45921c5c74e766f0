"""Prompt-lookup drafts and their verification: greedy keeps decoding's tokens exactly, sampling keeps
the target's distribution (a statistical test on a toy vocabulary)."""

from collections import Counter

import pytest
import torch
from hypothesis import given, strategies as st

from kvcache.config import SamplingParams
from kvcache.engine.speculative import NgramProposer, verify
from kvcache.runtime.sampler import make_generator, probabilities


def test_prompt_lookup_prefers_the_longest_recurring_ngram():
    ids = [1, 2, 3, 10, 9, 2, 3, 11, 8, 1, 2, 3]
    assert NgramProposer(k=2).propose(ids) == [10, 9]            # "1 2 3" occurred at the start
    assert NgramProposer(k=2, max_n=2).propose(ids) == [11, 8]   # most recent "2 3"
    assert NgramProposer(k=5).propose([4, 5, 6, 4, 5]) == [6, 4, 5]  # runs up to the end of the context
    assert NgramProposer(k=3).propose([1, 2, 3, 4]) == []
    assert NgramProposer(k=3).propose([7]) == []


@given(ids=st.lists(st.integers(0, 4), min_size=1, max_size=60), k=st.integers(1, 6),
       max_n=st.integers(1, 5))
def test_a_proposal_is_what_followed_an_earlier_occurrence_of_the_tail(ids, k, max_n):
    proposal = NgramProposer(k=k, max_n=max_n).propose(ids)
    assert len(proposal) <= k
    if proposal:
        assert any(ids[s:s + n] == ids[-n:] and ids[s + n:s + n + len(proposal)] == proposal
                   for n in range(1, max_n + 1) for s in range(len(ids) - n))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        NgramProposer(k=0)
    with pytest.raises(ValueError, match="n-gram"):
        NgramProposer(k=2, max_n=1, min_n=2)
    with pytest.raises(ValueError, match="rows of logits"):
        verify(torch.zeros(2, 5), [1, 2], SamplingParams(temperature=0), None)


def test_greedy_verification_keeps_exactly_the_argmax_tokens():
    logits = torch.full((4, 8), -5.0)
    for row, best in enumerate([3, 1, 4, 6]):
        logits[row, best] = 5.0
    greedy = SamplingParams(temperature=0)
    assert verify(logits, [3, 1, 4], greedy, None) == [3, 1, 4, 6]  # all accepted, plus the bonus
    assert verify(logits, [3, 2, 4], greedy, None) == [3, 1]        # stops at the first mismatch
    assert verify(logits, [0, 1, 4], greedy, None) == [3]


def _total_variation(counts: Counter, probs: torch.Tensor) -> float:
    total = sum(counts.values())
    return 0.5 * sum(abs(counts.get(t, 0) / total - float(probs[t])) for t in range(probs.shape[0]))


@pytest.mark.parametrize("params,draft0", [(SamplingParams(temperature=1.0), 0), (SamplingParams(temperature=1.0), 5),
                                           (SamplingParams(temperature=0.7, top_k=4), 0),
                                           (SamplingParams(temperature=1.3, top_p=0.8), 5)])
def test_sampled_verification_keeps_the_target_distribution(params, draft0):
    """Row i of the toy target is its distribution after the drafts before i. Whatever the drafts,
    the first kept token follows row 0, and the token after an accepted draft 0 follows row 1."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6) * 1.5
    logits[0, 5] = -4.0  # draft 5 is unlikely at position 0, draft 0 is whatever randn made it
    target = probabilities(logits, params)
    generator = make_generator(1234)
    first, second = Counter(), Counter()
    for _ in range(6000):
        kept = verify(logits, [draft0, 2], params, generator)
        first[kept[0]] += 1
        if kept[0] == draft0:
            second[kept[1]] += 1
    # a fixed seed makes the run deterministic; the bounds are ~3 sigma of the sampling noise
    assert _total_variation(first, target[0]) < 0.035
    if sum(second.values()) > 1500:
        assert _total_variation(second, target[1]) < 0.06


def test_sampled_verification_is_reproducible_with_a_seed():
    logits = torch.randn(4, 10)
    params = SamplingParams(temperature=0.9, seed=7)
    runs = [[verify(logits, [1, 2, 3], params, g) for _ in range(20)] for g in (make_generator(7), make_generator(7))]
    assert runs[0] == runs[1]
