"""Exactness on the real Gemma-3-270M (the packaged Q4_K_M GGUF, run in float32)."""

from pathlib import Path

import pytest
import torch

from kvcache.config import SamplingParams
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import load_model, model_path
from kvcache.runtime.reference import logits_without_cache

pytestmark = pytest.mark.slow

# One prompt longer than the 512-token window of the sliding layers (about 600 tokens).
LONG = " ".join(f"Entry {i}: the {c} lantern in room {i * 7} was lit at {i % 12 + 1} o'clock."
                for i, c in zip(range(26), ["red", "blue", "green", "amber"] * 7))
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Translate to German: the weather is nice today.", LONG]
TEXTS = [
    "Grüße aus Köln! Ça va? ¿Qué tal? 日本語のテキストと中文文本。Привет, мир. مرحبا بالعالم. नमस्ते दुनिया. 안녕하세요",
    "emoji 🎉🔥 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 keycap 1️⃣ and a lone \u200b zero-width space",
    "   leading spaces,\ttabs\t\tand\n\n\n\nnewlines;   runs   of    spaces   \r\n trailing  \n ",
    "def f(x):\n    if x:\n        return {'a': [1, 2, 3]}  # comment\n\treturn None\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "numbers 3.14159 1,000,000 2026-11-23 0x1F and ünïcödé ﬁ ligatures",
]


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3")


@pytest.fixture(scope="module")
def engine(gemma):
    return LLMEngine(loaded=gemma, kv_cache_memory="96MiB", device="cpu")


def _generate(engine, prompts, params):
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i] for i in ids]


def test_the_file_is_gemma3_with_its_5_to_1_pattern(gemma):
    config = gemma.config
    assert config.architecture == "gemma3" and config.num_layers == 18 and config.head_dim == 256
    assert config.layer_windows == tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))
    assert (config.rope_theta, config.rope_local_theta, config.attention_scale) == (1e6, 1e4, 1 / 16)


def test_the_packaged_file_is_assembled_once(gemma):
    path = Path(gemma.source)
    stamp = path.stat().st_mtime_ns
    assert model_path("gemma3") == path and path.stat().st_mtime_ns == stamp  # found, not joined again
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_cached_greedy_equals_recomputation(engine):
    """Four prompts in one continuous batch, one longer than the window, 64 greedy tokens each.

    The recomputation runs prompt + output once, from an empty cache: causal attention makes the
    logits at position p depend on tokens 0..p only, so row p is what a from-scratch greedy step
    after p + 1 tokens sees. Each cached token must be that row's argmax."""
    outputs = _generate(engine, PROMPTS, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    assert len(outputs[-1].prompt_token_ids) > 512
    for out in outputs:
        prompt, cached = out.prompt_token_ids, out.outputs[0].token_ids
        assert len(cached) == 64
        logits = logits_without_cache(engine.model, prompt + cached[:-1], first_row=len(prompt) - 1)
        assert cached == logits.argmax(-1).tolist()


def test_tokenizer_matches_transformers_on_the_same_gguf(gemma):
    transformers = pytest.importorskip("transformers")
    path = Path(gemma.source)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    reloaded = load_model("gemma3").tokenizer  # the converted cache's tokenizer.json this time
    for text in TEXTS + PROMPTS:
        expected = hf.encode(text)
        assert gemma.tokenizer.encode(text) == expected, text
        assert reloaded.encode(text) == expected, text
        assert gemma.tokenizer.decode(expected) == hf.decode(expected, skip_special_tokens=True)
    assert expected[0] == gemma.tokenizer.bos_token_id == 2  # add-bos, as the file says



def test_logits_match_transformers_reading_the_same_gguf(gemma, engine):
    """transformers reads the GGUF on its own (config, dequantized tensors, its norm convention);
    its Gemma3ForCausalLM and ours give the same float32 logits."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(gemma.source)["config"])
    config._attn_implementation = "eager"
    with torch.device("meta"):
        skeleton = transformers.Gemma3ForCausalLM(config)
    tensors = load_gguf_checkpoint(gemma.source, return_tensors=True, model_to_load=skeleton)["tensors"]
    hf = transformers.Gemma3ForCausalLM(config)
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    hf.tie_weights()
    ids = gemma.tokenizer.encode(PROMPTS[2] * 3)
    with torch.no_grad():
        expected = hf.eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits_without_cache(engine.model, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("source", ["--model", "--preset"])
def test_the_planner_matches_what_the_engine_holds_after_a_long_prefill(gemma, source):
    import json
    import subprocess
    import sys

    from kvcache.cache.spec import pool_block_bytes
    n = 1100  # over twice the window
    what = str(gemma.source) if source == "--model" else "gemma-3-270m"
    out = subprocess.run([sys.executable, "-m", "kvcache", "size", source, what, "--seq-len", str(n + 1),
                          "--dtype", "fp32", "--json"], capture_output=True, text=True, check=True)
    planned = json.loads(out.stdout)["bytes"]
    engine = LLMEngine(loaded=gemma, kv_cache_memory="64MiB", device="cpu", enable_prefix_caching=False)
    ids = (gemma.tokenizer.encode(LONG) * 2)[:n]
    engine.add_request("long", ids, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while not engine.scheduler.running or engine.scheduler.running[0].num_computed_tokens <= n:
        engine.step()  # the prefill, then one decode step (which gives back what the window left)
    held = engine.stats()["kv_bytes_used"]
    groups = engine.stats()["groups"]
    one_page = pool_block_bytes(engine.storage.groups, engine.storage.block_size)  # one block of one group
    # every group holds at most one partly filled block beyond what the planner counts
    assert planned <= held <= planned + len(groups) * one_page, (planned, held, groups)
