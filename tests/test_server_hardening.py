"""Server hardening: one request can never hurt another, and a client that leaves frees its blocks.

Each numbered finding of the adversarial probe is reproduced against a real server process and
shown fixed; a hypothesis fuzz test then throws random bodies at it while a long stream runs.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from live_server import LiveServer  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "hardening-key"
MODEL = "smollm2"
AUTH = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
NUM_BLOCKS = 64  # 1,024 tokens of KV: far less than the 8,192-token context
LONG_PROMPT = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"


@pytest.fixture(scope="module")
def server():
    live = LiveServer("--num-blocks", str(NUM_BLOCKS), "--api-key", KEY, "--served-model-name", MODEL,
                      "--header-timeout", "2", "--max-prompt-chars", "200000")
    yield live
    live.stop()


def post(server, path: str, body, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers=AUTH, timeout=timeout)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))


def wait_idle(server, seconds: float = 20) -> None:
    """Every block back in the pool (prefix cache aside) and nothing running or waiting."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if metric(server, "kvcache_kv_blocks_used") == 0 and metric(server, "kvcache_num_requests_running") == 0 \
                and metric(server, "kvcache_num_requests_waiting") == 0:
            return
        time.sleep(0.1)
    pytest.fail("the server still holds blocks or requests")


def assert_serving(server) -> None:
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Still there?", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def is_error_object(r: httpx.Response) -> bool:
    error = r.json().get("error", {})
    return isinstance(error.get("message"), str) and "type" in error and "Traceback" not in r.text


class LongStream:
    """A streaming request of 200 tokens from another user, read in a thread."""

    def __init__(self, server) -> None:
        self.text, self.done, self.error = "", False, None
        body = {"model": MODEL, "prompt": "Write a long story about a lighthouse.", "max_tokens": 200,
                "ignore_eos": True, "temperature": 0, "stream": True}
        self.thread = threading.Thread(target=self._read, args=(server, body))
        self.thread.start()

    def _read(self, server, body) -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=300) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            self.error = chunk["error"]
                        else:
                            self.text += chunk["choices"][0]["text"]
        except Exception as err:  # asserted by finish()
            self.error = err

    def finish(self) -> None:
        self.thread.join(300)
        assert self.done and self.error is None, self.error


# --- finding 1: one request disabled the server until restart -------------------------------------

def test_seed_outside_64_bits_is_refused_and_leaves_nothing_behind(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 1180591620717411303424})
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
    wait_idle(server)
    assert_serving(server)


# --- finding 2: any user could fail every other user's requests ----------------------------------

POISON = [
    {"model": MODEL, "prompt": "hi", "temperature": 1e-38, "max_tokens": 4},
    {"model": MODEL, "prompt": "hi", "top_p": 1e-320, "max_tokens": 4},
    {"model": MODEL, "prompt": "hi", "seed": 18446744073709551615, "n": 2, "max_tokens": 4},
    {"model": MODEL, "prompt": "hi", "temperature": 1e-30, "top_k": 1, "top_p": 5e-324, "n": 3, "max_tokens": 4},
]


def test_hostile_sampling_parameters_hurt_nobody(server):
    stream = LongStream(server)
    time.sleep(1.0)
    for body in POISON:
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
    salted = post(server, "/v1/completions", '{"model": "%s", "prompt": "%s", "cache_salt": "\\ud800"}'
                  % (MODEL, LONG_PROMPT))
    assert salted.status_code == 400 and is_error_object(salted)
    stream.finish()
    wait_idle(server)


def test_vanishing_temperature_is_greedy(server):
    greedy = post(server, "/v1/completions", {"model": MODEL, "prompt": "The sky is", "max_tokens": 6,
                                              "temperature": 0}).json()["choices"][0]["text"]
    tiny = post(server, "/v1/completions", {"model": MODEL, "prompt": "The sky is", "max_tokens": 6,
                                            "temperature": 1e-38, "seed": 3}).json()["choices"][0]["text"]
    assert tiny == greedy


# --- finding 3: an abandoned non-streaming request held its blocks while tokens flowed ------------

def test_abandoned_non_streaming_request_is_freed_within_a_second(server):
    body = {"model": MODEL, "prompt": "Tell me everything about the sea.", "max_tokens": 800, "ignore_eos": True}
    for _ in range(3):
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/completions", body, timeout=1.5)
    assert metric(server, "kvcache_num_requests_running") <= 1  # the last one may still be noticed
    wait_idle(server, seconds=1.5)


# --- finding 4: tokenizing and templates on the event loop ---------------------------------------

def test_health_answers_while_a_huge_prompt_is_tokenized(server):
    latencies: list[float] = []
    result: dict[str, httpx.Response] = {}

    def big():
        result["r"] = post(server, "/v1/completions", {"model": MODEL, "prompt": "word, " * 33000}, timeout=120)
    worker = threading.Thread(target=big)
    worker.start()
    while worker.is_alive():
        t = time.perf_counter()
        httpx.get(f"{server.url}/health", timeout=30)
        latencies.append(time.perf_counter() - t)
        time.sleep(0.02)
    assert result["r"].status_code == 400 and "no room" in result["r"].json()["error"]["message"]
    assert max(latencies) < 1.5, latencies  # the event loop was never held for long


def test_prompt_and_message_limits_name_the_limit(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 200001})
    assert r.status_code == 400 and "at most 200000" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}] * 1025})
    assert r.status_code == 400 and "At most 1024 messages" in r.json()["error"]["message"]


# --- finding 5: no cap on stop strings -------------------------------------------------------------

@pytest.mark.parametrize("stop,n,limit", [([f"s{i}" for i in range(17)], 1, "At most 16 stop strings"),
                                          (["x" * 257], 1, "at most 256 characters"),
                                          (["a", "b", "c", "d", "e"], 16, "n x (number of stop strings)")])
def test_stop_strings_are_capped(server, stop, n, limit):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": stop, "n": n})
    assert r.status_code == 400 and limit in r.json()["error"]["message"]


# --- finding 6: plain-text 500s ----------------------------------------------------------------------

@pytest.mark.parametrize("path,raw", [
    ("/v1/completions", '{"model": "m", "prompt": ' + "[" * 10000 + "]" * 10000 + "}"),
    ("/v1/completions", '{"model": "%s", "prompt": "caf\\ud800e"}' % MODEL),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % MODEL),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi"}'),
])
def test_unreadable_text_is_a_400_error_object(server, path, raw):
    r = post(server, path, raw)
    assert r.status_code == 400 and is_error_object(r), r.text
    assert_serving(server)


# --- finding 7: a chat without max_tokens on a small pool -------------------------------------------

def test_chat_without_max_tokens_fits_the_pool(server):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
             timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    wait_idle(server)


# --- finding 8: routes without the key, empty salt, slow headers, uploads abandoned ----------------

@pytest.mark.parametrize("path", ["/state", "/metrics", "/openapi.json", "/v1/models"])
def test_every_route_but_health_and_page_needs_the_key(server, path):
    r = httpx.get(f"{server.url}{path}")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/").status_code == 200


def test_empty_salt_is_refused(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT, "cache_salt": ""})
    assert r.status_code == 400 and "cache_salt" in r.json()["error"]["message"]


def test_slow_headers_are_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(0.3)
        start, closed = time.time(), False
        while not closed and time.time() - start < 8:
            try:
                closed = s.recv(1) == b""
            except socket.timeout:
                try:
                    s.sendall(b"X-Slow: 1\r\n")  # a header now and then, never the blank line
                except OSError:
                    closed = True
            except OSError:
                closed = True
        assert closed and time.time() - start < 5, "a connection with unfinished headers was kept open"


def test_client_leaving_during_upload_logs_no_traceback(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"model\": ".encode())
        time.sleep(0.3)
    time.sleep(0.5)
    assert_serving(server)
    assert "Traceback" not in server.log()


# --- the engine itself: a failing request ends alone ------------------------------------------------

def test_failure_inside_a_step_ends_that_request_alone(smollm_engine_factory):
    from kvcache.config import SamplingParams

    engine = smollm_engine_factory(num_blocks=64)
    params = SamplingParams(max_tokens=8, temperature=0)
    engine.add_request("good", "The capital of France is", params)
    engine.add_request("bad", "Once upon a time", params)
    detok = engine._groups["bad"].detokenizers[0]

    def explode(token):
        raise RuntimeError("injected failure")
    detok.add = explode  # a fault injected into one request's output path
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["bad"].error and finished["bad"].outputs[0].finish_reason == "error"
    assert finished["good"].error is None and len(finished["good"].outputs[0].token_ids) == 8
    assert engine.pool.num_used == 0 and not engine._groups


def test_abort_all_leaves_no_orphan(smollm_engine_factory):
    from kvcache.config import SamplingParams

    engine = smollm_engine_factory(num_blocks=64)
    for i in range(3):
        engine.add_request(f"r{i}", "Tell me a story", SamplingParams(max_tokens=50, n=2, temperature=1, seed=i))
    engine.step()
    engine.step()
    assert sorted(engine.abort_all("test")) == ["r0", "r1", "r2"]
    assert engine.pool.num_used == 0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,words", [
    ({"seed": 1 << 64}, "seed"), ({"seed": -(1 << 63) - 1}, "seed"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"top_p": float("nan")}, "top_p"),
    ({"cache_salt": ""}, "cache_salt"), ({"cache_salt": "\ud800"}, "cache_salt"), ({"stop": ["\udc00"]}, "stop"),
    ({"n": True}, "n"), ({"max_tokens": 2.5}, "max_tokens"), ({"logprobs": 21}, "logprobs"),
])
def test_add_request_refuses_bad_params_and_leaves_nothing(smollm_engine_factory, kwargs, words):
    from kvcache.config import SamplingParams

    engine = smollm_engine_factory(num_blocks=64)
    with pytest.raises(ValueError, match=words):
        engine.add_request("x", "hi", SamplingParams(**kwargs))
    with pytest.raises(ValueError):
        engine.add_request("y", "caf\ud800", SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("z", [1, 2.5], SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("w", "hi", SamplingParams(stop_token_ids=[10**9]))
    assert not engine.has_unfinished_requests() and not engine._groups and engine.pool.num_used == 0


# --- fuzz: random bodies while another user streams --------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False), st.text(max_size=20))
FIELDS = {
    "model": st.one_of(st.just(MODEL), st.text(max_size=10), scalars),
    "prompt": st.one_of(st.text(max_size=60), st.lists(st.integers(-5, 60000), max_size=8), scalars),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                                          "content": st.one_of(st.text(max_size=40), scalars)}),
                                   max_size=3), scalars),
    "max_tokens": st.one_of(st.integers(-2, 6), scalars),
    "n": st.one_of(st.integers(-1, 4), scalars),
    "temperature": st.one_of(st.floats(0, 2), scalars),
    "top_p": st.one_of(st.floats(0, 1), scalars),
    "top_k": st.one_of(st.integers(-3, 100), scalars),
    "seed": st.one_of(st.integers(-(2**65), 2**65), scalars),
    "stop": st.one_of(st.lists(st.text(max_size=5), max_size=4), scalars),
    "logprobs": scalars, "top_logprobs": st.one_of(st.integers(-1, 25), scalars),
    "cache_salt": st.one_of(st.text(max_size=8), scalars), "ignore_eos": scalars,
    "stream": st.booleans(), "echo": scalars,
}
bodies = st.fixed_dictionaries({}, optional=FIELDS)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, chat=st.booleans())
def _fuzz_one(server, body, chat):
    if body.get("max_tokens") is None or not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 6:
        body["max_tokens"] = 3  # keep valid requests short; every other field stays as generated
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = post(server, path, body, timeout=120)
    if r.status_code == 200 and body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text
        return
    assert r.status_code == 200 or (400 <= r.status_code < 500 and is_error_object(r)), (body, r.status_code, r.text)


def test_fuzzed_bodies_get_2xx_or_4xx_and_the_long_stream_completes(server):
    stream = LongStream(server)
    _fuzz_one(server)
    stream.finish()
    wait_idle(server)
    assert "Traceback" not in server.log()


# --- the engine loop: a failed step ends what was in flight, a stuck loop is unhealthy --------------

def test_engine_loop_survives_a_failed_step_and_reports_a_stuck_loop(smollm_engine_factory):
    import asyncio

    from kvcache.config import SamplingParams
    from kvcache.server.engine_loop import EngineLoop

    engine = smollm_engine_factory(num_blocks=64)
    loop = EngineLoop(engine, stuck_after=0.5)
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def fail_once(plan):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure of a whole step")
        return real_execute(plan)
    engine.runner.execute = fail_once  # a fault injected into one step of the real runner

    async def scenario():
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        first = await loop.add("a", "Tell me a story", params)
        orphan = SamplingParams(max_tokens=20)
        await asyncio.wrap_future(loop.call(lambda: engine.add_request("no-client", "Hello", orphan)))
        while not isinstance(out := await first.get(), Exception) and not out.finished:
            pass
        assert isinstance(out, RuntimeError)
        later = await loop.add("b", "The capital of France is", SamplingParams(max_tokens=4, temperature=0))
        while not (out := await later.get()).finished:
            pass
        return out
    loop.start()
    try:
        out = asyncio.run(scenario())
        assert out.error is None and len(out.outputs[0].token_ids) == 4
        assert loop.call(lambda: (engine.pool.num_used, engine.has_unfinished_requests())).result(10) == (0, False)
        assert loop.health() is None
        loop.call(lambda: time.sleep(1.5))
        time.sleep(1.0)
        assert "has not come round" in loop.health()
    finally:
        loop.stop()
    assert "stopped" in loop.health()


# --- found by a second, hostile review ----------------------------------------------------------------

def test_n_samples_are_counted_against_the_pool(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000,
                                         "n": 16, "ignore_eos": True})
    assert r.status_code == 400 and "16 samples" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"model": MODEL, "n": 16, "messages": [{"role": "user", "content": "Hi"}]},
             timeout=300)
    assert r.status_code == 200 and len(r.json()["choices"]) == 16  # the default max_tokens shrank to fit
    wait_idle(server)


@pytest.mark.parametrize("raw,param", [
    ('{"model": "%s", "prompt": "hi", "seed": 1%s}' % (MODEL, "0" * 5000), None),
    ('{"model": "%s", "prompt": "hi", "junk": 1%s}' % (MODEL, "0" * 5000), None),
    ('{"model": "%s", "prompt": "hi", "n": true}' % MODEL, "n"),
    ('{"model": "%s", "prompt": [true, false]}' % MODEL, "prompt"),
    ('{"model": "%s", "prompt": "hi", "top_k": 0}' % MODEL, "top_k"),
])
def test_numbers_and_coercions_are_400s_naming_the_field(server, raw, param):
    r = post(server, "/v1/completions", raw)
    assert r.status_code == 400 and is_error_object(r), r.text
    if param:
        assert (r.json()["error"]["param"] or "").startswith(param), r.text


def test_head_health_and_a_lowercase_bearer(server):
    assert httpx.head(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200


def test_streamed_requests_count_in_time_per_output_token(server):
    before = metric(server, "kvcache_time_per_output_token_seconds_count")
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 5, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.read().decode().rstrip().endswith("data: [DONE]")
    assert metric(server, "kvcache_time_per_output_token_seconds_count") == before + 1
    assert "Traceback" not in server.log()
