"""KV offload tiers: time to first token over a long document by where its prefix is, and a workload
of many shared documents that do not fit in the pool, with and without the host tier.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/kvcache-bench.lock python benchmarks/bench_offload.py \\
        [--doc-tokens 4096] [--repeats 3] [--docs 32] [--doc-tokens-b 512] [--pool-docs 8]

Part 1, a question over a --doc-tokens document whose prefix is
  (a) computed: a fresh engine, no tiers         (b) in the pool: the engine asked about it before
  (c) in host memory: the pool evicted it        (d) on disk, written by another process that exited
  (e) in Redis, written by another process       (redis-server started here on a free port)
(d) is measured cold (the files dropped from the page cache with posix_fadvise) and warm. Each
case reports TTFT and where the time goes: the tier's reads (disk: file reads; Redis: the GETEX
round trips), checking payloads (header + CRC-32), copying blocks into the pool, and the forward
over the question's tokens. Part 2: --docs documents of --doc-tokens-b tokens, a pool that holds
--pool-docs of them, three questions per document in a shuffled order, four requests at a time;
throughput and the prompt tokens recomputed, without and with a host tier that holds them all.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_description, prompt_ids

import kvcache.cache.tiers as tiers
from kvcache import SamplingParams
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer  # noqa: E402  (the tests' real redis-server on a free port)

QUESTION = "\n[{}] Question: what does the text above say about memory? Answer briefly.\nAnswer:"
GREEDY = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


class Clock:
    """Seconds spent in the tiers' reads, in checking payloads, in copying blocks into the pool, and
    in writing back the blocks the pool evicts (host tier)."""

    def __init__(self) -> None:
        self.read = self.check = self.copy = self.write_back = 0.0

    def install(self, engine: LLMEngine) -> None:
        for tier in engine.offload.store.tiers:
            tier.get_many = self._timed(tier.get_many, "read")
        tiers.decode_payload = self._timed(ORIGINAL_DECODE, "check")
        engine.storage.import_blocks = self._timed(engine.storage.import_blocks, "copy")
        engine.runner.on_evicted = self._timed(engine.runner.on_evicted, "write_back")

    def _timed(self, fn, field):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - start)
        return timed


ORIGINAL_DECODE = tiers.decode_payload


def ttft(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first token, prompt tokens served from a cache) of one request run alone."""
    start = time.perf_counter()
    engine.add_request(None, prompt, GREEDY)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return time.perf_counter() - start, out.metrics["num_cached_prompt_tokens"]
    raise RuntimeError("no output")


def writer_process(spec: str, doc: list[int], pool_blocks: int, weights_dtype: str) -> None:
    """Another process computes the document with these tiers and exits (its queues are flushed)."""
    code = ("import sys, json; from kvcache import LLM, SamplingParams\n"
            f"llm = LLM(num_blocks={pool_blocks}, kv_offload={spec!r}, weights_dtype={weights_dtype!r})\n"
            f"llm.generate([{doc!r}], SamplingParams(max_tokens=1, temperature=0))\n"
            "llm.close(); print(json.dumps(llm.stats()['kv_offload']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print(f"  writer process: {out.stdout.strip()}", flush=True)


def drop_page_cache(folder: Path) -> None:
    for path in folder.glob("*.kvb"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def part1(loaded, args) -> None:
    doc = prompt_ids(loaded.tokenizer, args.doc_tokens)
    runs = iter(range(1000))

    def question() -> list[int]:  # each run its own (a run's question blocks are written through too)
        return loaded.tokenizer.encode(QUESTION.format(next(runs)), add_special_tokens=False)
    prompt = doc + question()
    bs = 16
    pool = -(-(len(prompt) + 1) // bs) + 4
    filler = prompt_ids(loaded.tokenizer, (pool - 1) * bs - 1)
    filler = [t + 1 for t in filler]  # other tokens: nothing in common with the document
    folder = Path(tempfile.mkdtemp(prefix="kvcache-bench-disk-"))
    redis = RedisServer(maxmemory="2gb")
    rows: dict[str, list[tuple[float, int, Clock]]] = {}
    formats: set[str] = set()

    def case(name: str, spec: str | None, prepare=None) -> None:
        for _ in range(args.repeats):
            engine = LLMEngine(loaded=loaded, num_blocks=pool, kv_offload=spec, weights_dtype=args.weights_dtype)
            formats.add(f"model {engine.dtype}, weights {engine.weight_formats}, KV {engine.kv_cache_dtype}")
            clock = Clock()
            if prepare:
                prepare(engine)
            if spec:
                clock.install(engine)
            seconds, cached = ttft(engine, doc + question())
            tiers.decode_payload = ORIGINAL_DECODE
            rows.setdefault(name, []).append((seconds, cached, clock))
            engine.close()

    try:
        case("(a) computed", None)
        case("(b) in the pool", None, lambda e: ttft(e, doc + question()))
        case("(c) in host memory", "host:2GB", lambda e: (ttft(e, doc + question()), ttft(e, filler)))
        writer_process(f"disk:{folder}:4GB,{redis.url}", doc, pool, args.weights_dtype)
        disk = f"disk:{folder}:4GB"
        case("(d) on disk, after a restart (cold)", disk, lambda e: drop_page_cache(folder))
        case("(d) on disk, after a restart (page cache)", disk)
        case("(e) in Redis, written by another process", redis.url)
    finally:
        redis.kill()
        shutil.rmtree(folder, ignore_errors=True)
    report_part1(rows, len(prompt), ", ".join(sorted(formats)))


def report_part1(rows, prompt_tokens: int, formats: str) -> None:
    base = statistics.median(r[0] for r in rows["(a) computed"])
    print(f"\nTTFT, SmolLM2-135M ({formats}), a {prompt_tokens}-token prompt (document + question), median "
          f"of {len(rows['(a) computed'])}; the time split is the median run's")
    print("| prefix | TTFT (s) | vs computed | cached tokens | tier reads (s) | checks (s) | copy in (s) "
          "| write-back (s) | rest (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        runs = sorted(runs, key=lambda r: r[0])
        seconds, cached, clock = runs[len(runs) // 2]
        rest = seconds - clock.read - clock.check - clock.copy - clock.write_back
        print(f"| {name} | {seconds:.3f} | {base / seconds:.1f}x lower | {cached} | {clock.read:.3f} | "
              f"{clock.check:.3f} | {clock.copy:.3f} | {clock.write_back:.3f} | {rest:.3f} |")


def part2(loaded, args) -> None:
    bs = 16
    docs = [[(t + 97 * d) % 40000 + 100 for t in prompt_ids(loaded.tokenizer, args.doc_tokens_b)]
            for d in range(args.docs)]
    questions = [loaded.tokenizer.encode(f"\nQuestion {q}: summarize the above.", add_special_tokens=False)
                 for q in range(3)]
    rng = random.Random(0)
    order = [(d, q) for d in range(args.docs) for q in range(3)]
    rng.shuffle(order)
    pool = args.pool_docs * (args.doc_tokens_b // bs + 2)
    host_bytes = None
    print(f"\n{args.docs} documents of {args.doc_tokens_b} tokens, {len(order)} requests (3 questions each, "
          f"shuffled, 4 at a time, 8 output tokens each), a pool of {pool} blocks ({args.pool_docs} documents)")
    print("| tiers | wall (s) | tokens/s (prompt + output) | prompt tokens | recomputed | host hits (blocks) |")
    print("|---|---|---|---|---|---|")
    for spec in (None, f"host:{args.host_budget}"):
        engine = LLMEngine(loaded=loaded, num_blocks=pool, kv_offload=spec, weights_dtype=args.weights_dtype)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        start, pending, prompt_tokens, cached = time.perf_counter(), list(order), 0, 0
        while pending or engine.has_unfinished_requests():
            while pending and len(engine.scheduler.running) + len(engine.scheduler.waiting) < 4:
                d, q = pending.pop(0)
                engine.add_request(None, docs[d] + questions[q], params)
                prompt_tokens += len(docs[d]) + len(questions[q])
            for out in engine.step():
                if out.finished:
                    cached += out.metrics["num_cached_prompt_tokens"]
        wall = time.perf_counter() - start
        hits = engine.stats()["kv_offload"].get("host", {}).get("hits", 0)
        host_bytes = engine.stats()["kv_offload"].get("host", {}).get("bytes", host_bytes)
        engine.close()
        total = prompt_tokens + 8 * len(order)
        print(f"| {spec or 'none'} | {wall:.1f} | {total / wall:.0f} | {prompt_tokens} | {prompt_tokens - cached} "
              f"({(prompt_tokens - cached) / prompt_tokens:.0%}) | {hits} |", flush=True)
    print(f"host tier held {host_bytes / 1e6:.0f} MB at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--doc-tokens-b", type=int, default=512)
    parser.add_argument("--pool-docs", type=int, default=8)
    parser.add_argument("--host-budget", default="2GB")
    parser.add_argument("--weights-dtype", default="float32",
                        help="weights as the engine holds them (default float32: SmolLM2 float32 throughout)")
    parser.add_argument("--skip-part2", action="store_true")
    args = parser.parse_args()
    import torch
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    loaded = load_model()
    part1(loaded, args)
    if not args.skip_part2:
        part2(loaded, args)


if __name__ == "__main__":
    main()
