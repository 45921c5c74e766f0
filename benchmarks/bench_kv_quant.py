"""Quantized KV cache on SmolLM2: accuracy (PPL, KLD), capacity at a fixed budget, decode throughput.

    apt-get install r-cran-janeaustenr     # Jane Austen's novels (public domain), as a Debian package
    python benchmarks/bench_kv_quant.py accuracy   [--tokens 8192 --ctx 1024]
    flock /tmp/kvcache-bench.lock python benchmarks/bench_kv_quant.py capacity
    flock /tmp/kvcache-bench.lock python benchmarks/bench_kv_quant.py throughput [--seqs 64 --context 1024]

* accuracy: Persuasion (1818) scored in windows of --ctx tokens, each format against float32 in
  the same run (the same windows; the float32 logits computed once per window).
* capacity: sequences of --seq-len tokens that fit a fixed KV budget per format: the planner's
  answer, the engine's pool (blocks // blocks per sequence) and, unless --no-serve, the peak of
  running requests while the engine serves more than fit.
* throughput: --seqs sequences decoding at --context tokens of context, tokens/s per format
  (median of --repeats runs of --steps steps); runs of the formats alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from common import cpu_description, median
from kvcache import LLM, SamplingParams

FORMATS = ["float32", "bfloat16", "fp8", "int8", "int4"]
TEXT_CACHE = os.path.join(os.environ.get("KVCACHE_CACHE_DIR", os.path.expanduser("~/.cache/kvcache")),
                          "persuasion.txt")


def novel_text() -> str:
    """Persuasion by Jane Austen, exported once from the Debian package r-cran-janeaustenr."""
    if not os.path.exists(TEXT_CACHE):
        os.makedirs(os.path.dirname(TEXT_CACHE), exist_ok=True)
        try:
            subprocess.run(["Rscript", "-e", f"writeLines(janeaustenr::persuasion, '{TEXT_CACHE}')"], check=True)
        except (OSError, subprocess.CalledProcessError):
            sys.exit("The text comes from Debian's r-cran-janeaustenr: apt-get install r-cran-janeaustenr")
    with open(TEXT_CACHE, encoding="utf-8") as f:
        return f.read()


def accuracy(args: argparse.Namespace) -> None:
    from kvcache.cache.spec import resolve_kv_cache_dtype
    from kvcache.engine.engine import build_model
    from kvcache.models.loader import load_model
    from kvcache.runtime.scoring import Score, add, score_logits, window_logits, windows

    loaded = load_model(None)
    model = build_model(loaded, "float32", torch.device("cpu"))
    ids = loaded.tokenizer.encode(novel_text(), add_special_tokens=False)
    parts = windows(ids, args.ctx, args.tokens)
    totals = {f: Score(0, 0.0) for f in FORMATS}
    start = time.perf_counter()
    with torch.inference_mode():
        for i, window in enumerate(parts):
            ref = window_logits(model, window, "fp32")
            for name in FORMATS:
                fmt = resolve_kv_cache_dtype(name, "float32")
                logits = ref if fmt == "fp32" else window_logits(model, window, fmt)
                totals[name] = add(totals[name], score_logits(logits, window, ref))
            print(f"window {i + 1}/{len(parts)} done, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    base = totals["float32"].ppl
    for name, s in totals.items():
        print(json.dumps({"bench": "accuracy", "kv_cache_dtype": name, "tokens": s.tokens, "ctx": args.ctx,
                          "ppl": s.ppl, "delta_ppl_pct": 100 * (s.ppl / base - 1), "kld": s.mean_kld,
                          "top1_agreement": s.top1_agreement, "text_tokens": len(ids)}))


def capacity(args: argparse.Namespace) -> None:
    from kvcache.cache.spec import pool_block_bytes, resolve_kv_cache_dtype
    from kvcache.models.loader import load_model
    from kvcache.sizing import KVShape, kv_bytes

    loaded = load_model(None)
    shape = KVShape.from_model_config(loaded.config)
    budget = args.budget_mib << 20
    prompt = list(range(1000, 1000 + args.seq_len - 8))  # distinct token ids; no prefix sharing
    for name in FORMATS:
        fmt = resolve_kv_cache_dtype(name, "float32")
        per_seq = kv_bytes(shape, args.seq_len, 1, fmt, block_size=16).total_bytes
        llm = LLM(loaded=loaded, kv_cache_dtype=name, kv_cache_memory=budget, enable_prefix_caching=False)
        engine = llm.engine
        blocks_per_seq = -(-args.seq_len // 16)
        planned = engine.pool.num_blocks // blocks_per_seq
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        peak = None  # --no-serve: the pool's size alone (the engine admits no more than planned)
        for i in range(0 if args.no_serve else planned + 4):
            engine.add_request(None, [t + i for t in prompt], params)
        while engine.has_unfinished_requests():
            engine.step()
            peak = max(peak or 0, engine.stats()["num_requests_running"])
        print(json.dumps({"bench": "capacity", "kv_cache_dtype": name, "budget_bytes": budget,
                          "seq_len": args.seq_len, "bytes_per_seq_planner": per_seq,
                          "seqs_planner_tokens": budget // per_seq, "num_blocks": engine.pool.num_blocks,
                          "block_bytes": pool_block_bytes(engine.kv_groups, 16),
                          "seqs_planner_blocks": planned, "seqs_engine_peak": peak,
                          "preemptions": engine.stats()["num_preemptions"]}))


def throughput(args: argparse.Namespace) -> None:
    from kvcache.config import SchedulerConfig
    from kvcache.models.loader import load_model

    loaded = load_model(None)
    prefix = list(range(2000, 2000 + args.context - 16))  # shared by prefix caching: one prefill
    runs: dict[str, list[float]] = {f: [] for f in args.formats.split(",")}
    engines = {}
    for name in runs:
        kwargs = {} if name == "auto" else {"kv_cache_dtype": name}
        llm = LLM(loaded=loaded, dtype=args.dtype, kv_cache_memory=f"{args.kv_gib}GiB",
                  scheduler_config=SchedulerConfig(max_num_seqs=args.seqs, max_num_batched_tokens=4096), **kwargs)
        engines[name] = llm.engine
    for _ in range(args.repeats):
        for name, engine in engines.items():
            params = SamplingParams(max_tokens=args.steps + 1, temperature=0.0, ignore_eos=True)
            llm_warm = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            engine.add_request(None, prefix + [99] * 16, llm_warm)  # computes the shared prefix once
            while engine.has_unfinished_requests():
                engine.step()
            for i in range(args.seqs):
                engine.add_request(None, prefix + [100 + i] * 16, params)
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
                    engine.scheduler.waiting:
                engine.step()  # prefills (and the first sampled token)
            start, steps = time.perf_counter(), 0
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            elapsed = time.perf_counter() - start
            runs[name].append(args.seqs * steps / elapsed)
    base = median(runs[next(iter(runs))])
    for name, values in runs.items():
        print(json.dumps({"bench": "throughput", "kv_cache_dtype": name, "dtype": args.dtype, "seqs": args.seqs,
                          "context": args.context, "tok_s_median": median(values),
                          "ratio_vs_first": median(values) / base, "runs": values}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["accuracy", "capacity", "throughput"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--budget-mib", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-gib", type=float, default=0.5)
    parser.add_argument("--dtype", default="float32", help="the model's dtype (throughput)")
    parser.add_argument("--no-serve", action="store_true", help="capacity: size the pools, serve nothing")
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    print(f"# {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    {"accuracy": accuracy, "capacity": capacity, "throughput": throughput}[args.what](args)


if __name__ == "__main__":
    main()
