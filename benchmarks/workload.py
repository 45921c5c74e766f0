"""The long-tailed request mix the paged-cache benchmarks share (written down, seeded)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkItem:
    prompt_len: int
    output_len: int
    arrival: float  # seconds after the start


def lognormal_mix(n: int = 200, prompt_median: float = 300, prompt_sigma: float = 1.0,
                  output_median: float = 150, output_sigma: float = 0.9, max_len: int = 8192,
                  rate: float = 0.0, seed: int = 0) -> list[WorkItem]:
    """Prompt and output lengths ~ lognormal(ln median, sigma), as chat traces show; Poisson arrivals.

    Lengths are clipped to [8, max_len / 2] each; ``rate`` requests/s (0: all arrive at once).
    """
    rng = random.Random(seed)
    items, t = [], 0.0
    for _ in range(n):
        p = min(max(8, round(rng.lognormvariate(_ln(prompt_median), prompt_sigma))), max_len // 2)
        o = min(max(8, round(rng.lognormvariate(_ln(output_median), output_sigma))), max_len // 2)
        items.append(WorkItem(p, o, t))
        if rate > 0:
            t += rng.expovariate(rate)
    return items


def _ln(x: float) -> float:
    import math
    return math.log(x)
