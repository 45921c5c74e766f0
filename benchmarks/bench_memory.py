"""Concurrency and waste at a fixed KV budget: the paged cache against max-context reservation.

    python benchmarks/bench_memory.py [--budget-tokens 65536] [--block-size 16]

The paged side is our real scheduler, kv manager and block pool, stepped over the workload with one
token appended per running request per step (this measures the cache's planning, which needs no
model). The reservation side is what a contiguous cache does: every admitted request holds the
model's whole context, so it admits budget // max_context requests and wastes what they leave unused.
Both get the same budget, in bytes from the planner (SmolLM2-135M, fp32).
"""

from __future__ import annotations

import argparse
import json
import statistics

from workload import lognormal_mix

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import KVCacheManager
from kvcache.config import SamplingParams, SchedulerConfig
from kvcache.engine.request import Request
from kvcache.engine.scheduler import Scheduler
from kvcache.sizing import block_bytes, kv_bytes, preset

MAX_CONTEXT = 8192


def simulate_paged(items, num_blocks: int, block_size: int, windows: tuple = (None,)) -> dict:
    """Step the real scheduler over ``items``; ``windows`` are the cache groups' sliding windows."""
    pool = BlockPool(num_blocks, enable_prefix_caching=False)
    kv = KVCacheManager(pool, block_size, windows)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1024, max_num_batched_tokens=8192,
                                      long_prefill_token_threshold=8192), kv, MAX_CONTEXT)
    for i, item in enumerate(items):
        sched.add(Request(str(i), [1] * item.prompt_len, SamplingParams(max_tokens=item.output_len)))
    running, saturated, waste, held, steps, finished = [], [], [], [], 0, 0
    while sched.has_unfinished:
        sched.schedule()
        for r in sched.step_done():
            r.all_token_ids.append(1)
            if len(r.output_token_ids) >= r.params.max_tokens:
                sched.finish(r, "length")
                finished += 1
        slots = sum(kv.num_blocks_held(r) for r in sched.running) * block_size
        used = sum(r.num_computed_tokens for r in sched.running)
        running.append(len(sched.running))
        held.append(pool.num_used)
        if sched.waiting:  # the cache, not the workload, limits concurrency
            saturated.append(len(sched.running))
        if slots:
            waste.append((slots - used) / slots)
        steps += 1
    return {"peak_concurrent": max(running), "mean_concurrent": statistics.mean(saturated),
            "mean_waste": statistics.mean(waste), "p99_waste": sorted(waste)[int(0.99 * len(waste))],
            "preemptions": sched.num_preemptions, "steps": steps, "finished": finished,
            "peak_blocks_used": max(held)}


def simulate_reservation(items, budget_tokens: int) -> dict:
    slots = budget_tokens // MAX_CONTEXT
    lengths = [i.prompt_len + i.output_len for i in items]
    # each resident request holds MAX_CONTEXT slots; on average it fills mean(length) / 2 of them
    # over its life (it grows from its prompt to its full length), at best its full length
    mean_fill = statistics.mean((i.prompt_len + i.prompt_len + i.output_len) / 2 for i in items)
    return {"peak_concurrent": slots, "mean_concurrent": slots,
            "mean_waste": 1 - mean_fill / MAX_CONTEXT, "best_case_waste": 1 - statistics.mean(lengths) / MAX_CONTEXT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-tokens", type=int, default=65536, help="KV budget, in tokens of SmolLM2 fp32")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    shape = preset("smollm2-135m").shape
    budget_bytes = kv_bytes(shape, args.budget_tokens, 1, "fp32").total_bytes
    num_blocks = budget_bytes // block_bytes(shape, args.block_size, "fp32")
    items = lognormal_mix(args.requests)
    lengths = sorted(i.prompt_len + i.output_len for i in items)
    print(json.dumps({"budget_bytes": budget_bytes, "num_blocks": num_blocks,
                      "length_median": lengths[len(lengths) // 2], "length_p99": lengths[int(0.99 * len(lengths))],
                      "length_max": lengths[-1]}))
    paged = simulate_paged(items, num_blocks, args.block_size)
    reserve = simulate_reservation(items, args.budget_tokens)
    print(json.dumps({"paged": paged, "reservation": reserve}))
    print()
    print("| cache | peak concurrent | mean concurrent while requests wait | wasted fraction |")
    print("|---|---|---|---|")
    print(f"| paged, block {args.block_size} | {paged['peak_concurrent']} | {paged['mean_concurrent']:.1f} | "
          f"{paged['mean_waste']:.2%} (p99 {paged['p99_waste']:.2%}) |")
    print(f"| reserve {MAX_CONTEXT} per request | {reserve['peak_concurrent']} | {reserve['mean_concurrent']:.1f} | "
          f"{reserve['mean_waste']:.2%} (best case {reserve['best_case_waste']:.2%}) |")
    print(f"\nconcurrency: {paged['peak_concurrent'] / reserve['peak_concurrent']:.1f}x peak, "
          f"{paged['mean_concurrent'] / reserve['mean_concurrent']:.1f}x mean")


if __name__ == "__main__":
    main()
