"""A real `kvcache serve --kv-cache-dtype int8` process: /metrics, /state and the live page name the format."""

import re

import pytest

httpx = pytest.importorskip("httpx")

from live_server import LiveServer  # noqa: E402

pytestmark = pytest.mark.slow
NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def server():
    live = LiveServer("--kv-cache-dtype", "int8", "--num-blocks", str(NUM_BLOCKS), "--served-model-name", "smollm2")
    yield live.url
    live.stop()


def test_metrics_state_and_page_name_the_cache_format(server):
    from kvcache.sizing import KVShape, kv_bytes

    out = httpx.post(f"{server}/v1/completions", timeout=120,
                     json={"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert out.status_code == 200 and out.json()["choices"][0]["text"]
    metrics = httpx.get(f"{server}/metrics").text
    assert re.search(r'^kvcache_kv_cache_info\{kv_cache_dtype="int8"\} 1\.0$', metrics, re.M), metrics
    allocated = float(re.search(r"^kvcache_kv_cache_bytes ([0-9.e+]+)$", metrics, re.M).group(1))
    state = httpx.get(f"{server}/state").json()
    block_size = state["block_size"]
    planned = NUM_BLOCKS * kv_bytes(KVShape(30, 3, 64), block_size, 1, "int8", block_size=block_size).total_bytes
    assert allocated == state["stats"]["kv_cache_bytes"] == planned  # SmolLM2: 30 layers, 3 kv heads of 64
    assert state["stats"]["kv_cache_dtype"] == "int8"
    page = httpx.get(f"{server}/").text
    assert "KV cache ${st.kv_cache_dtype}" in page  # the page's header line renders /state's format
