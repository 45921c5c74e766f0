"""``kvcache size``: the capacity planner on the command line."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from kvcache.cli.errors import writable_file
from kvcache.cli.options import int_between
from kvcache.sizing import (KV_DTYPES, KVEstimate, KVShape, capacity, count_params, human_bytes, kv_bytes,
                            kv_dtype, parse_bytes, preset, PRESETS)


model_factor = int_between(1, 1 << 20)  # layers, heads, head_dim, window: past any real model, small enough to plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("size", help="plan KV-cache memory",
                       description="KV bytes = 2 x layers x kv_heads x head_dim x seq_len x batch x bytes_per_element, "
                                   "for explicit factors, a model file, or a preset.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a well-known model: {', '.join(PRESETS)}")
    src.add_argument("--model", metavar="PATH", help="a GGUF file, a model folder with config.json, or gemma3")
    p.add_argument("--layers", type=model_factor, help="explicit factors: transformer layers")
    p.add_argument("--kv-heads", type=model_factor,
                   help="explicit factors: key/value heads per layer (GQA: fewer than query heads)")
    p.add_argument("--head-dim", type=model_factor, help="explicit factors: values per head")
    p.add_argument("--sliding-window", type=model_factor,
                   help="explicit factors: every layer keeps this many tokens")
    p.add_argument("--mla-latent-dim", type=model_factor,
                   help="explicit factors: MLA latent values per token per layer")
    p.add_argument("--seq-len", type=int_between(1, 1 << 40),
                   help="tokens per sequence, and the plot's x range (default: the model's context, or 4096)")
    p.add_argument("--batch", type=int_between(1, 1 << 40), default=1, help="sequences held at once (default: 1)")
    p.add_argument("--dtype", default="fp16",
                   help=f"KV element format: {', '.join(KV_DTYPES)}, or float32, bfloat16, float16 (default: fp16, "
                        "what GPU servers usually keep; `generate` runs the model in fp32 or bf16)")
    p.add_argument("--group-size", type=int, help="values per scale for fp8/int8/int4")
    p.add_argument("--memory", metavar="GB", help="memory for weights + KV cache, e.g. 80 or 24GiB (plain number: GB)")
    p.add_argument("--weights", metavar="SIZE", help="weights' size (default: parameters x --weights-dtype)")
    p.add_argument("--weights-dtype",
                   help="the weights' format, for their size: fp32, bf16, fp16, fp8, int8, int4; with --model also "
                        "auto, the file's own blocks, and then the bytes are what the engine holds, scales and "
                        "all (default: auto with --model, else bf16)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw KV bytes against context length (up to --seq-len) per dtype, with the weights and "
                        "--memory as lines; '.png' is added to a name without a suffix")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _held_weights(args: argparse.Namespace) -> tuple[int, str] | None:
    """(bytes, formats) the engine holds for --model's weights in --weights-dtype, read off the
    file's header; None where --weights-dtype is no format the engine keeps weights in (fp16, fp8)."""
    from kvcache.config import parse_weights_dtype
    from kvcache.engine.engine import resolve_dtype
    from kvcache.models.loader import read_model_config, weight_shapes
    from kvcache.models.packed import planned_weight_bytes
    name = args.weights_dtype or "auto"
    try:
        weights_dtype = parse_weights_dtype({"fp32": "float32", "bf16": "bfloat16"}.get(name.lower(), name))
    except ValueError:
        return None
    config = read_model_config(args.model)
    if weights_dtype not in ("auto", "float32") and config.mla is not None:
        return None
    held = planned_weight_bytes(weight_shapes(args.model), weights_dtype, resolve_dtype("auto"),
                                config.tie_word_embeddings)
    return sum(held.values()), " + ".join(sorted(held, key=held.get, reverse=True))


def _subject(args: argparse.Namespace) -> tuple[str, KVShape, int | None, int | None]:
    """(title, shape, parameter count or None, max context or None) from the chosen source."""
    if args.preset:
        p = preset(args.preset)
        return f"{p.name}  ({p.source})", p.shape, p.num_params, p.max_context
    if args.model:
        from kvcache.models.loader import read_model_config
        config = read_model_config(args.model)
        return args.model, KVShape.from_model_config(config), count_params(config), config.max_position_embeddings
    missing = [f"--{n.replace('_', '-')}" for n in ("layers", "kv_heads", "head_dim") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"Give --preset, --model, or all of --layers --kv-heads --head-dim (missing {' '.join(missing)}).")
    windows = (args.sliding_window,) * args.layers if args.sliding_window else ()
    shape = KVShape(args.layers, args.kv_heads, args.head_dim, windows, args.mla_latent_dim)
    return "explicit factors", shape, None, None


def run(args: argparse.Namespace) -> int:
    title, shape, params, max_context = _subject(args)
    seq_len = args.seq_len if args.seq_len is not None else max_context or 4096
    est = kv_bytes(shape, seq_len, args.batch, args.dtype, args.group_size)
    held = _held_weights(args) if args.model and not args.weights else None
    weights = parse_bytes(args.weights, "g") if args.weights else held[0] if held else \
        (params * kv_dtype(args.weights_dtype or "bf16").bits // 8 if params else None)
    result = _result(est, weights, max_context)
    if held:
        result["weights_formats"] = held[1]
    if args.memory:
        cap = capacity(shape, parse_bytes(args.memory, "g"), weights or 0, seq_len, args.batch, args.dtype,
                       args.group_size)
        result["capacity"] = asdict(cap) | {"memory_bytes": parse_bytes(args.memory, "g")}
    if args.plot:
        from kvcache.plots import plot_kv_vs_context
        plot_path = writable_file(args.plot, "--plot", ".png")
        memory = parse_bytes(args.memory, "g") if args.memory else None
        plot_kv_vs_context(shape, title, args.batch, weights, seq_len,
                           str(plot_path), args.group_size, memory)
        result["plot"] = str(plot_path)
    print(json.dumps(result) if args.json else describe(title, est, result))
    return 0


def _result(est: KVEstimate, weights: int | None, max_context: int | None) -> dict[str, Any]:
    s = est.shape
    return {
        "layers": s.num_layers, "kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
        "mla_latent_dim": s.mla_latent_dim, "seq_len": est.seq_len, "batch": est.batch,
        "dtype": est.dtype.name, "group_size": est.group_size, "bytes_per_element": est.bytes_per_element,
        "bytes": est.total_bytes, "bytes_per_token": est.bytes_per_token,
        "full_context_bytes": est.full_context_bytes,
        "sliding_layers": sum(1 for i in range(s.num_layers) if s.window_of(i) is not None),
        "weights_bytes": weights, "max_context": max_context,
    }


def _formula(est: KVEstimate) -> str:
    s, bpe = est.shape, f"{est.bytes_per_element:g}"
    if s.mla_latent_dim is not None:
        return (f"{s.num_layers} layers x {s.mla_latent_dim} latent values x {est.seq_len:,} tokens x "
                f"{est.batch} batch x {bpe} B")
    return (f"2 x {s.num_layers} layers x {s.num_kv_heads} kv_heads x {s.head_dim} head_dim x "
            f"{est.seq_len:,} tokens x {est.batch} batch x {bpe} B")


def describe(title: str, est: KVEstimate, r: dict[str, Any]) -> str:
    fmt = est.dtype
    scale = f", {fmt.note}" + (f", groups of {est.group_size}" if est.group_size else "")
    lines = [title, ""]
    if est.shape.mla_latent_dim is not None:
        lines.append(f"  layers            {r['layers']:>12,}")
        lines.append(f"  latent / token    {r['mla_latent_dim']:>12,}   (MLA: one latent vector, not 2 x heads x head_dim)")
    else:
        lines += [f"  layers            {r['layers']:>12,}", f"  kv_heads          {r['kv_heads']:>12,}",
                  f"  head_dim          {r['head_dim']:>12,}"]
    lines += [f"  seq_len           {r['seq_len']:>12,}", f"  batch             {r['batch']:>12,}",
              f"  bytes / element   {est.bytes_per_element:>12g}   ({fmt.name}{scale})", ""]
    total = f"{est.total_bytes:,} B ({human_bytes(est.total_bytes)})"
    if r["sliding_layers"]:
        lines.append(f"  full context      {_formula(est)} = {est.full_context_bytes:,} B")
        lines.append(f"  with windows      {r['sliding_layers']} of {r['layers']} layers keep only their sliding "
                     f"window: {total}")
    else:
        lines.append(f"  KV cache          {_formula(est)} = {total}")
    lines.append(f"  per token         {est.bytes_per_token:,.1f} B ({human_bytes(est.bytes_per_token)})")
    if r.get("weights_formats"):
        lines.append(f"  weights held      {r['weights_bytes']:,} B ({human_bytes(r['weights_bytes'])}; "
                     f"{r['weights_formats']}), what the engine keeps in memory")
    if r["max_context"] and est.seq_len > r["max_context"]:
        lines.append(f"  note              seq_len is past the model's context of {r['max_context']:,} tokens")
    cap = r.get("capacity")
    if cap:
        weights = r["weights_bytes"]
        lines += ["", f"  memory {human_bytes(cap['memory_bytes'])} - weights "
                      f"{human_bytes(weights) if weights else '(not counted: give --weights)'} = "
                      f"{human_bytes(cap['kv_budget_bytes'])} for the KV cache",
                  f"  largest batch at {est.seq_len:,} tokens:   {cap['max_batch_at_seq_len']:,}"]
        longest = cap["max_seq_len_at_batch"]
        lines.append(f"  longest context at batch {est.batch}:   " +
                     ("unbounded (every layer keeps a fixed window)" if longest is None else f"{longest:,} tokens") +
                     (f" (the model's own limit is {r['max_context']:,})" if r["max_context"] and
                      (longest is None or longest > r["max_context"]) else ""))
        if weights:
            cross = cap["crossover_seq_len_at_batch"]
            lines.append("  KV outweighs the weights from:  " +
                         (f"seq_len x batch = {cross * est.batch:,} tokens (seq_len {cross:,} at batch {est.batch}); "
                          if cross else f"never at batch {est.batch}; ") +
                         f"batch {cap['crossover_batch_at_seq_len']:,} at {est.seq_len:,} tokens")
    if r.get("plot"):
        lines += ["", f"  plot written to {r['plot']}"]
    return "\n".join(lines)
