"""Serving throughput on the real model: kvcache vs HF transformers (static batches) vs llama.cpp.

    python benchmarks/bench_throughput.py [--requests 200] [--dtypes float32,bfloat16] [--engines ours,hf,llamacpp]

One workload for all (benchmarks/workload.py, seeded): prompt lengths ~ lognormal(median 128,
sigma 0.8), outputs ~ lognormal(median 64, sigma 0.7), both clipped to [8, 512], Poisson arrivals at
--rate requests/s; prompts are distinct random token ids; greedy decoding for exactly each request's
output length. Reported: output tokens/s over the whole run, time to first token (TTFT) and time per
output token (TPOT) percentiles.

* ours: LLMEngine, continuous batching, up to --max-seqs sequences, paged KV pool of --kv-tokens tokens,
  the weights in the same float type as the peers (--weights-dtype float32 / bfloat16).
* HF: transformers' generate in static batches, in arrival order; a batch starts when its last
  request has arrived and the previous batch is done, and returns when its longest request is done.
  The batch size is the best of 8/16/32/64 on a probe run.
* llama.cpp: llama-cpp-python's low-level API batching up to --max-seqs sequences per llama_decode, same
  KV budget, the GGUF converted to the same float type (benchmarks/llamacpp_peer.py).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from common import hf_model
from workload import lognormal_mix

from kvcache import SamplingParams
from kvcache.config import SchedulerConfig
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import cache_dir, default_model_path, load_model


def make_requests(n: int, rate: float, vocab: int, seed: int = 1):
    items = lognormal_mix(n, prompt_median=128, prompt_sigma=0.8, output_median=64, output_sigma=0.7,
                          max_len=1024, rate=rate, seed=seed)
    rng = random.Random(seed)
    return [(i, [rng.randrange(100, vocab - 100) for _ in range(it.prompt_len)], it.output_len, it.arrival)
            for i, it in enumerate(items)]


def summarize(name: str, done: dict, requests, wall: float) -> dict:
    out_tokens = sum(r[2] for r in requests)
    ttft = sorted(v[1] for v in done.values())
    tpot = sorted((v[2] - v[1]) / (len(v[0]) - 1) for v in done.values() if len(v[0]) > 1)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))]
    return {"engine": name, "requests": len(done), "output_tokens": out_tokens, "wall_s": wall,
            "output_tok_s": out_tokens / wall, "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "tpot_p50_ms": 1000 * pct(tpot, 0.5), "tpot_p99_ms": 1000 * pct(tpot, 0.99)}


def run_ours(loaded, dtype: str, requests, kv_tokens: int, max_seqs: int) -> dict:
    engine = LLMEngine(loaded=loaded, dtype=dtype, weights_dtype=dtype, num_blocks=kv_tokens // 16,
                       scheduler_config=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=1024))
    engine.step()  # nothing queued: warms nothing, allocates nothing, returns at once
    pending = sorted(requests, key=lambda r: r[3])
    arrivals, done = {}, {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][3] <= now:
            key, prompt, n, arrival = pending.pop(0)
            engine.add_request(str(key), prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            arrivals[str(key)] = arrival
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][3] - now))
            continue
        for out in engine.step():
            if out.finished:
                t = time.perf_counter() - start
                m = out.metrics
                ttft = m["first_token_time"] - m["arrival_time"]
                done[int(out.request_id)] = (out.outputs[0].token_ids, ttft,
                                             t - arrivals[out.request_id])
    wall = time.perf_counter() - start
    result = summarize("kvcache", done, requests, wall)
    result["preemptions"] = engine.stats()["num_preemptions"]
    return result


class _FirstTokenClock:
    """A generate() streamer that only notes when the first new tokens come out."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def run_hf(model, requests, batch_size: int, limit: int | None = None) -> dict:
    reqs = sorted(requests, key=lambda r: r[3])[:limit] if limit else sorted(requests, key=lambda r: r[3])
    done = {}
    start = time.perf_counter()
    for g in range(0, len(reqs), batch_size):
        group = reqs[g:g + batch_size]
        wait = group[-1][3] - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        width = max(len(r[1]) for r in group)
        ids = torch.tensor([[2] * (width - len(r[1])) + r[1] for r in group])  # left padding
        mask = torch.tensor([[0] * (width - len(r[1])) + [1] * len(r[1]) for r in group])
        steps = max(r[2] for r in group)
        clock = _FirstTokenClock()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, pad_token_id=2, streamer=clock)
        t = time.perf_counter() - start
        first = clock.first - start
        for row, (key, prompt, n, arrival) in enumerate(group):
            done[key] = (out[row, width:width + n].tolist(), first - arrival, t - arrival)
    wall = time.perf_counter() - start
    return summarize(f"hf-static-{batch_size}", done, reqs, wall)


def run_llamacpp(dtype: str, requests, kv_tokens: int, max_seqs: int) -> dict:
    from llamacpp_peer import convert, start
    path = convert(default_model_path(), dtype, cache_dir() / "bench")
    peer, _ = start(path, n_ctx=kv_tokens, n_seq=max_seqs, n_batch=1024, threads=torch.get_num_threads())
    start = time.perf_counter()
    done = peer.run(requests)
    wall = time.perf_counter() - start
    peer.close()
    return summarize(f"llama.cpp-{dtype}", done, requests, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=8.0, help="arrivals per second (Poisson)")
    parser.add_argument("--kv-tokens", type=int, default=32768, help="KV budget in tokens, for ours and llama.cpp")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--engines", default="ours,hf,llamacpp")
    parser.add_argument("--hf-batch", type=int, help="skip the probe and use this static batch size")
    parser.add_argument("--max-seqs", type=int, default=64, help="parallel sequences for ours and llama.cpp")
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args()
    loaded = load_model()
    requests = make_requests(args.requests, args.rate, loaded.config.vocab_size)
    print(json.dumps({"requests": len(requests), "prompt_tokens": sum(len(r[1]) for r in requests),
                      "output_tokens": sum(r[2] for r in requests), "torch_threads": torch.get_num_threads()}))
    results = []
    engines = args.engines.split(",")
    for dtype in args.dtypes.split(","):
        if "ours" in engines:
            results.append(run_ours(loaded, dtype, requests, args.kv_tokens, args.max_seqs) | {"dtype": dtype})
            print(json.dumps(results[-1]), flush=True)
        if "llamacpp" in engines:
            results.append(run_llamacpp(dtype, requests, args.kv_tokens, args.max_seqs) | {"dtype": dtype})
            print(json.dumps(results[-1]), flush=True)
        if "hf" in engines:
            model = hf_model(loaded, getattr(torch, dtype))
            size = args.hf_batch
            if size is None:
                probe = {b: run_hf(model, [(k, p, n, 0.0) for k, p, n, _ in requests], b, limit=b)["output_tok_s"]
                         for b in (8, 16, 32, 64)}
                size = max(probe, key=probe.get)
                print(json.dumps({"hf_probe_tok_s": probe, "dtype": dtype}), flush=True)
            results.append(run_hf(model, requests, size) | {"dtype": dtype})
            print(json.dumps(results[-1]), flush=True)
            del model
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    print()
    print("| dtype | engine | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['engine']} | {r['output_tok_s']:.1f} | {r['ttft_p50_s']:.2f} / "
              f"{r['ttft_p99_s']:.2f} | {r['tpot_p50_ms']:.0f} / {r['tpot_p99_ms']:.0f} |")


if __name__ == "__main__":
    main()
