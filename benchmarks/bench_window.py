"""Sliding-window blocks given back to the pool: KV held per sequence and concurrency at a fixed
budget, on Gemma-3's layer pattern, with and without freeing.

    python benchmarks/bench_window.py [--preset gemma-3-270m] [--budget-tokens 65536] [--block-size 16]

Planning needs no model, so this steps the engine's real scheduler, kv manager and block pool
(as bench_memory.py does), with the cache groups the engine builds for the preset's layers:
Gemma-3-270M's 15 sliding (window 512) + 3 global layers become five sliding groups and one
global group of 3 layers, one page per block id. "Without freeing" is the same groups with every
window treated as full, which is what a cache that only masks the window holds.
"""

from __future__ import annotations

import argparse
import json

from bench_memory import simulate_paged
from workload import lognormal_mix

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import KVCacheManager
from kvcache.cache.spec import KVSpec, group_layers, pool_block_bytes
from kvcache.config import SamplingParams, SchedulerConfig
from kvcache.engine.request import Request
from kvcache.engine.scheduler import Scheduler
from kvcache.sizing import kv_bytes, preset

CHUNK = 2048


def held_after(num_tokens: int, windows: tuple, block_size: int) -> int:
    """Blocks one request holds once it has ``num_tokens`` tokens of KV and has decoded one more step."""
    kv = KVCacheManager(BlockPool(10 ** 6, enable_prefix_caching=False), block_size, windows)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=CHUNK), kv, 10 ** 7)
    request = Request("r", [1] * num_tokens, SamplingParams(max_tokens=2))
    sched.add(request)
    while request.num_computed_tokens < num_tokens:  # chunked prefill
        sched.schedule()
        sched.step_done()
    request.all_token_ids.append(1)
    sched.schedule()  # the first decode step lets go of what the window left behind
    return kv.num_blocks_held(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma-3-270m")
    parser.add_argument("--budget-tokens", type=int, default=65536,
                        help="KV budget, in tokens of the model's full (unwindowed) fp32 cache")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    model = preset(args.preset)
    shape, bs = model.shape, args.block_size
    specs = tuple(KVSpec(shape.num_kv_heads, shape.head_dim, "fp32", shape.window_of(i))
                  for i in range(shape.num_layers))
    groups = group_layers(specs)
    freeing = tuple(g.spec.window for g in groups)
    masking = (None,) * len(groups)
    page = pool_block_bytes(groups, bs)
    print(json.dumps({"preset": model.name, "groups": [[g.spec.window, list(g.layers)] for g in groups],
                      "page_bytes": page}))

    print("\n| tokens | planner (min(n, window) per sliding layer) | ours, windows freed | ours, windows only masked |")
    print("|---|---|---|---|")
    for n in (1024, 4096, 8192, 32768):
        planned = kv_bytes(shape, n, 1, "fp32").total_bytes
        freed, kept = held_after(n, freeing, bs) * page, held_after(n, masking, bs) * page
        print(f"| {n:,} | {planned:,} B | {freed:,} B ({freed / planned:.3f}x planned) | "
              f"{kept:,} B ({kept / freed:.2f}x freed) |")

    full_token = kv_bytes(shape.__class__(shape.num_layers, shape.num_kv_heads, shape.head_dim), 1, 1, "fp32")
    budget = args.budget_tokens * full_token.total_bytes
    num_blocks = budget // page
    items = lognormal_mix(args.requests, prompt_median=2048, prompt_sigma=0.7, output_median=256,
                          output_sigma=0.7, max_len=8192)
    results = {name: simulate_paged(items, num_blocks, bs, windows)
               for name, windows in (("freed", freeing), ("masked", masking))}
    print(json.dumps({"budget_bytes": budget, "num_blocks": num_blocks,
                      **{k: {m: v[m] for m in ("peak_concurrent", "mean_concurrent", "preemptions", "steps")}
                         for k, v in results.items()}}))
    print("\n| sliding blocks | peak concurrent | mean concurrent while requests wait | preemptions |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_concurrent']} | {r['mean_concurrent']:.1f} | {r['preemptions']} |")
    print(f"\nconcurrency with freeing: {results['freed']['peak_concurrent'] / results['masked']['peak_concurrent']:.2f}x "
          f"peak, {results['freed']['mean_concurrent'] / results['masked']['mean_concurrent']:.2f}x mean")


if __name__ == "__main__":
    main()
