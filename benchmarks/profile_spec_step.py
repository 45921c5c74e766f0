"""What a speculative verification step costs against a plain decode step, batch 1.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_spec_step.py [--k 6] [--prompts 10] [--max-tokens 96]

Runs the input-grounded prompts of bench_spec.py one at a time with prompt lookup (float32 weights,
greedy) and times every ``engine.step()`` after a request's first, grouped by how many tokens the
step drafted (0: a plain decode step), and every fused C step (``FusedDecode.run``) by its number
of tokens (with the final norm and the output head where it computes them). Medians; the ratio is each group's median over the plain step's.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

from bench_spec import Ours, encode_all
from common import cpu_description
from kvcache import SamplingParams
from kvcache.models import fused_decode
from kvcache.models.loader import load_model
from spec_workload import grounded_messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    print(f"# {cpu_description()}")
    loaded = load_model()
    engine = Ours(loaded, args.k, 2).engine
    fused_sizes: list[tuple[int, float]] = []
    run = fused_decode.FusedDecode.run

    def timed_run(self, tokens, positions, metas, **kwargs):
        start = time.perf_counter()
        out = run(self, tokens, positions, metas, **kwargs)
        fused_sizes.append((tokens.shape[0], time.perf_counter() - start))
        return out

    fused_decode.FusedDecode.run = timed_run
    steps, fused = collections.defaultdict(list), collections.defaultdict(list)
    for i, ids in enumerate(encode_all(loaded.tokenizer, grounded_messages())[:args.prompts]):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
        first = True
        while engine.has_unfinished_requests():
            drafted = engine.stats()["spec_drafted_tokens"]
            fused_sizes.clear()
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if first:  # the prefill
                first = False
                continue
            steps[engine.stats()["spec_drafted_tokens"] - drafted].append(elapsed)
            for size, seconds in fused_sizes:
                fused[size].append(seconds)
    for title, groups, label in (("engine.step()", steps, "drafted tokens"), ("fused C step", fused, "tokens")):
        base = statistics.median(groups[min(groups)])
        print(f"\n| {title}: {label} | steps | median ms | vs the smallest |")
        print("|---|---|---|---|")
        for size in sorted(groups):
            t = statistics.median(groups[size])
            print(f"| {size} | {len(groups[size])} | {t * 1e3:.2f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
