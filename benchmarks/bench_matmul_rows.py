"""Our weight matmul kernel (kernels/matmul.c) by number of activation rows: the read rate of one
decode row against the few rows of a speculative verification.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_matmul_rows.py [--rows 1,2,3,5,8,12,16] [--repeats 7]

Per SmolLM2-135M weight shape (30 layers' worth of distinct random float32 matrices, 425 MB in all,
so every call reads from memory), the median over repeats of one pass over the 30 matrices with
M rows, and its read rate (weight bytes / time). One call per matrix, as a layer-by-layer forward
makes it (the fused decode step makes the same products inside one parallel region).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import cpu_description
from kvcache import kernels

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # [N, K]
LAYERS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,5,8,12,16")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    lib = kernels.library()
    if lib is None:
        raise SystemExit("kvcache's C kernels are not built here (no C compiler?); nothing to measure.")
    print(f"# {cpu_description()}; torch threads {torch.get_num_threads()}")
    print("| weight [N, K] | rows | ms for 30 layers | GB/s | vs 1 row |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, generator=gen) for _ in range(LAYERS)]
        one_row = None
        for m in (int(r) for r in args.rows.split(",")):
            x, y = torch.randn(m, k, generator=gen), torch.empty(m, n)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for w in weights:
                    lib.kv_matmul(kernels.FORMAT_CODES["float32"], m, n, k, x.data_ptr(), w.data_ptr(), None, None,
                                  None, y.data_ptr(), torch.get_num_threads())
                times.append(time.perf_counter() - start)
            torch.testing.assert_close(y, x @ weights[-1].T, atol=1e-3, rtol=1e-4)
            t = statistics.median(times)
            one_row = one_row or t
            print(f"| {name} [{n}, {k}] | {m} | {t * 1e3:.2f} | {LAYERS * n * k * 4 / t / 1e9:.1f} | {t / one_row:.2f}x |")


if __name__ == "__main__":
    main()
