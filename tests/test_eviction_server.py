"""The server takes kv_policy / kv_budget as request extensions: a bad one is a 400 that names it, a
good one evicts (and /metrics and /state say so)."""

import re

import pytest

httpx = pytest.importorskip("httpx")

from live_server import LiveServer  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2"


@pytest.fixture(scope="module")
def server():
    live = LiveServer("--num-blocks", "256", "--served-model-name", MODEL, "--kv-policy", "streaming",
                      "--kv-budget", "0.5")
    yield live.url
    live.stop()


def _complete(server, **extra):
    body = {"model": MODEL, "prompt": "Once upon a time, in a land far away, there lived a king who had three "
                                      "daughters and a garden full of apple trees.", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(f"{server}/v1/completions", json=body, timeout=120)


@pytest.mark.parametrize("extra,param,words", [
    ({"kv_policy": "lru"}, "kv_policy", "kv_policy must be one of full, streaming, h2o, snapkv"),
    ({"kv_policy": "h2o", "kv_budget": 0}, "kv_budget", "kv_budget must be"),
    ({"kv_policy": "h2o", "kv_budget": 2.5}, "kv_budget", "kv_budget must be"),
    ({"kv_policy": "h2o", "kv_budget": "half"}, "kv_budget", "kv_budget"),
    ({"kv_policy": "h2o", "kv_budget": 3}, None, "more than the 4 attention sinks"),
])
def test_bad_policies_and_budgets_are_400s(server, extra, param, words):
    r = _complete(server, **extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and (param is None or error.get("param") == param), error


def test_policies_evict_and_the_server_says_so(server):
    for extra in ({"kv_policy": "h2o", "kv_budget": 16}, {"kv_policy": "snapkv", "kv_budget": 0.3}, {}):
        r = _complete(server, **extra)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24, r.text
    metrics = httpx.get(f"{server}/metrics").text
    evicted = float(re.search(r"^kvcache_kv_tokens_evicted_total ([0-9.e+]+)$", metrics, re.M).group(1))
    assert evicted > 0
    stats = httpx.get(f"{server}/state").json()["stats"]
    assert stats["kv_policy"] == "streaming" and stats["num_tokens_evicted"] == evicted
    assert stats["num_blocks_used"] == 0
