"""Plots a person would rather look at than read (matplotlib, written to PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from kvcache.sizing import KVShape, human_bytes, kv_bytes  # noqa: E402

PLOT_DTYPES = ("fp32", "bf16", "fp8", "int8", "int4")


def plot_kv_vs_context(shape: KVShape, title: str, batch: int, weights_bytes: int | None, max_context: int,
                       path: str, group_size: int | None = None) -> None:
    """KV bytes against context length, one line per dtype, with the weights' size as a line."""
    points = sorted({max(1, round(max_context * i / 200)) for i in range(201)})
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name in PLOT_DTYPES:
        gs = group_size if name in ("fp8", "int8", "int4") else None
        ys = [kv_bytes(shape, n, batch, name, gs).total_bytes for n in points]
        ax.plot(points, ys, label=f"{name} ({kv_bytes(shape, 1, 1, name, gs).bytes_per_element:g} B/value)")
    if weights_bytes:
        ax.axhline(weights_bytes, color="black", linestyle="--", linewidth=1,
                   label=f"weights ({human_bytes(weights_bytes)})")
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
