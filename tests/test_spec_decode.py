"""Speculative decoding inside continuous batching, on the real model: greedy outputs are token-identical
to decoding without drafts, in mixed batches, with stops inside accepted runs, preemption, n > 1 and
aborts, and every block comes back."""

import pytest

from kvcache import SamplingParams
from kvcache.config import SchedulerConfig
from test_paged_engine import run  # requests arrive while the engine steps; token ids per prompt

pytestmark = pytest.mark.slow

PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, "
           "trimmed the wick and polished the great lens until it shone. Ships passing the rocks at night "
           "trusted the beam, and none was lost while he kept the light.")
CODE = ("def total(items):\n    result = 0\n    for item in items:\n        result = result + item.price\n"
        "    return result\n")
PROMPTS = [
    f"Copy this text exactly.\n\n{PASSAGE}\n\nCopy:\n",
    f"Rename the variable result to subtotal in this code.\n\n{CODE}\nRenamed code:\n",
    "Write a haiku about memory:",
    f"Quote the sentence about ships from this text.\n\n{PASSAGE}\n\nQuote:",
    "The history of the bicycle begins",
]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SPEC = {"speculative": "ngram", "num_speculative_tokens": 4, "adaptive_speculation": False}  # every draft verified


def generate(engine, prompt, params):
    """One request alone, to its end: its completion."""
    rid = engine.add_request(None, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                final = out
    return final.outputs[0]


def assert_clean(engine):
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_used == 0 and engine.pool.num_free == engine.pool.num_blocks
    assert not engine.runner.host_blocks


@pytest.fixture(scope="module")
def baseline(smollm_engine_factory):
    return run(smollm_engine_factory(num_blocks=256), PROMPTS, GREEDY)


def test_greedy_speculation_is_token_identical_in_a_mixed_batch(smollm_engine_factory, baseline):
    """Verifications, plain decodes and prefill chunks share steps (requests arrive one a step)."""
    engine = smollm_engine_factory(num_blocks=256, **SPEC)
    assert run(engine, PROMPTS, GREEDY, arrive_every=1) == baseline
    stats = engine.stats()
    assert stats["spec_accepted_tokens"] > 20  # the copying prompts accept most drafts
    assert 0 < stats["spec_acceptance_rate"] <= 1
    assert stats["spec_mean_accepted_length"] == stats["spec_accepted_tokens"] / stats["spec_verifications"]
    assert_clean(engine)


def test_drafts_are_trimmed_to_keep_the_step_fused(smollm_engine_factory, baseline, monkeypatch):
    """Five requests with up to 4 drafts each would make 25-token steps, past the fused C step's 16,
    and fall back to PyTorch's per-operator path (slower than the drafts save); the engine trims the
    drafts, the likeliest first, so every decode step stays fused, and the output is unchanged."""
    from kvcache import kernels
    from kvcache.models import fused_decode
    if kernels.library() is None:
        pytest.skip("no C kernels here: there is no fused step to keep")
    sizes = []
    applies = fused_decode.applies

    def recording(model, tokens, metas):
        if all(m.decode_rows for m in metas):
            sizes.append(tokens.shape[0])
        return applies(model, tokens, metas)

    monkeypatch.setattr(fused_decode, "applies", recording)
    engine = smollm_engine_factory(num_blocks=256, **SPEC)
    assert engine._fused_step_tokens == fused_decode.MAX_TOKENS
    assert run(engine, PROMPTS, GREEDY, arrive_every=1) == baseline
    assert max(sizes) == fused_decode.MAX_TOKENS  # the budget was used up, never exceeded
    assert engine.stats()["spec_accepted_tokens"] > 20
    assert_clean(engine)


@pytest.mark.parametrize("k", [1, 7])
def test_greedy_speculation_with_chunked_prefill_and_small_budgets(smollm_engine_factory, baseline, k):
    """A budget of 6 tokens cuts drafts short and interleaves them with prefill chunks."""
    engine = smollm_engine_factory(num_blocks=256, speculative="ngram", num_speculative_tokens=k,
                                   adaptive_speculation=False,
                                   scheduler_config=SchedulerConfig(max_num_batched_tokens=6))
    assert run(engine, PROMPTS[:2], GREEDY, arrive_every=1) == baseline[:2]
    assert engine.stats()["spec_accepted_tokens"] > 0
    assert_clean(engine)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempting_requests_with_drafts(smollm_engine_factory, baseline, mode):
    engine = smollm_engine_factory(num_blocks=20, block_size=8, scheduler_config=SchedulerConfig(
        preemption_mode=mode), **SPEC)
    assert run(engine, PROMPTS, GREEDY, arrive_every=1) == baseline
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["spec_accepted_tokens"] > 0
    assert_clean(engine)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=30, temperature=0.0, stop=["polished"]),   # a stop string inside a copied run
    SamplingParams(max_tokens=13, temperature=0.0),                      # max_tokens in the middle of a run
    SamplingParams(max_tokens=60, temperature=0.0),                      # EOS where the copy ends
    SamplingParams(max_tokens=30, temperature=0.0, logprobs=2),
], ids=["stop-string", "max-tokens", "eos", "logprobs"])
def test_endings_inside_an_accepted_run_match_plain_decoding(smollm_engine_factory, params):
    prompt = PROMPTS[0]
    plain = generate(smollm_engine_factory(num_blocks=64), prompt, params)
    engine = smollm_engine_factory(num_blocks=64, **SPEC)
    spec = generate(engine, prompt, params)
    assert (spec.text, spec.token_ids, spec.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)
    if params.logprobs:
        assert [e["token_id"] for e in spec.logprobs] == spec.token_ids
        for a, b in zip(spec.logprobs, plain.logprobs):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
    assert engine.stats()["spec_accepted_tokens"] > 0
    assert_clean(engine)


def test_stop_token_inside_an_accepted_run(smollm_engine_factory, baseline):
    """A stop token id the copy reaches mid-run (as EOS would be) ends the request right there."""
    engine = smollm_engine_factory(num_blocks=64, **SPEC)
    stop_at = baseline[0][0][20]
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_at])
    out = generate(engine, PROMPTS[0], params)
    first = baseline[0][0].index(stop_at)
    assert out.token_ids == baseline[0][0][:first + 1] and out.finish_reason == "stop"
    assert_clean(engine)


def test_parallel_samples_speculate_each_on_its_own(smollm_engine_factory, baseline):
    engine = smollm_engine_factory(num_blocks=256, **SPEC)
    greedy = SamplingParams(n=2, max_tokens=40, temperature=0.0, ignore_eos=True)
    assert run(engine, PROMPTS[:1], greedy)[0] == [baseline[0][0]] * 2
    sampled = SamplingParams(n=3, max_tokens=24, temperature=0.8, seed=11)
    first = run(engine, PROMPTS[:2], sampled)
    second = run(engine, PROMPTS[:2], sampled)
    assert first == second  # seeds reproduce the same run
    assert len({tuple(t) for t in first[0]}) > 1
    assert_clean(engine)


def test_abort_with_drafts_pending(smollm_engine_factory):
    engine = smollm_engine_factory(num_blocks=64, **SPEC)
    rid = engine.add_request(None, PROMPTS[0], GREEDY)
    keep = engine.add_request(None, PROMPTS[2], GREEDY)
    request = engine._requests[f"{rid}#0"]
    for _ in range(40):
        engine.step()
        if request.spec_token_ids and engine.stats()["spec_verifications"] > 0:
            break
    assert request.spec_token_ids and engine.stats()["spec_verifications"] > 0
    engine.abort(rid)
    assert not request.spec_token_ids and request.is_finished
    while engine.has_unfinished_requests():
        engine.step()
    engine.abort(keep)
    assert_clean(engine)


def test_bad_speculative_settings_are_refused_in_one_sentence(smollm_engine_factory):
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer of at least 1, got 0"):
        smollm_engine_factory(num_blocks=8, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculative must be one of ngram, draft"):
        smollm_engine_factory(num_blocks=8, speculative="medusa")
    with pytest.raises(ValueError, match="need speculative="):
        smollm_engine_factory(num_blocks=8, num_speculative_tokens=3)
    with pytest.raises(ValueError, match="needs a draft model"):
        smollm_engine_factory(num_blocks=8, speculative="draft")
