"""Soak: mixed good, hostile and abandoned requests from many clients against one `kvcache serve`.

    python benchmarks/bench_soak.py [--minutes 10] [--clients 32] [--num-blocks 256]

A real server process on 127.0.0.1 (with an API key) takes, for --minutes, requests from --clients
workers, each picking at random: a good completion, a good streamed chat, a hostile-but-legal or
malformed request (the adversarial probe's findings, those of a second hostile review, and more), or a request it abandons (a
non-streaming one given up after 0.3-2 s, or a stream dropped after a few chunks). A prober hits
/health every 100 ms throughout. Reported (targets of the server-hardening issue):
  - errors seen by good requests (target 0): any non-200, error event, missing [DONE] or exception;
  - unexpected answers to bad requests: a 5xx, or a 4xx without an OpenAI error object;
  - /health latency p50 / p99 / max (target p99 < 100 ms);
  - KV blocks still used and requests still running once the clients stop (target 0);
  - the server's RSS after warm-up and at the end.
The run is bounded: every worker stops at the deadline; the server is terminated at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description  # noqa: E402

KEY = "soak-key"
MODEL = "soak"
AUTH = {"authorization": f"Bearer {KEY}"}
QUESTIONS = ["Why is the sky blue?", "What is a cache?", "Name three rivers.", "How do plants grow?",
             "What is gravity?", "Describe a cat.", "What is rain?", "Explain a computer."]
LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"

# Hostile-but-legal requests (200 expected) and malformed ones (4xx expected); raw JSON text so that
# lone surrogates and deep nesting reach the server as a client would send them.
HOSTILE = [
    json.dumps({"model": MODEL, "prompt": "hi", "temperature": 1e-38, "max_tokens": 4}),
    json.dumps({"model": MODEL, "prompt": "hi", "top_p": 1e-320, "max_tokens": 4}),
    json.dumps({"model": MODEL, "prompt": "hi", "seed": 18446744073709551615, "n": 2, "max_tokens": 4}),
    json.dumps({"model": MODEL, "prompt": "hi", "n": 16, "max_tokens": 4, "temperature": 1.5, "top_k": 3}),
]
MALFORMED = [
    json.dumps({"model": MODEL, "prompt": "hi", "seed": 1180591620717411303424}),
    '{"model": "%s", "prompt": "%s", "cache_salt": "\\ud800"}' % (MODEL, LONG),
    '{"model": "%s", "prompt": "caf\\ud800"}' % MODEL,
    '{"model": "\\ud800", "prompt": "hi"}',
    '{"model": "m", "prompt": ' + "[" * 10000 + "]" * 10000 + "}",
    json.dumps({"model": MODEL, "prompt": "hi", "stop": [f"s{i}" for i in range(5000)], "n": 16}),
    json.dumps({"model": MODEL, "prompt": "hi", "cache_salt": ""}),
    json.dumps({"model": MODEL, "prompt": "x" * 1_100_000}),
    json.dumps({"model": MODEL, "prompt": "hi", "temperature": "hot"}),
    json.dumps({"model": MODEL, "prompt": "hi " * 9000}),
    "{not json",
    '{"model": "%s", "prompt": "hi", "seed": 1%s}' % (MODEL, "0" * 5000),
    json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "n": 16, "ignore_eos": True}),
    json.dumps({"model": MODEL, "prompt": [True, False], "n": True}),
]
CHAT_MALFORMED = ['{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % MODEL,
                  json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}] * 2000})]


class Tally:
    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.good_errors: list[str] = []
        self.bad_unexpected: list[str] = []
        self.health: list[float] = []


async def good_completion(client: httpx.AsyncClient, url: str, t: Tally) -> None:
    body = {"model": MODEL, "prompt": random.choice(QUESTIONS), "max_tokens": random.randint(8, 32),
            "temperature": random.choice([0, 0.7])}
    r = await client.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=300)
    if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
        t.good_errors.append(f"completion {r.status_code}: {r.text[:200]}")


async def good_stream(client: httpx.AsyncClient, url: str, t: Tally) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": random.choice(QUESTIONS)}], "max_tokens": 24,
            "stream": True}
    done = False
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=300) as r:
        if r.status_code != 200:
            t.good_errors.append(f"stream {r.status_code}")
            return
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: ") and '"error"' in line[:20]:
                t.good_errors.append(f"stream error event: {line[:200]}")
    if not done:
        t.good_errors.append("stream ended without [DONE]")


async def bad_request(client: httpx.AsyncClient, url: str, t: Tally) -> None:
    chat = random.random() < 0.2
    hostile = not chat and random.random() < 0.4
    raw = random.choice(CHAT_MALFORMED if chat else HOSTILE if hostile else MALFORMED)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = await client.post(f"{url}{path}", content=raw, headers=AUTH | {"content-type": "application/json"},
                          timeout=300)
    ok = r.status_code == 200 if hostile else 400 <= r.status_code < 500 and "error" in r.json()
    if not ok:
        t.bad_unexpected.append(f"{r.status_code}: {r.text[:200]}")


async def abandoned(client: httpx.AsyncClient, url: str, t: Tally) -> None:
    body = {"model": MODEL, "prompt": random.choice(QUESTIONS) + " Answer at great length.", "max_tokens": 600,
            "ignore_eos": True}
    if random.random() < 0.5:
        try:
            await client.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=random.uniform(0.3, 2.0))
        except httpx.TimeoutException:
            pass
        return
    async with client.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, headers=AUTH,
                             timeout=300) as r:
        seen = 0
        async for _ in r.aiter_lines():
            seen += 1
            if seen >= random.randint(2, 20):
                break


KINDS = [(good_completion, 0.3), (good_stream, 0.2), (bad_request, 0.3), (abandoned, 0.2)]


async def worker(url: str, deadline: float, t: Tally) -> None:
    async with httpx.AsyncClient() as client:
        while time.time() < deadline:
            kind = random.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
            t.kinds[kind.__name__] += 1
            try:
                await kind(client, url, t)
            except Exception as err:  # tallied: a good request that raised is an error it saw
                if kind in (good_completion, good_stream):
                    t.good_errors.append(f"{kind.__name__}: {type(err).__name__}: {err}")
                elif kind is bad_request:
                    t.bad_unexpected.append(f"{type(err).__name__}: {err}")


async def prober(url: str, deadline: float, t: Tally) -> None:
    async with httpx.AsyncClient() as client:
        while time.time() < deadline:
            start = time.perf_counter()
            r = await client.get(f"{url}/health", timeout=30)
            t.health.append(time.perf_counter() - start)
            if r.status_code != 200:
                t.good_errors.append(f"/health {r.status_code}")
            await asyncio.sleep(0.1)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))


def start_server(port: int, num_blocks: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "kvcache", "serve", "--port", str(port), "--api-key", KEY,
                             "--served-model-name", MODEL, "--num-blocks", str(num_blocks)],
                            stdout=subprocess.DEVNULL, stderr=open("/tmp/kvcache-soak-server.log", "w"))
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited; see /tmp/kvcache-soak-server.log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--num-blocks", type=int, default=256)
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    random.seed(args.seed)
    url = f"http://127.0.0.1:{args.port}"
    print(f"# {cpu_description()}")
    proc = start_server(args.port, args.num_blocks)
    try:
        asyncio.run(run_warmup(url))
        rss_start = rss_mb(proc.pid)
        t = Tally()
        deadline = time.time() + args.minutes * 60

        async def everything() -> None:
            await asyncio.gather(prober(url, deadline, t), *(worker(url, deadline, t) for _ in range(args.clients)))
        asyncio.run(everything())
        settle = time.time() + 10
        while time.time() < settle and (metric(url, "kvcache_kv_blocks_used") or
                                        metric(url, "kvcache_num_requests_running")):
            time.sleep(0.2)
        report(t, args, rss_start, rss_mb(proc.pid), url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = Path("/tmp/kvcache-soak-server.log").read_text()
    print(f"server log: {log.count('Traceback')} tracebacks, {len(log.splitlines())} lines "
          "(/tmp/kvcache-soak-server.log)")


async def run_warmup(url: str) -> None:
    async with httpx.AsyncClient() as client:
        await good_completion(client, url, Tally())


def report(t: Tally, args: argparse.Namespace, rss_start: float, rss_end: float, url: str) -> None:
    health = sorted(t.health)
    p = lambda q: health[min(len(health) - 1, int(q * len(health)))] * 1000  # noqa: E731
    result = {
        "minutes": args.minutes, "clients": args.clients, "num_blocks": args.num_blocks,
        "requests": dict(t.kinds), "good_request_errors": len(t.good_errors),
        "bad_request_unexpected": len(t.bad_unexpected),
        "health_probes": len(health), "health_p50_ms": round(p(0.5), 1), "health_p99_ms": round(p(0.99), 1),
        "health_max_ms": round(health[-1] * 1000, 1), "health_mean_ms": round(statistics.mean(health) * 1000, 1),
        "blocks_used_after": metric(url, "kvcache_kv_blocks_used"),
        "running_after": metric(url, "kvcache_num_requests_running"),
        "waiting_after": metric(url, "kvcache_num_requests_waiting"),
        "rss_start_mb": round(rss_start), "rss_end_mb": round(rss_end), "rss_growth_mb": round(rss_end - rss_start),
    }
    print(json.dumps(result, indent=1))
    for line in (t.good_errors + t.bad_unexpected)[:10]:
        print("  example:", line)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result | {"errors": t.good_errors[:50],
                                                        "unexpected": t.bad_unexpected[:50]}, indent=1))


if __name__ == "__main__":
    main()
