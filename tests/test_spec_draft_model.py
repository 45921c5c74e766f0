"""speculative="draft" on the real SmolLM2 weights: a draft model proposes, the target verifies.

SmolLM2-135M is the only model with its vocabulary here, so the drafts come from the target
itself (greedy acceptance must then be complete) and from a truncated copy of it: its first 6 of
30 layers with the final norm and head, saved as a Hugging Face folder (lower acceptance, the
same output). Greedy outputs are token-identical to decoding without drafts in mixed batches,
with chunked prefill, preemption (recompute and swap), n > 1 and aborts; the draft's cache follows
every request's tokens after each rollback, and every block of both pools comes back.
"""

import json
from dataclasses import replace

import pytest

from kvcache import SamplingParams
from kvcache.cache.spec import group_layers, layer_specs, num_blocks_for_budget
from kvcache.config import SchedulerConfig
from kvcache.engine.draft_model import DraftModelDrafter
from kvcache.models.loader import default_model_path, save_hf_folder
from test_paged_engine import run  # requests arrive while the engine steps; token ids per prompt
from test_spec_decode import GREEDY, PROMPTS

pytestmark = pytest.mark.slow

DRAFT_LAYERS = 6


@pytest.fixture(scope="module")
def baseline(smollm_engine_factory):
    return run(smollm_engine_factory(num_blocks=256), PROMPTS, GREEDY)


@pytest.fixture(scope="module")
def self_draft():
    """The target's own GGUF as its draft."""
    return str(default_model_path())


def _truncated(smollm, num_layers, vocab_size=None):
    """SmolLM2 with only its first ``num_layers`` layers (and, if given, the first ``vocab_size``
    rows of its embedding), as HF names and a config to match."""
    config = replace(smollm.config, num_layers=num_layers, vocab_size=vocab_size or smollm.config.vocab_size)
    weights = {name: tensor for name, tensor in smollm.float_weights().items()
               if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers}
    if vocab_size is not None:
        weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:vocab_size]
    return config, weights


@pytest.fixture(scope="module")
def truncated_draft(smollm, tmp_path_factory):
    """The first 6 of SmolLM2's 30 layers plus its final norm and (tied) head, saved as a folder."""
    folder = tmp_path_factory.mktemp("draft6")
    config, weights = _truncated(smollm, DRAFT_LAYERS)
    save_hf_folder(folder, config, weights, smollm.tokenizer)
    return str(folder)


def draft_engine(factory, draft, k=4, **kwargs):
    return factory(speculative="draft", draft_model=draft, num_speculative_tokens=k,
                   adaptive_speculation=False, **kwargs)


def assert_clean(engine):
    """Nothing runs and every block of the target's and the draft's pools is free."""
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free == engine.pool.num_blocks
    drafter = engine.drafter
    assert isinstance(drafter, DraftModelDrafter)
    assert not drafter.sequences
    assert drafter.pool.num_used == 0 and drafter.pool.num_free == drafter.pool.num_blocks
    assert engine.stats()["draft_num_blocks_used"] == 0
    assert not engine.runner.host_blocks


def assert_draft_follows(engine):
    """After a step, each running request's draft KV covers its tokens and its drafts but the last,
    in as many blocks as that takes (no block of a rejected draft is left behind)."""
    drafter = engine.drafter
    for request in engine.scheduler.running:
        seq = drafter.sequences.get(request.request_id)
        if not request.spec_token_ids:
            continue
        assert seq.all_token_ids == request.all_token_ids
        assert seq.drafted == request.spec_token_ids
        assert seq.num_computed_tokens == request.num_tokens + len(seq.drafted) - 1
        assert drafter.kv.num_blocks_held(seq) == drafter.kv.blocks_for(seq.num_computed_tokens)


def test_self_draft_is_token_identical_and_accepts_every_draft(smollm_engine_factory, baseline, self_draft):
    """The target drafting for itself: greedy drafts are its own argmax, so all are accepted."""
    engine = draft_engine(smollm_engine_factory, self_draft, num_blocks=256)
    assert run(engine, PROMPTS, GREEDY, arrive_every=1) == baseline
    stats = engine.stats()
    assert stats["spec_drafted_tokens"] > 100
    assert stats["spec_acceptance_rate"] == 1.0
    assert stats["spec_mean_accepted_length"] > 3.0  # k = 4, cut short only near max_tokens
    assert_clean(engine)


def test_truncated_draft_is_token_identical_with_lower_acceptance(smollm_engine_factory, baseline,
                                                                  truncated_draft):
    engine = draft_engine(smollm_engine_factory, truncated_draft, num_blocks=256)
    outputs = run(engine, PROMPTS, GREEDY, arrive_every=1)
    assert outputs == baseline
    stats = engine.stats()
    assert 0.0 < stats["spec_acceptance_rate"] < 1.0
    assert stats["spec_drafted_tokens"] > stats["spec_accepted_tokens"] > 0
    assert_clean(engine)


@pytest.mark.parametrize("k", [1, 7])
def test_draft_cache_follows_each_rollback_under_a_small_budget(smollm_engine_factory, baseline,
                                                                truncated_draft, k):
    """A budget of 6 tokens chunks the prefill, the draft's catch-up and the verifications."""
    engine = draft_engine(smollm_engine_factory, truncated_draft, k=k, num_blocks=256, block_size=8,
                          scheduler_config=SchedulerConfig(max_num_batched_tokens=6))
    ids = [engine.add_request(None, prompt, GREEDY) for prompt in PROMPTS[:2]]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        assert_draft_follows(engine)
    assert [done[i] for i in ids] == [b[0] for b in baseline[:2]]
    assert engine.stats()["spec_accepted_tokens"] > 0
    assert_clean(engine)


def run_checked(engine, prompts, params, check):
    """Like test_paged_engine.run (one request arrives per step), calling ``check(engine)`` after
    every step."""
    ids, done = [], {}
    pending = list(prompts)
    while pending or engine.has_unfinished_requests():
        if pending:
            ids.append(engine.add_request(None, pending.pop(0), params))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
        check(engine)
    return [done[i] for i in ids]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_frees_the_drafts_blocks(smollm_engine_factory, baseline, truncated_draft, mode):
    """A preempted request holds no draft blocks while it waits, and drafts again once it runs."""
    engine = draft_engine(smollm_engine_factory, truncated_draft, num_blocks=20, block_size=8,
                          scheduler_config=SchedulerConfig(preemption_mode=mode))
    waited = []

    def check(engine):
        for request in engine.scheduler.waiting:
            assert request.request_id not in engine.drafter.sequences
            waited.append(request.num_preemptions)
        held = {b for s in engine.drafter.sequences.values() for t in s.block_tables for b in t}
        assert len(held) == engine.drafter.pool.num_used  # no block outside a live draft sequence
        assert_draft_follows(engine)
    assert run_checked(engine, PROMPTS, GREEDY, check) == baseline
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["spec_accepted_tokens"] > 0
    assert any(waited)  # some preempted request waited (without draft blocks)
    assert_clean(engine)


def test_parallel_samples_draft_each_on_their_own(smollm_engine_factory, baseline, self_draft):
    engine = draft_engine(smollm_engine_factory, self_draft, num_blocks=256)
    greedy = SamplingParams(n=2, max_tokens=40, temperature=0.0, ignore_eos=True)
    assert run(engine, PROMPTS[:1], greedy)[0] == [baseline[0][0]] * 2
    sampled = SamplingParams(n=3, max_tokens=16, temperature=0.8, seed=11)
    first = run(engine, PROMPTS[:2], sampled)
    assert first == run(engine, PROMPTS[:2], sampled)  # seeds reproduce the same run
    assert len({tuple(t) for t in first[0]}) > 1
    assert_clean(engine)


def test_abort_and_finish_free_the_drafts_blocks(smollm_engine_factory, truncated_draft):
    engine = draft_engine(smollm_engine_factory, truncated_draft, num_blocks=64)
    rid = engine.add_request(None, PROMPTS[0], GREEDY)
    keep = engine.add_request(None, PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.0))
    request = engine._requests[f"{rid}#0"]
    for _ in range(40):
        engine.step()
        if request.spec_token_ids and engine.stats()["spec_verifications"] > 0:
            break
    assert request.spec_token_ids
    held = engine.drafter.kv.num_blocks_held(engine.drafter.sequences[request.request_id])
    used = engine.drafter.pool.num_used
    assert held > 0
    engine.abort(rid)
    assert request.request_id not in engine.drafter.sequences
    assert engine.drafter.pool.num_used == used - held  # the prompts share no full block
    while engine.has_unfinished_requests():  # the other one finishes on its own (5 tokens)
        engine.step()
    assert_clean(engine)


def test_the_planner_splits_the_budget_over_both_pools(smollm, smollm_engine_factory, truncated_draft):
    budget = 64 << 20
    engine = draft_engine(smollm_engine_factory, truncated_draft, kv_cache_memory=budget, block_size=16)
    draft = engine.drafter
    assert draft.pool.num_blocks == engine.pool.num_blocks
    draft_groups = group_layers(layer_specs(_truncated(smollm, DRAFT_LAYERS)[0], engine.kv_cache_dtype))
    assert engine.pool.num_blocks == num_blocks_for_budget(engine.kv_groups, budget, 16, draft_groups)
    total = engine.storage.nbytes + draft.storage.nbytes
    assert total <= budget < total + engine.storage.block_nbytes + draft.storage.block_nbytes
    assert draft.storage.nbytes == draft.storage.planned_nbytes()
    stats = engine.stats()
    assert stats["kv_cache_bytes"] == total and stats["draft_kv_cache_bytes"] == draft.storage.nbytes
    # the draft's 6 layers cost a fifth of the target's 30 per block
    assert draft.storage.block_nbytes * 5 == engine.storage.block_nbytes


def test_bad_draft_settings_are_refused_in_one_sentence(smollm, smollm_engine_factory, tmp_path, self_draft):
    with pytest.raises(ValueError, match="needs a draft model"):
        smollm_engine_factory(num_blocks=8, speculative="draft")
    with pytest.raises(ValueError, match="The draft model could not be loaded: Model path .* does not exist"):
        draft_engine(smollm_engine_factory, str(tmp_path / "missing"), num_blocks=8)
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer of at least 1, got 0"):
        draft_engine(smollm_engine_factory, self_draft, k=0, num_blocks=8)
    config, weights = _truncated(smollm, 1, vocab_size=1000)
    save_hf_folder(tmp_path / "small-vocab", config, weights, smollm.tokenizer)
    with pytest.raises(ValueError, match="vocabulary has 1000 tokens but the target's has 49152"):
        draft_engine(smollm_engine_factory, str(tmp_path / "small-vocab"), num_blocks=8)


def test_cli_generates_with_a_draft_model(self_draft, tmp_path, capsys):
    """`kvcache generate --speculative draft --draft-model PATH` gives the tokens plain decoding gives;
    a missing draft model is one sentence and exit code 2."""
    from test_cli import _run
    from kvcache.cli import main

    argv = ["generate", "The capital of France is", "--max-tokens", "12", "--json", "--num-blocks", "32",
            "--temperature", "0"]
    plain = _run(*argv)
    spec = _run(*argv, "--speculative", "draft", "--draft-model", self_draft, "--num-speculative-tokens", "3")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert json.loads(spec.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert main(["generate", "hi", "--speculative", "draft", "--draft-model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "The draft model could not be loaded" in err and "Traceback" not in err
