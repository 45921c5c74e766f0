"""64 concurrent streaming clients against `kvcache serve` and llama.cpp's server, on loopback.

    python benchmarks/bench_serve.py [--clients 64] [--requests 256] [--dtype float32] [--servers kvcache,llamacpp]

Each server is started as a real process on 127.0.0.1, then --clients workers send --requests
streaming /v1/completions between them (bounded: every worker stops when the requests run out or
after --timeout seconds). Prompts are the same for both servers (distinct short questions);
max_tokens is --max-tokens. Reported: errors, p50/p99 time to first token, output tokens/s over the
run (completion tokens counted from the streamed chunks), and, for kvcache, the KV blocks in use
after the run (0 means every block went back to the pool; the prefix cache holds no reference).

llama.cpp's server is llama-cpp-python's (`python -m llama_cpp.server`, pip install
'llama-cpp-python[server]'), given the GGUF converted to the same float type as ours, with
--interrupt_requests False (its default lets each new request cut off the one being streamed,
which under 64 clients fails all but one). It serves one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import httpx

from kvcache.models.loader import cache_dir, default_model_path

QUESTIONS = ["Why is the sky blue?", "What is a cache?", "Name three rivers.", "How do plants grow?",
             "What is gravity?", "Describe a cat.", "What is rain?", "Explain a computer."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                tokens += 1
                first = first or time.perf_counter()
    return (first or time.perf_counter()) - start, tokens


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    prompts = [f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]} Answer:" for i in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts, tokens, errors = [], [], []
    deadline = time.perf_counter() + timeout

    async def worker(client):
        while not queue.empty() and time.perf_counter() < deadline:
            prompt = queue.get_nowait()
            try:
                t, n = await one(client, url, model, prompt, max_tokens)
                ttfts.append(t)
                tokens.append(n)
            except Exception as err:  # counted, reported
                errors.append(repr(err))
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    ttfts.sort()
    return {"completed": len(ttfts), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": wall, "output_tok_s": sum(tokens) / wall, "output_tokens": sum(tokens),
            "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None}


def kv_blocks_used(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^kvcache_kv_blocks_used ([0-9.e+-]+)$", text, re.M).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--servers", default="kvcache,llamacpp")
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    results = []
    for name in args.servers.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name == "kvcache":
            cmd = [sys.executable, "-m", "kvcache", "serve", "--port", str(port), "--dtype", args.dtype,
                   "--served-model-name", "m", "--max-num-seqs", str(args.clients), "--num-blocks", "2048"]
        else:
            sys.path.insert(0, os.path.dirname(__file__))
            from llamacpp_peer import convert
            path = convert(default_model_path(), args.dtype, cache_dir() / "bench")
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "m",
                   "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192",
                   "--n_threads", str(os.cpu_count()), "--n_threads_batch", str(os.cpu_count()),
                   # by default a new request interrupts the one being streamed; queue them instead
                   "--interrupt_requests", "False"]
        proc = start(cmd, url)
        try:
            result = asyncio.run(load(url, "m", args.clients, args.requests, args.max_tokens, args.timeout))
            result["server"] = name
            if name == "kvcache":
                time.sleep(1)
                result["kv_blocks_used_after"] = kv_blocks_used(url)
            results.append(result)
            print(json.dumps(result), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print()
    print(f"| server ({args.dtype}) | clients | completed | errors | output tok/s | TTFT p50 / p99 (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        p50 = f"{r['ttft_p50_s']:.2f}" if r["ttft_p50_s"] is not None else "-"
        p99 = f"{r['ttft_p99_s']:.2f}" if r["ttft_p99_s"] is not None else "-"
        print(f"| {r['server']} | {args.clients} | {r['completed']} | {r['errors']} | {r['output_tok_s']:.1f} | "
              f"{p50} / {p99} |")


if __name__ == "__main__":
    main()
