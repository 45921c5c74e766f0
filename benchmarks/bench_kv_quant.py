"""Quantized KV cache on SmolLM2: accuracy (PPL, KLD), capacity at a fixed budget, decode throughput.

    apt-get install r-cran-janeaustenr     # Jane Austen's novels (public domain), as a Debian package
    python benchmarks/bench_kv_quant.py accuracy   [--tokens 8192 --ctx 1024]
    python benchmarks/bench_kv_quant.py llamacpp   [--tokens 8192 --ctx 1024]   # needs llama-cpp-python
    flock /tmp/kvcache-bench.lock python benchmarks/bench_kv_quant.py capacity
    flock /tmp/kvcache-bench.lock python benchmarks/bench_kv_quant.py throughput [--seqs 64 --context 1024]
    flock /tmp/kvcache-bench.lock python benchmarks/bench_kv_quant.py reads [--seqs 64 --context 1024]

* accuracy: Persuasion (1818) scored in windows of --ctx tokens, each format against float32 in
  the same run (the same windows; the float32 logits computed once per window).
* llamacpp: the same windows of the same token ids through llama.cpp (the GGUF converted to F32),
  its K/V cache types f32, f16, q8_0 and q4_0 with flash attention on; PPL, KLD and top-1 against
  its f32 cache, which is llama.cpp's own float32 reference as ours is float32.
* capacity: sequences of --seq-len tokens that fit a fixed KV budget per format: the planner's
  answer, the engine's pool (blocks // blocks per sequence) and, unless --no-serve, the peak of
  running requests while the engine serves more than fit.
* throughput: --seqs sequences decoding at --context tokens of context, tokens/s per format
  (median of --repeats runs of --steps steps); runs of the formats alternate. A format written
  ``int8:pytorch`` runs its decode reads through the PyTorch path instead of the C kernel.
* reads: where a decode step's attention time goes, one layer of SmolLM2's shape (3 kv heads of 64,
  3 queries each) at --seqs x --context tokens: the cache's key_scores (gather, decode, q.k),
  the softmax and weighted_values, per format (median of --repeats; formats alternate); and, for
  the quantized formats when the C kernels are built, the same read through the kernel that
  dequantizes inside its dot products (kvcache.models.quant_decode), in the same runs, with its
  largest difference from the PyTorch path's output. --paths picks pytorch, kernel or both.
"""

from __future__ import annotations

import argparse
import contextlib
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


LLAMACPP_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}  # ggml_type ids


def llamacpp(args: argparse.Namespace) -> None:
    import numpy as np
    import llama_cpp as L
    from llamacpp_peer import convert
    from kvcache.models.loader import cache_dir, default_model_path, load_model
    from kvcache.runtime.scoring import Score, add, score_logits, windows

    ids = load_model(None).tokenizer.encode(novel_text(), add_special_tokens=False)
    parts = windows(ids, args.ctx, args.tokens)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False  # the weight-repacking path crashes on this machine (--no-repack)
    model = L.llama_model_load_from_file(str(convert(default_model_path(), "float32", cache_dir() / "bench")).encode(), mp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    contexts = {}
    for name, ggml_type in LLAMACPP_CACHE_TYPES.items():
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = args.ctx
        cp.type_k = cp.type_v = ggml_type
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.n_threads = cp.n_threads_batch = torch.get_num_threads()
        contexts[name] = L.llama_init_from_model(model, cp)
        if not contexts[name]:
            raise RuntimeError(f"llama.cpp could not create a context with a {name} KV cache")
    batch = L.llama_batch_init(args.ctx, 0, 1)
    totals = {name: Score(0, 0.0) for name in contexts}
    start = time.perf_counter()
    for i, window in enumerate(parts):
        logits = {}
        for name, ctx in contexts.items():
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            for j, token in enumerate(window):  # one sequence, every position's logits
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, j, 1, True
                batch.seq_id[j][0] = 0
            batch.n_tokens = len(window)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(window), n_vocab))
            logits[name] = torch.from_numpy(rows[:-1].copy())  # [len(window) - 1, vocab]
        for name in contexts:
            totals[name] = add(totals[name], score_logits(logits[name], window, logits["f32"]))
        print(f"window {i + 1}/{len(parts)} done, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    base = totals["f32"].ppl
    for name, s in totals.items():
        print(json.dumps({"bench": "llamacpp", "cache_type": name, "tokens": s.tokens, "ctx": args.ctx,
                          "ppl": s.ppl, "delta_ppl_pct": 100 * (s.ppl / base - 1), "kld": s.mean_kld,
                          "top1_agreement": s.top1_agreement, "llama_cpp_python": L.__version__}))
    L.llama_batch_free(batch)
    for ctx in contexts.values():
        L.llama_free(ctx)
    L.llama_model_free(model)


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
        per_seq = kv_bytes(shape, args.seq_len, 1, fmt).total_bytes  # at the format's default block size
        llm = LLM(loaded=loaded, kv_cache_dtype=name, kv_cache_memory=budget, enable_prefix_caching=False)
        engine = llm.engine
        bs = engine.cache_config.block_size
        blocks_per_seq = -(-args.seq_len // bs)
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
                          "block_size": bs, "block_bytes": pool_block_bytes(engine.kv_groups, bs),
                          "seqs_planner_blocks": planned, "seqs_engine_peak": peak,
                          "preemptions": engine.stats()["num_preemptions"]}))


@contextlib.contextmanager
def pytorch_reads(active: bool):
    """While active, quantized decode reads take the PyTorch path (the kernel's ``applies`` says no)."""
    from kvcache.models import quant_decode

    applies = quant_decode.applies
    if active:
        quant_decode.applies = lambda *args: False
    try:
        yield
    finally:
        quant_decode.applies = applies


def throughput(args: argparse.Namespace) -> None:
    from kvcache.config import SchedulerConfig
    from kvcache.models.loader import load_model

    loaded = load_model(None)
    prefix = list(range(2000, 2000 + args.context - 16))  # shared by prefix caching: one prefill
    runs: dict[str, list[float]] = {f: [] for f in args.formats.split(",")}
    engines = {}
    for label in runs:
        name = label.split(":")[0]  # "int8:pytorch": the int8 cache, read without the kernel
        kwargs = {} if name == "auto" else {"kv_cache_dtype": name}
        llm = LLM(loaded=loaded, dtype=args.dtype, kv_cache_memory=f"{args.kv_gib}GiB",
                  scheduler_config=SchedulerConfig(max_num_seqs=args.seqs, max_num_batched_tokens=4096), **kwargs)
        engines[label] = llm.engine
    for _ in range(args.repeats):
        for name, engine in engines.items():
            with pytorch_reads(name.endswith(":pytorch")):
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


def reads(args: argparse.Namespace) -> None:
    from kvcache import kernels
    from kvcache.cache.spec import KVCacheGroup, KVSpec, resolve_kv_cache_dtype
    from kvcache.cache.storage import KVCache
    from kvcache.models import quant_decode
    from kvcache.sizing import kv_dtype

    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name in args.formats.split(","):
        fmt = resolve_kv_cache_dtype(name, "float32")
        bs = kv_dtype(fmt).default_block_size
        blocks = args.seqs * -(-args.context // bs)
        cache = KVCache((KVCacheGroup(0, KVSpec(3, 64, fmt), (0,)),), blocks, bs)
        x = torch.randn(blocks * bs, 3, 64, generator=gen)
        cache.layers[0].write(x, x, torch.arange(blocks * bs))
        layers[name] = (cache.layers[0], torch.randperm(blocks, generator=gen))  # scattered blocks
    q = torch.randn(3, args.seqs, 3, 64, generator=gen)  # [kv_heads, seqs, group, head_dim]
    rows = q.transpose(0, 1).reshape(args.seqs, 9, 64)  # the same queries as decode rows [seqs, heads, hd]
    paths = args.paths.split(",")
    kernel = "kernel" in paths and kernels.library() is not None
    times: dict[tuple[str, str], dict[str, list[float]]] = {}
    for name in layers:
        if "pytorch" in paths:
            times[name, "pytorch"] = {"key_scores": [], "softmax": [], "weighted_values": []}
        if kernel and quant_decode.applies(rows, layers[name][0], False):
            times[name, "kernel"] = {"attention": []}
    differences: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (layer, table) in layers.items():
            if (name, "pytorch") in times:
                t0 = time.perf_counter()
                scores = layer.key_scores(q, table)[..., :args.context]
                t1 = time.perf_counter()
                weights = torch.softmax(scores.float() * 0.125, dim=-1)
                t2 = time.perf_counter()
                expected = layer.weighted_values(weights, table)  # [kv_heads, seqs, group, hd]
                t3 = time.perf_counter()
                for part, dt in zip(times[name, "pytorch"].values(), (t1 - t0, t2 - t1, t3 - t2)):
                    part.append(dt)
            if (name, "kernel") in times:
                t0 = time.perf_counter()
                out = quant_decode.decode(rows, layer, table.view(args.seqs, -1), [args.context] * args.seqs,
                                          None, 0.125)  # [seqs, heads, hd]
                times[name, "kernel"]["attention"].append(time.perf_counter() - t0)
                if (name, "pytorch") in times:
                    ours = out.view(args.seqs, 3, 3, 64).transpose(0, 1)  # [kv_heads, seqs, group, hd]
                    differences[name] = float((ours - expected).abs().max() / expected.abs().max())
    base = sum(median(v) for v in next(iter(times.values())).values())
    for (name, path), parts in times.items():
        total = sum(median(v) for v in parts.values())
        print(json.dumps({"bench": "reads", "kv_cache_dtype": name, "path": path, "seqs": args.seqs,
                          "context": args.context, **{f"{part}_ms": 1000 * median(v) for part, v in parts.items()},
                          "total_ms": 1000 * total, "ratio_vs_first": total / base,
                          **({"max_rel_difference_vs_pytorch": differences[name]}
                             if path == "kernel" and name in differences else {})}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["accuracy", "llamacpp", "capacity", "throughput", "reads"])
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
    parser.add_argument("--paths", default="pytorch,kernel", help="reads: pytorch, kernel or both (comma-separated)")
    parser.add_argument("--threads", type=int, default=None, help="torch's threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    {"accuracy": accuracy, "llamacpp": llamacpp, "capacity": capacity, "throughput": throughput, "reads": reads}[args.what](args)


if __name__ == "__main__":
    main()
