"""A finished request can keep its KV for the next one to continue from (a chat's next turn):
only what the new prompt adds is computed, the partial last block included, and the tokens are
those of a fresh run."""

import pytest

from kvcache.config import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def run_to_end(engine, request_id):
    result = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                result = out
    return result


@pytest.fixture(scope="module")
def engines(smollm_engine_factory):
    # no prefix cache, so any reuse can only come from the kept KV
    return (smollm_engine_factory(enable_prefix_caching=False, num_blocks=64),
            smollm_engine_factory(enable_prefix_caching=False, num_blocks=64))


@pytest.mark.slow
def test_next_turn_computes_only_what_it_adds(engines):
    engine, fresh = engines
    first = engine.encode_prompt("Name three rivers of Europe.")
    engine.add_request("t1", first, GREEDY, keep_kv=True)
    out1 = run_to_end(engine, "t1")
    computed = len(first) + len(out1.outputs[0].token_ids) - 1  # the last token was sampled, not computed
    assert engine.stats()["num_requests_kept"] == 1
    assert engine.pool.num_used == -(-computed // 16)

    second = first + list(out1.outputs[0].token_ids) + engine.encode_prompt(" And three of Asia?")
    engine.add_request("t2", second, GREEDY, keep_kv=True, continue_from="t1")
    out2 = run_to_end(engine, "t2")
    assert out2.metrics["num_cached_prompt_tokens"] == computed and computed % 16  # partial block reused
    fresh.add_request("f2", second, GREEDY)
    assert out2.outputs[0].token_ids == run_to_end(fresh, "f2").outputs[0].token_ids

    # a prompt that agrees only on its start adopts only that much
    third = first[:5] + engine.encode_prompt(" rivers of Africa, please.")
    engine.add_request("t3", third, GREEDY, continue_from="t2")
    out3 = run_to_end(engine, "t3")
    assert out3.metrics["num_cached_prompt_tokens"] == 5
    fresh.add_request("f3", third, GREEDY)
    assert out3.outputs[0].token_ids == run_to_end(fresh, "f3").outputs[0].token_ids
    assert engine.stats()["num_requests_kept"] == 0 and engine.pool.num_used == 0


@pytest.mark.slow
def test_kept_kv_is_released_on_request_and_refused_for_n_above_one(engines):
    engine, _ = engines
    engine.add_request("k", engine.encode_prompt("Hello there"), GREEDY, keep_kv=True)
    run_to_end(engine, "k")
    assert engine.pool.num_used > 0
    engine.release_kept("k")
    assert engine.pool.num_used == 0 and engine.stats()["num_requests_kept"] == 0
    engine.add_request("gone", engine.encode_prompt("Hello there again"), GREEDY, continue_from="k")
    assert run_to_end(engine, "gone").metrics["num_cached_prompt_tokens"] == 0
    with pytest.raises(ValueError, match="needs n = 1"):
        engine.add_request("many", "Hi", SamplingParams(n=2, max_tokens=2), keep_kv=True)
