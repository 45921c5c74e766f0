"""KV offload across processes: two real ``kvcache serve`` processes sharing a real redis-server (B
reads A's prefix instead of computing it), a restarted server that finds its disk tier's blocks, and
the command line's one-sentence errors for a bad ``--kv-offload``."""

import re
import subprocess
import sys
import time

import httpx
import pytest
from live_server import LiveServer, free_port
from redis_server import RedisServer

pytestmark = pytest.mark.slow
MODEL = "smollm2"
DOC = " ".join(f"Clause {i}: the tenant pays {i * 17 % 23} coins on day {i * 3 % 28} unless it rains." for i in range(40))
QUESTIONS = ["\nQuestion: what is paid in clause 4?\nAnswer:", "\nQuestion: when is clause 9 due?\nAnswer:"]


def complete(server: LiveServer, prompt: str) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", timeout=300,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def tier_metric(server: LiveServer, name: str, tier: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    match = re.search(rf'^kvcache_kv_offload_{name}_total{{tier="{tier}"}} ([0-9.e+-]+)$', text, re.M)
    assert match, f"kvcache_kv_offload_{name} for {tier} missing from /metrics"
    return float(match.group(1))


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.25)


def serve(*args: str) -> LiveServer:
    return LiveServer("--num-blocks", "256", "--served-model-name", MODEL, *args)


def doc_blocks(usage: dict) -> int:
    return usage["prompt_tokens"] // 16 - 2  # the question's few tokens do not fill two blocks


def test_two_servers_share_a_document_through_redis():
    redis = RedisServer()
    a = serve("--kv-offload", redis.url)
    b = serve("--kv-offload", f"host:256MB,{redis.url}")
    try:
        first = complete(a, DOC + QUESTIONS[0])
        blocks = doc_blocks(first["usage"])
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        wait_for(lambda: tier_metric(a, "stores", "redis") >= blocks)
        second = complete(b, DOC + QUESTIONS[1])
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= blocks * 16
        assert tier_metric(b, "hits", "redis") >= blocks and tier_metric(b, "hits", "host") == 0
        assert tier_metric(b, "hit_bytes", "redis") > 0
        prefix_hits = re.search(r"^kvcache_prefix_cache_hits_total ([0-9.]+)$",
                                httpx.get(f"{b.url}/metrics").text, re.M)
        assert float(prefix_hits.group(1)) >= blocks * 16
        # the same answer as A, which computed the document itself
        assert complete(a, DOC + QUESTIONS[1])["choices"][0]["text"] == second["choices"][0]["text"]
    finally:
        a.stop()
        b.stop()
        redis.kill()


def test_a_restarted_server_finds_its_disk_tier(tmp_path):
    spec = f"disk:{tmp_path}:1GB"
    before = serve("--kv-offload", spec)
    try:
        first = complete(before, DOC + QUESTIONS[0])
    finally:
        before.stop()  # SIGTERM: the server shuts down cleanly and writes what its queue holds
    blocks = doc_blocks(first["usage"])
    assert len(list(tmp_path.glob("*.kvb"))) >= blocks
    after = serve("--kv-offload", spec)
    try:
        second = complete(after, DOC + QUESTIONS[1])
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= blocks * 16
        assert tier_metric(after, "hits", "disk") >= blocks
        state = httpx.get(f"{after.url}/state", timeout=30).json()  # the live page's data: blocks by tier
        assert list(state["tier_blocks"].values()).count("disk") >= blocks
        assert state["stats"]["kv_offload"]["disk"]["hits"] >= blocks
    finally:
        after.stop()


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcache", *argv], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("spec, words", [
    ("ssd:4GB", "Cannot read the KV offload tier 'ssd:4GB'"),
    ("host:1GB,host:2GB", "names a tier twice"),
    ("disk:/proc/no/such:1GB", "The disk tier cannot use '/proc/no/such'"),
])
def test_bad_kv_offload_is_one_sentence_and_exit_2(spec, words):
    r = run_cli("generate", "Hi", "--max-tokens", "1", "--kv-offload", spec)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("kvcache generate: ") and words in lines[0], r.stderr


def test_serve_refuses_a_redis_it_cannot_reach():
    r = run_cli("serve", "--port", str(free_port()), "--kv-offload", f"redis://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "Cannot reach Redis at redis://127.0.0.1:" in r.stderr.splitlines()[-1]
