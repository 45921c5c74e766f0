"""The speculation gate: the step-time fit, the acceptance a batch needs, and the engine drafting
only where the gate lets it, with the same tokens either way."""

import pytest
from hypothesis import given, strategies as st

from kvcache import SamplingParams
from kvcache.config import SpeculativeConfig, speculative_config
from kvcache.engine.spec_gate import SpeculationGate, StepTimeFit

COPY = ("Copy this text exactly.\n\nThe keeper wound the clockwork, trimmed the wick and polished the great "
        "lens until it shone. Ships passing the rocks at night trusted the beam.\n\nCopy:\n")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _fitted(fixed: float, per_token: float, sizes=(1, 5, 8, 40, 12, 33, 64, 2)) -> SpeculationGate:
    gate = SpeculationGate()
    for tokens in sizes * 3:
        gate.observe_step(tokens, fixed + per_token * tokens)
    return gate


@given(st.floats(1e-3, 1.0), st.floats(0.0, 1e-2))
def test_the_fit_recovers_an_exact_line(fixed, per_token):
    a, b = _fitted(fixed, per_token).fit.line()
    assert a == pytest.approx(fixed, rel=1e-6, abs=1e-9) and b == pytest.approx(per_token, rel=1e-6, abs=1e-9)


def test_steps_of_one_size_leave_the_slope_unknown_and_drafting_on():
    fit = StepTimeFit()
    for _ in range(50):
        fit.add(8, 0.1)
    assert fit.line() is None
    gate = SpeculationGate(fit=fit)
    assert gate.threshold(64) == 0.0 and gate.drafting(["r"], 64) == [True]


def test_the_acceptance_needed_grows_with_the_batch():
    """A weight-bound step (50 ms fixed, 2 ms a token): drafts accepted 60% of the time pay at
    batch 1 and 8 (the share of per-token time is 4% and 24%), not at 64 (72%) but for a probe
    every ``probe_every`` steps."""
    gate = _fitted(0.05, 0.002)
    assert [round(gate.threshold(b), 3) for b in (1, 8, 64)] == [0.038, 0.242, 0.719]
    gate.observe_verification("r", drafted=100, accepted=60)
    assert gate.drafting(["r"], 1) == [True] and gate.drafting(["r"], 8) == [True]
    at_64 = [gate.drafting(["r"], 64)[0] for _ in range(3 * gate.probe_every)]
    assert at_64 == ([False] * (gate.probe_every - 1) + [True]) * 3


def test_a_request_starts_from_the_engines_acceptance_and_moves_to_its_own():
    gate = SpeculationGate(prior_weight=8)
    assert gate.acceptance("new") == 0.5  # nothing seen yet
    gate.observe_verification("a", drafted=40, accepted=40)
    overall = (40 + 4) / 48
    assert gate.acceptance("new") == pytest.approx(overall)
    assert gate.acceptance("a") == pytest.approx((40 + 8 * overall) / 48)
    gate.observe_verification("b", drafted=40, accepted=0)
    assert gate.acceptance("new") == pytest.approx(0.5)
    assert gate.acceptance("b") == pytest.approx((0 + 8 * 0.5) / 48)
    gate.forget("b")
    assert gate.acceptance("b") == pytest.approx(0.5)


def test_adaptive_is_on_by_default_and_can_be_turned_off():
    assert speculative_config("ngram", 3, None).adaptive
    assert not speculative_config("ngram", 3, None, adaptive=False).adaptive
    assert not speculative_config(SpeculativeConfig("ngram", 3), None, None, adaptive=False).adaptive
    with pytest.raises(ValueError, match="need speculative="):
        speculative_config(None, None, None, adaptive=False)
    with pytest.raises(ValueError, match="adaptive must be True or False"):
        SpeculativeConfig("ngram", 3, adaptive="yes")


def _generate(engine, prompt):
    rid = engine.add_request(None, prompt, GREEDY)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                return out.outputs[0].token_ids


@pytest.mark.slow
def test_the_engine_drafts_only_where_the_gate_says_it_pays(smollm_engine_factory):
    plain = _generate(smollm_engine_factory(num_blocks=64), COPY)
    paying = smollm_engine_factory(num_blocks=64, speculative="ngram")
    assert _generate(paying, COPY) == plain
    assert paying.stats()["spec_accepted_tokens"] > 0
    assert paying.spec_gate.fit.line() is not None  # decode steps with and without drafts were timed
    never = smollm_engine_factory(num_blocks=64, speculative="ngram")
    never.spec_gate.threshold = lambda batch_size: 1.0  # no acceptance rate is above 1
    never.spec_gate.probe_every = 1000
    assert _generate(never, COPY) == plain
    assert never.stats()["spec_drafted_tokens"] == 0
    always = smollm_engine_factory(num_blocks=64, speculative="ngram", adaptive_speculation=False)
    assert always.spec_gate is None
