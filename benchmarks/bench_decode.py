"""Batch-1 prefill and decode: kvcache against HF transformers' generate, same weights, same process.

    python benchmarks/bench_decode.py [--repeats 3] [--plot docs/decode_per_token.png] [--plot-only]

Both engines are timed the same way, from the outside: generating 1 token gives the prefill time
(time to first token); generating N tokens minus that gives the decode time of N-1 tokens. Runs
alternate between the engines and the median of the per-run ratios is reported. The roofline
fraction divides the bytes a decode step must read (all weights once, plus the KV cache so far) times
tokens/s by the memory read bandwidth measured in this same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import hf_model, median, memory_read_bandwidth, prompt_ids
from kvcache import LLM, SamplingParams
from kvcache.models.loader import load_model
from kvcache.runtime.reference import logits_without_cache

CASES = [(128, 128), (1024, 64)]


def time_ours(llm: LLM, ids: list[int], n: int) -> tuple[float, float]:
    def gen(k):
        start = time.perf_counter()
        llm.generate([ids], SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - start
    ttft = gen(1)
    return ttft, gen(n) - ttft


def time_hf(model, ids: list[int], n: int) -> tuple[float, float]:
    x = torch.tensor([ids])

    def gen(k):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=2)
        return time.perf_counter() - start
    ttft = gen(1)
    return ttft, gen(n) - ttft


def run_case(llm, hf, ids, n, repeats, weight_bytes, kv_per_token, bandwidth):
    rows = {"ours": [], "hf": []}
    for _ in range(repeats):
        for name, fn in (("ours", lambda: time_ours(llm, ids, n)), ("hf", lambda: time_hf(hf, ids, n))):
            ttft, decode = fn()
            rows[name].append((len(ids) / ttft, (n - 1) / decode))
    result = {"prompt": len(ids), "new_tokens": n}
    for name, runs in rows.items():
        result[f"{name}_prefill_tok_s"] = median([r[0] for r in runs])
        result[f"{name}_decode_tok_s"] = median([r[1] for r in runs])
    result["prefill_ratio"] = median([o[0] / h[0] for o, h in zip(rows["ours"], rows["hf"])])
    result["decode_ratio"] = median([o[1] / h[1] for o, h in zip(rows["ours"], rows["hf"])])
    mean_context = len(ids) + n / 2
    bytes_per_token = weight_bytes + kv_per_token * mean_context
    result["decode_roofline_fraction"] = result["ours_decode_tok_s"] * bytes_per_token / bandwidth
    result["hf_roofline_fraction"] = result["hf_decode_tok_s"] * bytes_per_token / bandwidth
    return result


def per_token_plot(llm: LLM, path: str, positions: int) -> dict:
    """Time of each decode step against position, with the cache and with full recomputation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = llm.engine
    ids = prompt_ids(engine.tokenizer, 8)
    engine.add_request("timing", ids, SamplingParams(max_tokens=positions, temperature=0.0, ignore_eos=True))
    cached = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        cached.append(time.perf_counter() - start)
    cached = cached[1:]  # drop the prefill
    seq = list(ids)
    recompute_positions, recompute = [], []
    for pos in range(8, 8 + positions, max(1, positions // 48)):
        seq = (prompt_ids(engine.tokenizer, pos + 1))
        start = time.perf_counter()
        logits_without_cache(engine.model, seq)
        recompute.append(time.perf_counter() - start)
        recompute_positions.append(pos)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(range(9, 9 + len(cached)), [t * 1000 for t in cached],
            label="with KV cache: one new token per step, nearly flat (weights dominate)")
    ax.plot(recompute_positions, [t * 1000 for t in recompute],
            label="no cache: recompute all n tokens per step, linear per token (O(n^2) in total)")
    ax.set_xlabel("position of the generated token")
    ax.set_ylabel("time for that token (ms)")
    ax.set_title(f"SmolLM2-135M decode, {engine.dtype}, batch 1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return {"cached_ms_first": cached[0] * 1000, "cached_ms_last": cached[-1] * 1000,
            "recompute_ms_first": recompute[0] * 1000, "recompute_ms_last": recompute[-1] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--plot", help="write the per-token decode time plot here (PNG)")
    parser.add_argument("--plot-positions", type=int, default=512)
    parser.add_argument("--plot-only", action="store_true", help="only draw the per-token plot (no HF runs)")
    args = parser.parse_args()

    loaded = load_model()
    if args.plot_only:
        llm = LLM(dtype="float32", loaded=loaded, num_blocks=160, enable_prefix_caching=False)
        print(json.dumps(per_token_plot(llm, args.plot or "docs/decode_per_token.png", args.plot_positions)))
        return
    bandwidth, how = memory_read_bandwidth()
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s ({how}), torch threads: {torch.get_num_threads()}")
    results = []
    for dtype in args.dtypes.split(","):
        llm = LLM(dtype=dtype, loaded=loaded, num_blocks=160, enable_prefix_caching=False)
        hf = hf_model(loaded, getattr(torch, dtype))
        weight_bytes = llm.engine.model.weight_bytes()
        for prompt_len, n in CASES:
            ids = prompt_ids(llm.tokenizer, prompt_len)
            r = run_case(llm, hf, ids, n, args.repeats, weight_bytes, llm.engine.storage.bytes_per_token, bandwidth)
            r["dtype"] = dtype
            results.append(r)
            print(json.dumps(r))
        if args.plot and dtype == "float32":
            print(json.dumps(per_token_plot(llm, args.plot, args.plot_positions)))
        del llm, hf
    print()
    print("| dtype | prompt -> new | ours prefill tok/s | HF prefill tok/s | ratio | ours decode tok/s | "
          "HF decode tok/s | ratio | ours roofline | HF roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['prompt']} -> {r['new_tokens']} | {r['ours_prefill_tok_s']:.0f} | "
              f"{r['hf_prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f}x | {r['ours_decode_tok_s']:.1f} | "
              f"{r['hf_decode_tok_s']:.1f} | {r['decode_ratio']:.2f}x | {r['decode_roofline_fraction']:.0%} | "
              f"{r['hf_roofline_fraction']:.0%} |")


if __name__ == "__main__":
    main()
