"""Prefix caching: 32 requests sharing a 1,000-token system prompt, time to first token on vs off.

    python benchmarks/bench_prefix.py [--requests 32] [--system-tokens 1000] [--dtype float32]

All requests arrive together; each is the shared system prompt plus its own short question. With
prefix caching on, the first request's full blocks are found by every later one, so each prefills
only its own tail. Reported: mean and p50/p99 TTFT for both settings, their ratio, and the hit rate.
Runs alternate (off, on) --repeats times; the median ratio is quoted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from common import prompt_ids

from kvcache import SamplingParams
from kvcache.config import SchedulerConfig
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import load_model


def run(loaded, dtype: str, prompts: list[list[int]], prefix_caching: bool) -> dict:
    engine = LLMEngine(loaded=loaded, dtype=dtype, num_blocks=4096, enable_prefix_caching=prefix_caching,
                       scheduler_config=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    ttft = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                ttft.append(out.metrics["first_token_time"] - out.metrics["arrival_time"])
    wall = time.perf_counter() - start
    s = engine.stats()
    ttft.sort()
    return {"prefix_caching": prefix_caching, "mean_ttft_s": statistics.mean(ttft), "p50_ttft_s": ttft[len(ttft) // 2],
            "p99_ttft_s": ttft[-1], "wall_s": wall,
            "hit_rate": s["prefix_cache_hits"] / s["prefix_cache_queries"] if s["prefix_cache_queries"] else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model()
    system = prompt_ids(loaded.tokenizer, args.system_tokens)
    rng = random.Random(0)
    prompts = [system + [rng.randrange(100, 40000) for _ in range(rng.randint(10, 40))] for _ in range(args.requests)]
    ratios = []
    for _ in range(args.repeats):
        off = run(loaded, args.dtype, prompts, False)
        on = run(loaded, args.dtype, prompts, True)
        ratios.append(off["mean_ttft_s"] / on["mean_ttft_s"])
        print(json.dumps(off))
        print(json.dumps(on))
    print(f"\nmean TTFT, prefix caching off / on: median ratio {statistics.median(ratios):.1f}x "
          f"over {args.repeats} runs ({', '.join(f'{r:.1f}x' for r in ratios)})")
    print("| prefix caching | mean TTFT (s) | p50 TTFT (s) | max TTFT (s) | wall (s) | hit rate |")
    print("|---|---|---|---|---|---|")
    for r in (off, on):
        print(f"| {'on' if r['prefix_caching'] else 'off'} | {r['mean_ttft_s']:.2f} | {r['p50_ttft_s']:.2f} | "
              f"{r['p99_ttft_s']:.2f} | {r['wall_s']:.1f} | {r['hit_rate']:.1%} |")


if __name__ == "__main__":
    main()
