"""Options shared by the commands that load a model and run the engine."""

from __future__ import annotations

import argparse
from typing import Any

from kvcache.config import SamplingParams, SchedulerConfig
from kvcache.sizing import parse_bytes


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH",
                        help="a GGUF file or a Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default: float32)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    parser.add_argument("--num-blocks", type=int, help="KV blocks in the pool (default: from --kv-cache-memory)")
    parser.add_argument("--kv-cache-memory", metavar="BYTES",
                        help="KV pool budget, e.g. 2GB or 512MiB (default: 1GiB)")
    parser.add_argument("--kv-cache-dtype", default="auto", metavar="FORMAT",
                        help="KV cache element format: auto (the model's dtype), float32, bfloat16, float16, "
                             "fp8, int8 or int4 (default: auto)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step (default: 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens per step (default: 2048)")
    parser.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "dtype": args.dtype, "block_size": args.block_size,
        "num_blocks": args.num_blocks, "kv_cache_dtype": args.kv_cache_dtype,
        "kv_cache_memory": parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
        "enable_prefix_caching": not args.no_prefix_caching,
        "scheduler_config": SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                            max_num_batched_tokens=args.max_num_batched_tokens,
                                            preemption_mode=args.preemption_mode),
    }


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)
