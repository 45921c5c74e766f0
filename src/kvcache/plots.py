"""Plots a person would rather look at than read (matplotlib, written to PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from kvcache.sizing import KVShape, human_bytes, kv_bytes  # noqa: E402

PLOT_DTYPES = ("fp32", "bf16", "fp8", "int8", "int4")


def plot_kv_vs_context(shape: KVShape, title: str, batch: int, weights_bytes: int | None, max_context: int,
                       path: str, group_size: int | None = None, memory_bytes: int | None = None) -> None:
    """KV bytes against context length from 1 to ``max_context``, one line per dtype, with the weights'
    size, the memory and (with both) the KV budget left beside the weights as horizontal lines."""
    points = sorted({max(1, round(max_context * i / 200)) for i in range(201)})
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name in PLOT_DTYPES:
        gs = group_size if name in ("fp8", "int8", "int4") else None
        estimates = [kv_bytes(shape, n, batch, name, gs) for n in points]
        per_value = estimates[-1].bytes_per_element  # at full length: block-wise scales amortized as planned
        ax.plot(points, [e.total_bytes for e in estimates], label=f"{name} ({per_value:.3g} B/value)")
    if weights_bytes:
        ax.axhline(weights_bytes, color="black", linestyle="--", linewidth=1,
                   label=f"weights ({human_bytes(weights_bytes)})")
    if memory_bytes:
        ax.axhline(memory_bytes, color="black", linewidth=1.5, label=f"memory ({human_bytes(memory_bytes)})")
        if weights_bytes and memory_bytes > weights_bytes:
            budget = memory_bytes - weights_bytes
            ax.axhline(budget, color="black", linestyle=":", linewidth=1.5,
                       label=f"memory - weights = KV budget ({human_bytes(budget)})")
    ax.set_xlim(0, max_context)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache bytes (batch {batch})")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: human_bytes(y)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.set_title(f"KV cache size: {title.split('  (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
