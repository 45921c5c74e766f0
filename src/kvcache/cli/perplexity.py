"""``kvcache perplexity FILE``: how well the model predicts a text, with the KV cache in a chosen format.

Prints perplexity and the tokens scored; with ``--kld``, also the mean KL divergence and top-1
agreement of every position's distribution against the same model with an unquantized cache
(the model's own dtype), computed in the same run. This is how the accuracy of a KV format is
measured (see BENCHMARKS.md). With ``--kv-policy P --kv-budget B`` each window advances
``--kv-step`` tokens at a time (16 by default) while the policy evicts, and ``--kld`` compares
against the full cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from kvcache.cli.options import add_kv_policy_options, add_threads_option, int_between, parse_kv_budget


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="score a text file: perplexity (and KLD) per KV cache format",
                       description="Tokenize FILE, score it in consecutive windows of --ctx tokens (each from "
                                   "its second token on) and print the perplexity.")
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    p.add_argument("--model", metavar="PATH",
                   help="a GGUF file or a Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32",
                   help="the model's dtype: auto, float32 or bfloat16 (default: float32)")
    p.add_argument("--weights-dtype", default="auto", metavar="FORMAT",
                   help="the weights' format: auto (the file's own), float32, bfloat16, int8 or int4 (default: auto)")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per window (default: 1024)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score at most N tokens (default: the whole text)")
    p.add_argument("--kv-cache-dtype", default="auto", metavar="FORMAT",
                   help="auto (the model's dtype), float32 (fp32), bfloat16 (bf16), float16 (fp16), fp8, int8 or int4 "
                        "(default: auto)")
    p.add_argument("--kld", action="store_true",
                   help="also compare each position against an unquantized cache: mean KLD, top-1 agreement")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_kv_policy_options(p, sequence="the --ctx window")
    p.add_argument("--kv-step", type=int_between(1, 1 << 20), default=16, metavar="TOKENS",
                   help="with --kv-policy: tokens computed per step; the policy evicts before each (default: 16)")
    add_threads_option(p)
    p.set_defaults(run=run)


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; give a UTF-8 text file to score.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}).") from None


def _progress_bar(stream=sys.stderr):
    """A one-line progress bar on a terminal (windows done / total, elapsed); nothing otherwise."""
    if not stream.isatty():
        return None
    start = time.monotonic()

    def show(done: int, total: int) -> None:
        filled = 30 * done // total
        stream.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {done}/{total} windows, "
                     f"{time.monotonic() - start:.0f} s")
        if done == total:
            stream.write("\n")
        stream.flush()
    return show


def run(args: argparse.Namespace) -> int:
    from kvcache.cache.spec import MODEL_DTYPE_FORMATS, resolve_kv_cache_dtype
    from kvcache.config import parse_model_dtype, parse_weights_dtype

    from kvcache.cache.policies import KVPolicy

    parse_model_dtype(args.dtype)
    weights_dtype = parse_weights_dtype(args.weights_dtype)
    resolve_kv_cache_dtype(args.kv_cache_dtype, "float32")  # a bad format fails here, before any loading
    policy = KVPolicy(args.kv_policy, parse_kv_budget(args.kv_budget))
    if args.kv_budget is not None and not policy.evicts:
        raise ValueError("--kv-budget needs a --kv-policy that evicts: streaming, h2o or snapkv.")
    if args.ctx < 2:
        raise ValueError(f"--ctx must be at least 2 tokens, got {args.ctx}.")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}.")
    text = _read_text(args.file)

    import torch

    from kvcache.engine.engine import build_model, default_device, resolve_dtype
    from kvcache.models.loader import load_model
    from kvcache.runtime.scoring import score_text, score_text_with_policy

    dtype = resolve_dtype(args.dtype, default_device())
    kv_format = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype)
    loaded = load_model(args.model)
    if args.ctx > loaded.config.max_position_embeddings:
        raise ValueError(f"--ctx {args.ctx} is longer than the model's context "
                         f"({loaded.config.max_position_embeddings} tokens).")
    model = build_model(loaded, dtype, default_device(), weights_dtype)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    start = time.perf_counter()
    reference = MODEL_DTYPE_FORMATS[dtype] if args.kld else None
    with torch.inference_mode():
        if policy.evicts:
            score = score_text_with_policy(model, ids, args.ctx, kv_format, policy, args.kv_step, reference,
                                           args.max_tokens, _progress_bar())
        else:
            score = score_text(model, ids, args.ctx, kv_format, reference, args.max_tokens, _progress_bar())
    result: dict[str, Any] = {"ppl": score.ppl, "tokens": score.tokens, "kv_cache_dtype": kv_format,
                              "ctx": args.ctx, "dtype": dtype, "weights_dtype": weights_dtype,
                              "weight_bytes": model.weight_bytes(), "text_tokens": len(ids),
                              "seconds": time.perf_counter() - start}
    if policy.evicts:
        result |= {"kv_policy": policy.name, "kv_budget": policy.budget, "kv_step": args.kv_step}
    if args.kld:
        result |= {"kld": score.mean_kld, "top1_agreement": score.top1_agreement,
                   "kld_reference": MODEL_DTYPE_FORMATS[dtype]}
    print(json.dumps(result) if args.json else _describe(result))
    return 0


def _describe(r: dict[str, Any]) -> str:
    lines = [f"perplexity {r['ppl']:.4f} over {r['tokens']:,} tokens (windows of {r['ctx']}, "
             f"KV cache {r['kv_cache_dtype']}, model {r['dtype']}, weights {r['weights_dtype']} "
             f"({r['weight_bytes']:,} B), {r['seconds']:.1f} s)"]
    if "kv_policy" in r:
        lines.append(f"KV policy  {r['kv_policy']}, budget {r['kv_budget']}, evicting before every "
                     f"{r['kv_step']}-token step")
    if "kld" in r:
        lines.append(f"KLD        {r['kld']:.6f} nats/token against a {r['kld_reference']} cache; "
                     f"top-1 agreement {100 * r['top1_agreement']:.2f}%")
    return "\n".join(lines)
