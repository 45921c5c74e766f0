"""Batch-1 decode with a busy neighbour: does the thread policy keep decode within 2x of idle?

    flock /tmp/kvcache-bench.lock python benchmarks/bench_threads.py [--repeats 3] [--tokens 33]

For each OpenMP wait policy (libgomp's default, which spins before sleeping, and PASSIVE, which the
CLI sets), a fresh child process loads SmolLM2 (float32) and times decode with 1 and 2 threads, and
with the thread count the CLI's default picks (``default_threads()``, sampled after the neighbour
started), alternating, first on an idle machine and then while a neighbour process runs a Python
busy loop (one core kept busy). Decode rate = (N-1) tokens / (time of N tokens - time of 1 token).
Prints medians and the busy/idle ratio per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import cpu_description

BUSY_LOOP = "while True: pass"


def child(repeats: int, tokens: int) -> None:
    import torch

    from kvcache import LLM, SamplingParams
    from kvcache.cli.threads import default_threads

    auto = default_threads()
    llm = LLM(num_blocks=16, enable_prefix_caching=False)
    ids = llm.tokenizer.encode("The history of computing is a story of memory.")

    def elapsed(n: int) -> float:
        start = time.perf_counter()
        llm.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - start

    rates: dict[str, list[float]] = {"1": [], "2": [], "auto": []}
    elapsed(4)  # warm-up
    for _ in range(repeats):
        for name, threads in (("1", 1), ("2", 2), ("auto", auto)):
            torch.set_num_threads(threads)
            first = elapsed(1)
            rates[name].append((tokens - 1) / (elapsed(tokens) - first))
    print(json.dumps({"auto_threads": auto, **{k: statistics.median(v) for k, v in rates.items()}}))


def run_child(policy: str | None, busy: bool, repeats: int, tokens: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats), "--tokens", str(tokens)],
                             env=env, capture_output=True, text=True, check=True, timeout=1800)
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=33)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.repeats, args.tokens)
        return
    print(cpu_description())
    print(f"load average before: {os.getloadavg()}")
    print("| OpenMP wait policy | threads | idle decode tok/s | busy neighbour tok/s | busy / idle |")
    print("|---|---|---|---|---|")
    for policy in (None, "PASSIVE"):
        idle = run_child(policy, False, args.repeats, args.tokens)
        busy = run_child(policy, True, args.repeats, args.tokens)
        for name in ("1", "2", "auto"):
            label = name if name != "auto" else \
                f"default (picked {idle['auto_threads']} idle, {busy['auto_threads']} busy)"
            print(f"| {policy or 'libgomp default'} | {label} | {idle[name]:.1f} | {busy[name]:.1f} | "
                  f"{busy[name] / idle[name]:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
