"""Eviction policies in the real engine (SmolLM2) and against recomputation over the kept tokens.

* a budget that holds the whole sequence is exactly the full engine, token for token;
* under a small budget the blocks a request holds stay bounded and evicted blocks go back;
  prefix caching, n > 1 forks and preemption (swap, recompute) keep working;
* with a one-layer model, every step's logits under eviction equal a fresh pass over exactly the
  kept tokens at their original positions (so masks, slot reads and RoPE positions are right);
  with three layers, the fast attention equals the reference attention under eviction;
* bad budgets and unknown policies are one clear error (engine ValueError, CLI exit 2).
"""

import subprocess
import sys

import pytest
import torch

from kvcache.cache.policies import KVPolicy
from kvcache.config import ModelConfig, SamplingParams, SchedulerConfig
from kvcache.engine.engine import LLMEngine, build_model
from kvcache.models.attention import paged_attention, reference_attention
from kvcache.models.loader import LoadedModel
from kvcache.runtime.plan import ScheduledSequence
from kvcache.runtime.reference import logits_without_cache
from kvcache.runtime.scoring import policy_step_logits

PROMPTS = ["The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
           "combined movable metal type, oil-based ink and a screw press into one system. Within fifty "
           "years presses were running in more than two hundred cities across Europe.",
           "def quicksort(values):\n    if len(values) < 2:\n        return values\n    pivot = values[0]\n"
           "    smaller = [v for v in values[1:] if v < pivot]\n"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def generate(engine: LLMEngine, prompts, params, each_step=None) -> list[list[list[int]]]:
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [list(c.token_ids) for c in out.outputs]
        if each_step:
            each_step(engine)
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def full_tokens(smollm_engine_factory):
    return generate(smollm_engine_factory(num_blocks=128), PROMPTS, GREEDY)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_a_budget_holding_the_sequence_is_exactly_full(smollm_engine_factory, full_tokens, policy):
    engine = smollm_engine_factory(num_blocks=128)
    longest = max(len(engine.encode_prompt(p)) for p in PROMPTS) + GREEDY.max_tokens
    for budget in (longest, 1.0):
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, kv_policy=policy, kv_budget=budget)
        assert generate(engine, PROMPTS, params) == full_tokens
    assert engine.stats()["num_tokens_evicted"] == 0


def _bounded(budget: int, chunk: int, block_size: int):
    """A check after each step: every evicting request holds at most the budget plus a step."""
    most = -(-(budget + chunk) // block_size) + 1
    seen = []

    def check(engine: LLMEngine) -> None:
        for r in engine.scheduler.running:
            if r.kv_state is not None:
                assert engine.kv.num_blocks_held(r) <= most, (r.request_id, r.block_tables)
                seen.append(engine.kv.num_blocks_held(r))
    return check, seen


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_small_budgets_bound_the_blocks_and_give_them_back(smollm_engine_factory, policy):
    engine = smollm_engine_factory(num_blocks=128, block_size=8,
                                   scheduler_config=SchedulerConfig(long_prefill_token_threshold=16))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, kv_policy=policy, kv_budget=24)
    check, seen = _bounded(24, 16, 8)
    out = generate(engine, PROMPTS, params, check)
    assert all(len(o[0]) == 40 for o in out) and seen
    stats = engine.stats()
    assert stats["num_tokens_evicted"] > 0 and stats["num_blocks_evicted"] > 0
    assert engine.pool.num_used == 0  # every block back (some still findable as cached prefixes)


@pytest.mark.slow
def test_prefix_hits_around_an_evicting_request_are_exact(smollm_engine_factory, full_tokens):
    """An evicting request copies a cached block before changing it, so the prompt's blocks stay
    findable (those it found, and those it registered itself before evicting), and a later request
    that finds them computes exactly what it would from scratch. What it changed is never offered."""
    engine = smollm_engine_factory(num_blocks=128, block_size=8)
    assert generate(engine, PROMPTS, GREEDY) == full_tokens
    hits = engine.kv.prefix_cache_hits
    evicting = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, kv_policy="h2o", kv_budget=20)
    generate(engine, PROMPTS, evicting)
    assert engine.stats()["num_tokens_evicted"] > 0 and engine.kv.prefix_cache_hits > hits
    hits = engine.kv.prefix_cache_hits
    assert generate(engine, PROMPTS, GREEDY) == full_tokens
    assert engine.kv.prefix_cache_hits > hits
    fresh = smollm_engine_factory(num_blocks=128, block_size=8)
    generate(fresh, PROMPTS, evicting)
    assert fresh.kv.prefix_cache_hits == 0
    assert generate(fresh, PROMPTS, GREEDY) == full_tokens and fresh.kv.prefix_cache_hits > 0


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_forks_share_then_evict_on_their_own(smollm_engine_factory, policy):
    # two engines: a prefix hit would skip the prompt's queries, whose weights h2o and snapkv rank by
    one = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, kv_policy=policy, kv_budget=24)
    single = generate(smollm_engine_factory(num_blocks=128, block_size=8), PROMPTS[:1], one)[0][0]
    engine = smollm_engine_factory(num_blocks=128, block_size=8)
    two = generate(engine, PROMPTS[:1], SamplingParams(n=2, max_tokens=20, temperature=0.0, ignore_eos=True,
                                                       kv_policy=policy, kv_budget=24))[0]
    assert two == [single, single]  # greedy samples evict alike and equal the single request
    assert engine.pool.num_used == 0


@pytest.mark.slow
def test_preemption_by_swap_keeps_the_kept_tokens_and_recompute_starts_over(smollm_engine_factory):
    # streaming: what it keeps depends on positions alone, not on weights a different batch rounds apart
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, kv_policy="streaming", kv_budget=24)
    chunks = SchedulerConfig(long_prefill_token_threshold=16)  # the same prefill chunks: the same evictions
    roomy = generate(smollm_engine_factory(num_blocks=128, block_size=8, scheduler_config=chunks), PROMPTS * 2, params)
    for mode in ("swap", "recompute"):
        engine = smollm_engine_factory(num_blocks=12, block_size=8,
                                       scheduler_config=SchedulerConfig(preemption_mode=mode,
                                                                        long_prefill_token_threshold=16))
        out = generate(engine, PROMPTS * 2, params)
        assert engine.stats()["num_preemptions"] > 0 and engine.pool.num_used == 0
        if mode == "swap":  # the swapped request comes back with the same live tokens
            assert out == roomy
        else:
            assert all(len(o[0]) == 32 for o in out)


@pytest.mark.slow
def test_engine_rejects_what_it_cannot_run(smollm, smollm_engine_factory):
    with pytest.raises(ValueError, match="Unknown kv_policy 'lru'"):
        LLMEngine(loaded=smollm, num_blocks=16, kv_policy="lru")
    with pytest.raises(ValueError, match="needs a kv_budget"):
        LLMEngine(loaded=smollm, num_blocks=16, kv_policy="h2o")
    with pytest.raises(ValueError, match="cannot \\(its key scales cover whole blocks\\)"):
        LLMEngine(loaded=smollm, num_blocks=16, kv_cache_dtype="int4", kv_policy="streaming", kv_budget=0.5)
    engine = smollm_engine_factory(num_blocks=32)
    with pytest.raises(ValueError, match="more than the 4 attention sinks"):
        engine.add_request(None, PROMPTS[0], SamplingParams(kv_policy="h2o", kv_budget=3))
    with pytest.raises(ValueError, match="kv_budget needs a kv_policy that evicts"):
        engine.add_request(None, PROMPTS[0], SamplingParams(kv_budget=30))
    assert not engine.has_unfinished_requests() and engine.pool.num_used == 0


# --- against recomputation, on tiny random models ------------------------------------------------

def _tiny(layers: int) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(layers)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500.0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return build_model(LoadedModel(config, weights, None, "hf"), "float32", torch.device("cpu"))


def _fresh_pass(model, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """Logits of one pass over ``tokens`` at these positions, in an empty cache, causal in list order."""
    from kvcache.cache.spec import group_layers, layer_specs
    from kvcache.cache.storage import KVCache
    from kvcache.runtime.runner import ModelRunner
    groups = group_layers(layer_specs(model.config, "fp32"))
    storage = KVCache(groups, -(-len(tokens) // 4), 4)
    runner = ModelRunner(model, storage)
    seq = ScheduledSequence("ref", tuple(tokens), 0, (tuple(range(storage.num_blocks)),), True)
    t, _, meta = runner.prepare((seq,))
    hidden = model(t, torch.tensor(positions), meta, storage.layers)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_one_layer_logits_equal_a_fresh_pass_over_exactly_the_kept_tokens(policy):
    """With one layer a token's K and V depend on nothing but the token and its position, so the
    step's logits must equal a fresh pass over [kept tokens, step tokens] at their own positions."""
    model = _tiny(1)
    text = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    kv_policy = KVPolicy(policy, 30, sinks=2, window=4, kernel=3)
    checked = 0
    with torch.inference_mode():
        for start, logits, state in policy_step_logits(model, text, "fp32", kv_policy, step=5, block_size=4):
            kept = sorted(p for p in state.groups[0].positions if p < start)  # what the step attended to
            step = list(range(start, start + len(logits)))
            if len(kept) < start:
                checked += 1
                assert len(kept) <= 30
            ref = _fresh_pass(model, [text[p] for p in kept + step], kept + step)[-len(step):]
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert checked > 10


def test_fast_attention_equals_the_reference_under_eviction():
    model = _tiny(3)
    text = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    policy = KVPolicy("streaming", 25, sinks=2)
    with torch.inference_mode():
        fast = [logits for _, logits, _ in policy_step_logits(model, text, "fp32", policy, step=7, block_size=4)]
        model.attention_fn = reference_attention
        slow = [logits for _, logits, _ in policy_step_logits(model, text, "fp32", policy, step=7, block_size=4)]
        model.attention_fn = paged_attention
    torch.testing.assert_close(torch.cat(fast), torch.cat(slow), rtol=1e-4, atol=1e-4)
    full = logits_without_cache(model, text)
    assert not torch.allclose(torch.cat(fast)[-7:], full[-7:], atol=1e-3)  # it did evict


# --- errors a person sees --------------------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["generate", "hi", "--kv-policy", "lru", "--kv-budget", "64"], "Unknown kv_policy 'lru'"),
    (["generate", "hi", "--kv-policy", "h2o", "--kv-budget", "lots"], "--kv-budget 'lots' is not a number"),
    (["generate", "hi", "--kv-policy", "h2o", "--kv-budget", "0"], "--kv-budget '0' must be"),
    (["generate", "hi", "--kv-policy", "h2o", "--kv-budget", "150%"], "--kv-budget '150%' must be"),
    (["perplexity", "/dev/null", "--kv-policy", "snapkv"], "needs a kv_budget"),
    (["perplexity", "/dev/null", "--kv-budget", "0.2"], "--kv-budget needs a --kv-policy that evicts"),
])
def test_cli_errors_are_one_sentence_and_exit_2(argv, words):
    r = subprocess.run([sys.executable, "-m", "kvcache", *argv], capture_output=True, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], err


def test_hybrid_model_evicts_in_its_global_group_only():
    """Gemma-3's pattern: the policy governs the full-attention group; the sliding groups keep their
    windows and offsets of 0. Fast attention equals the reference under eviction, and the engine
    runs every policy to the end with every block back."""
    from test_gemma3 import _hf_model, _loaded
    loaded = _loaded(_hf_model("mqa-window"))  # windows of 5, two global layers
    model = build_model(loaded, "float32", torch.device("cpu"))
    text = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(7)).tolist()
    policy = KVPolicy("streaming", 16, sinks=2)
    with torch.inference_mode():
        runs = []
        for attention in (paged_attention, reference_attention):
            model.attention_fn = attention
            steps = list(policy_step_logits(model, text, "fp32", policy, step=6, block_size=4))
            runs.append(torch.cat([logits for _, logits, _ in steps]))
        model.attention_fn = paged_attention
    from kvcache.cache.spec import group_layers, layer_specs
    state = steps[-1][2]
    full = {g.group_id for g in group_layers(layer_specs(model.config, "fp32")) if g.spec.window is None}
    assert len(full) == 1 and set(state.groups) == full and all(state.evicted(g) > 0 for g in full)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)
    for name in ("streaming", "h2o", "snapkv"):
        engine = LLMEngine(loaded=loaded, num_blocks=64, block_size=4)
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, kv_policy=name, kv_budget=12)
        out = generate(engine, [text[:25]], params)
        assert len(out[0][0]) == 30 and engine.stats()["num_tokens_evicted"] > 0 and engine.pool.num_used == 0


def test_full_in_policy_steps_equals_one_pass():
    """The policy scorer with nothing to evict (policy full, or a budget holding the text) computes
    what one pass does: the perplexity driver adds no error of its own."""
    model = _tiny(2)
    text = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(9)).tolist()
    with torch.inference_mode():
        for policy in (KVPolicy("full"), KVPolicy("h2o", 50)):
            steps = list(policy_step_logits(model, text, "fp32", policy, step=16, block_size=4))
            assert all(state is None for _, _, state in steps)
            torch.testing.assert_close(torch.cat([logits for _, logits, _ in steps]),
                                       logits_without_cache(model, text), rtol=1e-5, atol=1e-5)
