"""The OpenAI-compatible server as a real process on loopback, driven by the official openai client."""

import json
import os
import re
import shutil
import subprocess
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from live_server import LiveServer  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "test-key"
MODEL = "smollm2"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    live = LiveServer("--num-blocks", "512", "--api-key", KEY, "--served-model-name", MODEL,
                      "--max-body-bytes", "200000")
    yield live.url
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _metric(server, name):
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_and_usage(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out.choices[0].text.strip() and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 8
    assert out.usage.model_extra["kv_cache_peak_bytes"] > 0


def test_chat(client):
    out = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=30,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"


def test_streaming_equals_whole_and_reports_usage(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 20
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**chat).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **chat)
                       if c.choices)
    assert streamed == whole


def test_n_samples_and_seed(client):
    kwargs = dict(model=MODEL, prompt="My favourite animal is", max_tokens=10, temperature=1.0, n=3, seed=11)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    greedy = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    streamed = list(client.completions.create(stream=True, **kwargs))
    texts = ["", "", ""]
    for c in streamed:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [c.text for c in a.choices]


def test_stop_sequences(client):
    out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert out.choices[0].text.endswith("6,") and out.choices[0].finish_reason == "stop"


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


BAD = [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"\xff\xfe\x00garbage", "application/json", 400, "UTF-8"),
    (json.dumps({"prompt": "hi"}).encode(), "application/json", 400, "model"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}).encode(), "application/json", 400, "max_tokens"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), "application/json", 404, "does not exist"),
    (json.dumps({"model": MODEL, "prompt": "hi " * 9000}).encode(), "application/json", 400, "context length"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 100000}).encode(), "application/json", 400, "context length"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 0}).encode(), "application/json", 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "n": 1000}).encode(), "application/json", 400, "n"),
    (json.dumps({"model": MODEL, "prompt": "hi", "temperature": -1}).encode(), "application/json", 400, "temperature"),
    (json.dumps({"model": MODEL, "prompt": "hi", "top_p": 0}).encode(), "application/json", 400, "top_p"),
    (json.dumps([1, 2]).encode(), "application/json", 400, "JSON object"),
    (b"x" * 300_000, "application/json", 413, "larger than"),
]


@pytest.mark.parametrize("body,ctype,status,message", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, client, body, ctype, status, message):
    r = httpx.post(f"{server}/v1/completions", content=body, timeout=30,
                   headers={"content-type": ctype, "authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message.lower() in error["message"].lower() or message == error.get("param")
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices


def test_bad_chat_messages(server):
    headers = {"authorization": f"Bearer {KEY}"}
    for body in ({"model": MODEL, "messages": []}, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": MODEL, "messages": "hello"}):
        r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_dropped_stream_returns_its_blocks(server):
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Tell me a long story about the sea.", "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in seen)
        assert _metric(server, "kvcache_kv_blocks_used") > 0
    deadline = time.time() + 20
    while time.time() < deadline and _metric(server, "kvcache_kv_blocks_used") > 0:
        time.sleep(0.2)
    assert _metric(server, "kvcache_kv_blocks_used") == 0  # only the prefix cache may remember blocks
    assert _metric(server, "kvcache_num_requests_running") == 0
    state = httpx.get(f"{server}/state", headers=AUTH).json()
    assert all(o < 0 for o in state["owners"])


def test_many_clients_share_the_batch(server, client):
    results, errors = [], []

    def one(i):
        try:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=f"Count to {i + 3}:", max_tokens=12, temperature=0, stream=True) if c.choices)
            results.append(text)
        except Exception as err:  # collected and asserted below
            errors.append(err)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 8


def test_metrics_names(server, client):
    client.completions.create(model=MODEL, prompt="Metrics", max_tokens=3)
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    for name in ("kvcache_kv_cache_usage_ratio", "kvcache_kv_blocks_free", "kvcache_num_requests_running",
                 "kvcache_num_requests_waiting", "kvcache_prefix_cache_queries_total",
                 "kvcache_prefix_cache_hits_total", "kvcache_num_preemptions_total",
                 "kvcache_time_to_first_token_seconds_bucket", "kvcache_time_per_output_token_seconds_count"):
        assert name in text
    assert _metric(server, "kvcache_kv_blocks_free") == 512 - _metric(server, "kvcache_kv_blocks_used")
    # SmolLM2 is one full-attention cache group; bytes used are its blocks' bytes
    assert re.search(r'^kvcache_kv_group_blocks_used\{group="0",window="full"\} [0-9.]+$', text, re.M), text
    assert _metric(server, "kvcache_kv_bytes_used") % (16 * 46080) == 0
    assert float(re.search(r"^kvcache_time_to_first_token_seconds_count ([0-9.]+)$", text, re.M).group(1)) > 0


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (make test installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def test_live_page_in_headless_chromium(server, client, tmp_path):
    chromium = _chromium()
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "A long tale:", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path}",
             "--virtual-time-budget=5000", "--dump-dom", f"{server}/#key={KEY}"],
            capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom
    assert dom.count('class="blk') == 512
    assert len(re.findall(r'class="blk[^"]*used', dom)) >= 1  # the streaming request's blocks, coloured
    used = int(re.search(r'id="blocks-used">(\d+)<', dom).group(1))
    free = int(re.search(r'id="blocks-free">(\d+)<', dom).group(1))
    assert used >= 1 and used + free == 512
    assert re.search(r'id="running">1<', dom)
