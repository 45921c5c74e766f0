"""Start-up: wall time and peak RSS of `kvcache generate hi --max-tokens 1` (and of --help, size).

    flock /tmp/kvcache-bench.lock python benchmarks/bench_startup.py [--runs 5] [--before-src DIR]

Each command runs as a fresh process under /usr/bin/time (elapsed seconds, maximum resident set
size); runs alternate between the current tree and, with --before-src, an older tree's ``src``
(e.g. from `git archive REV src | tar -x -C DIR`), so both see the same machine. The converted
weights are made once first, so every timed run is a warm start. Medians are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from common import cpu_description

COMMANDS = {"generate hi --max-tokens 1": ["generate", "hi", "--max-tokens", "1"],
            "--help": ["--help"], "size --preset llama-3-8b": ["size", "--preset", "llama-3-8b"]}


def timed(argv: list[str], src: str | None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one run of ``python -m kvcache argv``."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    r = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "kvcache", *argv], env=env,
                       capture_output=True, text=True, check=True)
    seconds, kb = r.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before-src", help="an older tree's src folder to compare against")
    args = parser.parse_args()
    print(cpu_description())
    print(f"load average before: {os.getloadavg()}")
    trees = {"after": None} | ({"before": args.before_src} if args.before_src else {})
    for src in trees.values():
        timed(COMMANDS["generate hi --max-tokens 1"], src)  # convert the weights once, warm the page cache
    print("| command | tree | median s | median peak RSS MB | runs (s) |")
    print("|---|---|---|---|---|")
    for label, argv in COMMANDS.items():
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, src in trees.items():
                results[name].append(timed(argv, src))
        for name, runs in results.items():
            print(f"| `kvcache {label}` | {name} | {statistics.median(r[0] for r in runs):.2f} | "
                  f"{statistics.median(r[1] for r in runs):.0f} | {', '.join(f'{r[0]:.2f}' for r in runs)} |",
                  flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
