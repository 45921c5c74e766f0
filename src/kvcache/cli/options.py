"""Options shared by the commands that load a model and run the engine (no torch imported here)."""

from __future__ import annotations

import argparse
from typing import Any

from kvcache.cache.offload_config import SPEC_HELP, parse_kv_offload
from kvcache.cli.errors import check_text
from kvcache.config import (KV_POLICIES, SamplingParams, SchedulerConfig, check_kv_budget, parse_weights_dtype,
                            speculative_config)
from kvcache.sizing import DTYPE_ALIASES, parse_bytes

MODEL_FORMATS = {"fp32": "float32", "bf16": "bfloat16"}
BIG = 1 << 31  # the largest count an option takes: past any real use, inside every 64-bit product


def int_between(low: int, high: int):
    """An argparse type: an integer in [low, high], else argparse's usage and one sentence."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:,} and {high:,}, got {value:,}")
        return value
    parse.__name__ = "integer"
    return parse


def model_dtype(name: str) -> str:
    """The torch dtype name the model runs in ("auto": the engine picks for this CPU), from any
    spelling ``kvcache size`` also accepts."""
    if name.lower() == "auto":
        return "auto"
    short = DTYPE_ALIASES.get(name.lower(), name.lower())
    if short == "fp16":
        raise ValueError(f"--dtype {name}: the model runs in fp32 (float32) or bf16 (bfloat16) here; float16 "
                         "matrix products on a CPU are slow and lose accuracy (fp16 stays a planning format "
                         "for `kvcache size`).")
    if short not in MODEL_FORMATS:
        raise ValueError(f"Unknown dtype {name!r}; the model runs in auto, fp32 (float32) or bf16 (bfloat16).")
    return MODEL_FORMATS[short]


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int_between(1, 4096), metavar="N",
                        help="CPU threads for the model (default: the cores not busy with other work when the "
                             "command starts, at least 1)")


def add_kv_policy_options(parser: argparse.ArgumentParser, sequence: str = "prompt + max tokens") -> None:
    parser.add_argument("--kv-policy", default="full", metavar="POLICY",
                        help=f"what a request's KV cache keeps: {', '.join(KV_POLICIES)} (full keeps every token; "
                             "the others keep at most --kv-budget tokens) (default: full)")
    parser.add_argument("--kv-budget", metavar="TOKENS|FRACTION",
                        help="KV tokens a request keeps under --kv-policy: a number of tokens (512) or a fraction "
                             f"of the sequence, {sequence} (0.2 or 20%%)")


def parse_kv_budget(text: str | None) -> int | float | None:
    """--kv-budget as the engine takes it: an int of tokens, or a float fraction ("0.2", "20%")."""
    if text is None:
        return None
    try:
        value: int | float = float(text[:-1]) / 100 if text.endswith("%") else \
            int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise ValueError(f"--kv-budget {text!r} is not a number; give tokens (512) or a fraction of the "
                         "sequence (0.2 or 20%).") from None
    try:
        check_kv_budget(value)
    except ValueError:
        raise ValueError(f"--kv-budget {text!r} must be a number of tokens of at least 1, or a fraction of the "
                         "sequence in (0, 1] (0.2 or 20%).") from None
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH",
                        help="a GGUF file, a Hugging Face model folder, or gemma3 (the packaged Gemma-3-270M) "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto",
                        help="the activations' format: auto (bf16 where the CPU multiplies it natively, else "
                             "fp32), fp32 (float32) or bf16 (bfloat16) (default: auto)")
    parser.add_argument("--weights-dtype", default="auto", metavar="FORMAT",
                        help="the format the weights are kept in: auto (the file's own: a GGUF's Q8_0, Q4_0 and "
                             "Q4_1 tensors as they are, others in the model's dtype), float32, bfloat16, int8 "
                             "(Q8_0-like) or int4 (Q4_1-like; embeddings and head in int8) (default: auto)")
    parser.add_argument("--max-model-len", type=int_between(2, BIG), metavar="TOKENS",
                        help="the longest sequence (prompt + output) to allow (default: the model's context)")
    parser.add_argument("--block-size", type=int_between(1, 1024),
                        help="tokens per KV block (default: 16; 32 with --kv-cache-dtype int4)")
    parser.add_argument("--num-blocks", type=int_between(1, BIG),
                        help="KV blocks in the pool (default: from --kv-cache-memory)")
    parser.add_argument("--kv-cache-memory", metavar="BYTES",
                        help="KV pool budget, e.g. 2GB or 512MiB (default: 1GiB)")
    parser.add_argument("--kv-cache-dtype", default="auto", metavar="FORMAT",
                        help="KV cache element format: auto (the model's dtype), float32, bfloat16, float16, "
                             "fp8, int8 or int4, or the short names fp32, bf16, fp16 (default: auto)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="turn prefix caching off (no reuse of earlier prompts' KV blocks)")
    parser.add_argument("--max-num-seqs", type=int_between(1, 1 << 16), default=64,
                        help="sequences per step (default: 64)")
    parser.add_argument("--max-num-batched-tokens", type=int_between(1, BIG), default=2048,
                        help="tokens per step (default: 2048)")
    parser.add_argument("--kv-offload", metavar="TIERS",
                        help=f"offload tiers below the KV pool, {SPEC_HELP}: host memory gets blocks the pool "
                             "evicts, disk and redis every block as it fills; a prefix the pool misses is "
                             "copied back from them (default: none)")
    add_threads_option(parser)
    parser.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"],
                        help="when KV blocks run out, recompute a preempted request's KV later or swap it "
                             "to host memory (default: recompute)")
    parser.add_argument("--speculative", choices=["ngram", "draft"],
                        help="speculative decoding: ngram (prompt lookup: drafts copied from the prompt and "
                             "output) or draft (a smaller model with the same vocabulary, --draft-model) "
                             "(default: off)")
    parser.add_argument("--num-speculative-tokens", type=int_between(1, 64), metavar="K",
                        help="tokens drafted per step with --speculative, at least 1 (default: 4)")
    parser.add_argument("--draft-model", metavar="PATH", help="the draft model for --speculative draft")
    parser.add_argument("--always-speculate", action="store_true",
                        help="verify every draft, even where the engine's step times say drafts cost more "
                             "than they bring (large batches, low acceptance) (default: off)")
    add_kv_policy_options(parser)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int_between(1, BIG), default=128,
                        help="tokens to generate at most (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 means greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample from the smallest set of tokens whose probability reaches this, in (0, 1] "
                             "(default: 1, off)")
    parser.add_argument("--top-k", type=int_between(-1, BIG), default=-1,
                        help="sample from the k most likely tokens only; -1 is off (default: -1)")
    parser.add_argument("--seed", type=int, help="random seed for sampling, a 64-bit integer (default: random)")
    parser.add_argument("--stop", action="append", metavar="TEXT",
                        help="stop when the output contains TEXT (the text is not shown); may be repeated")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLMEngine keyword arguments from the model options, validated (ValueError on bad values)."""
    return {
        "model": args.model, "dtype": model_dtype(args.dtype), "block_size": args.block_size,
        "weights_dtype": parse_weights_dtype(args.weights_dtype),
        "num_blocks": args.num_blocks, "kv_cache_dtype": args.kv_cache_dtype,
        "kv_cache_memory": parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
        "enable_prefix_caching": not args.no_prefix_caching,
        "max_model_len": args.max_model_len,
        "kv_offload": parse_kv_offload(args.kv_offload),
        "speculative": speculative_config(args.speculative, args.num_speculative_tokens, args.draft_model,
                                          adaptive=not args.always_speculate),
        "kv_policy": args.kv_policy, "kv_budget": parse_kv_budget(args.kv_budget),
        "scheduler_config": SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                            max_num_batched_tokens=args.max_num_batched_tokens,
                                            preemption_mode=args.preemption_mode),
    }


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    stop = [check_text(s, "--stop") for s in args.stop or ()] or None
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=stop)
