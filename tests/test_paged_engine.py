"""The paged engine's greedy outputs equal the simple path's, whatever the cache does underneath."""

import pytest

from kvcache import SamplingParams
from kvcache.config import SchedulerConfig

pytestmark = pytest.mark.slow

SYSTEM = ("You are a careful assistant. Answer briefly, in plain words, and say when you are unsure. "
          "Never invent facts. Prefer short sentences, cite what you know, and keep every answer polite. ")
PROMPTS = [
    SYSTEM + "Question: what is a cache?",
    SYSTEM + "Question: why is the sky blue?",
    "Write a haiku about memory:",
    SYSTEM + "Question: name a prime number larger than ten.",
    "def add(a, b):",
    "The history of the bicycle begins",
]
PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def run(engine, prompts, params=PARAMS, arrive_every=2):
    """Requests arrive one every ``arrive_every`` steps while the engine keeps stepping."""
    pending = list(enumerate(prompts))
    ids, done, step = {}, {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % arrive_every == 0:
            i, prompt = pending.pop(0)
            ids[engine.add_request(f"q{i}-{id(engine)}-{step}", prompt, params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = [c.token_ids for c in out.outputs]
        step += 1
    return [done[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def baseline(smollm_engine_factory):
    """One request at a time, a big pool, no prefix caching, no chunking: the simple path."""
    engine = smollm_engine_factory(enable_prefix_caching=False, num_blocks=256)
    return [run(engine, [p])[0] for p in PROMPTS]


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def assert_clean(engine):
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_used == 0  # only the prefix cache may remember blocks, and it holds no reference
    assert engine.pool.num_free == engine.pool.num_blocks


def test_continuous_batching_with_prefix_hits(smollm_engine_factory, baseline):
    engine = smollm_engine_factory(num_blocks=256)
    assert run(engine, PROMPTS) == baseline
    stats = engine.stats()
    # requests 1 and 3 arrive after request 0 has written the shared system prompt's full blocks
    tok = engine.tokenizer
    shared = [len(_common_prefix(tok.encode(PROMPTS[0]), tok.encode(PROMPTS[i]))) // 16 for i in (1, 3)]
    assert min(shared) >= 2
    assert stats["prefix_cache_hits"] >= 16 * sum(shared)
    assert stats["prefix_cache_queries"] >= stats["prefix_cache_hits"]
    assert_clean(engine)
    assert run(engine, PROMPTS[:2]) == baseline[:2]  # a second pass, hitting cached blocks


def test_chunked_prefill(smollm_engine_factory, baseline):
    engine = smollm_engine_factory(num_blocks=256, scheduler_config=SchedulerConfig(
        max_num_batched_tokens=24, long_prefill_token_threshold=8))
    assert run(engine, PROMPTS, arrive_every=1) == baseline
    assert_clean(engine)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_forced_preemption(smollm_engine_factory, baseline, mode):
    engine = smollm_engine_factory(num_blocks=14, block_size=8, scheduler_config=SchedulerConfig(
        preemption_mode=mode))
    assert run(engine, PROMPTS, arrive_every=1) == baseline
    assert engine.stats()["num_preemptions"] > 0
    assert_clean(engine)
    assert not engine.runner.host_blocks


def test_parallel_sampling_shares_the_prompt(smollm_engine_factory, baseline):
    engine = smollm_engine_factory(num_blocks=256)
    params = SamplingParams(n=3, max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request("fork", PROMPTS[1], params)
    engine.step()  # prefill, then three samples share the prompt's blocks
    samples = [engine._requests[f"fork#{i}"] for i in range(3)]
    assert samples[0].block_ids == samples[1].block_ids == samples[2].block_ids
    assert all(engine.pool.ref_count(b) == 3 for b in samples[0].block_ids)
    engine.step()  # each writes into the shared partial block: copied on write
    assert len({s.block_ids[-1] for s in samples}) == 3
    assert len({s.block_ids[0] for s in samples}) == 1
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    assert [c.token_ids for c in out.outputs] == [baseline[1][0]] * 3
    assert_clean(engine)


def test_parallel_sampling_with_seeds_is_reproducible(smollm_engine_factory):
    engine = smollm_engine_factory(num_blocks=128)
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7)
    first = run(engine, [PROMPTS[2]], params)[0]
    second = run(engine, [PROMPTS[2]], params)[0]
    assert first == second and len({tuple(t) for t in first}) > 1


def test_abort_returns_blocks_mid_generation(smollm_engine_factory):
    engine = smollm_engine_factory(num_blocks=128)
    rid = engine.add_request(None, PROMPTS[0], PARAMS)
    keep = engine.add_request(None, PROMPTS[2], PARAMS)
    for _ in range(5):
        engine.step()
    assert engine.pool.num_used > 0
    engine.abort(rid)
    stats = engine.stats()
    assert stats["num_requests_running"] == 1
    while engine.has_unfinished_requests():
        engine.step()
    engine.abort(keep)  # already finished: a no-op
    assert_clean(engine)


def test_request_that_cannot_fit_is_rejected_not_retried(smollm_engine_factory):
    engine = smollm_engine_factory(num_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="whole cache has 4"):
        engine.add_request(None, PROMPTS[0], SamplingParams(max_tokens=64))
    assert not engine.has_unfinished_requests()


def test_stats_report_usage_and_fragmentation(smollm_engine_factory):
    engine = smollm_engine_factory(num_blocks=64)
    engine.add_request(None, "Hello there", SamplingParams(max_tokens=8, temperature=0.0))
    engine.step()
    s = engine.stats()
    for key in ("kv_cache_usage", "num_blocks_free", "num_blocks_used", "num_requests_running",
                "num_requests_waiting", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                "fragmentation"):
        assert key in s
    assert s["num_blocks_used"] == 1 and s["kv_cache_usage"] == 1 / 64
    assert 0 < s["fragmentation"] < 1  # one block, partly filled
