"""Exactness on the real embedded model, SmolLM2-135M-Instruct (its Q4_1 weights as the GGUF holds them,
float32 activations)."""

import pytest
import torch

from kvcache import SamplingParams
from kvcache.models.loader import save_hf_folder
from kvcache.runtime.reference import greedy_without_cache, logits_without_cache

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "List three colours:",
]
GREEDY_64 = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def _generate(engine, prompts, params):
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def engine(smollm_engine_factory):
    return smollm_engine_factory()


def test_cached_greedy_is_token_identical_to_recomputation(engine):
    outputs = _generate(engine, PROMPTS, GREEDY_64)  # all four in one continuous batch
    for out in outputs:
        cached = out.outputs[0].token_ids
        assert len(cached) == 64
        assert cached == greedy_without_cache(engine.model, out.prompt_token_ids, 64)


def test_real_weights_match_transformers(smollm, engine):
    transformers = pytest.importorskip("transformers")
    c = smollm.config
    cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                   intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                   num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                   head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                                   rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(smollm.float_weights(), strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing)
    hf.tie_weights()
    ids = engine.tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits_without_cache(engine.model, ids), expected, atol=1e-4, rtol=1e-4)


def test_batch_of_mixed_lengths_equals_one_at_a_time(engine):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in _generate(engine, PROMPTS, params)]
    alone = [_generate(engine, [p], params)[0].outputs[0].token_ids for p in PROMPTS]
    assert together == alone


def test_planner_bytes_equal_the_cache_after_a_prefill(engine):
    rid = engine.add_request("bytes", PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0))
    engine.step()  # the prefill
    request = engine._requests["bytes#0"]
    tokens = request.num_computed_tokens
    assert tokens == request.num_prompt_tokens
    held = engine.storage.bytes_held(tokens)  # read off the allocated tensors
    assert held == engine.kv_bytes_for_tokens(tokens) == 2 * 30 * 3 * 64 * tokens * 4
    assert engine.storage.nbytes == engine.storage.planned_nbytes()
    assert len(request.block_ids) == -(-tokens // engine.cache_config.block_size)
    engine.abort(rid)
    assert engine.pool.num_used == 0


def test_hf_folder_gives_the_same_tokens(smollm, engine, tmp_path):
    from kvcache import LLM
    save_hf_folder(tmp_path / "smollm2", smollm.config, smollm.weights, smollm.tokenizer)
    llm = LLM(model=str(tmp_path / "smollm2"), num_blocks=64)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    assert llm.tokenizer.encode(PROMPTS[0]) == engine.tokenizer.encode(PROMPTS[0])
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)] == \
        [o.outputs[0].token_ids for o in _generate(engine, PROMPTS[:2], params)]


def test_chat_template_and_stop(smollm_engine_factory):
    from kvcache.engine.engine import LLM
    llm = LLM.__new__(LLM)
    llm.engine = smollm_engine_factory(num_blocks=64)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert "Paris" in out.outputs[0].text and out.outputs[0].finish_reason == "stop"
    assert out.prompt_token_ids[0] == 1  # <|im_start|> is one special token
    stopped = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=30, temperature=0.0, stop=[" 7"]))[0]
    assert stopped.outputs[0].text.endswith("6,") and stopped.outputs[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=123)
    a = _generate(engine, [PROMPTS[0]], params)[0].outputs[0].token_ids
    b = _generate(engine, [PROMPTS[0]], params)[0].outputs[0].token_ids
    assert a == b


@pytest.mark.parametrize("bad,message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_params_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_prompt_longer_than_context_is_rejected(engine):
    with pytest.raises(ValueError, match="context"):
        engine.add_request(None, [5] * 9000, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(None, "", SamplingParams())
    assert not engine.has_unfinished_requests()
