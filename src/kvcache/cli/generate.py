"""``kvcache generate``: one prompt, streamed to the terminal, with speed and KV-cache figures."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvcache.cli.options import add_model_options, add_sampling_options, engine_kwargs, sampling_params
from kvcache.engine.engine import LLMEngine, RequestOutput

DEFAULT_PROMPT = "Explain in three sentences why a KV cache makes text generation faster."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate from PROMPT and report prefill/decode speed and KV-cache bytes.")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(run=run)


class TextStream:
    """Prints only what is new in a growing text, holding back a half-decoded character."""

    def __init__(self, out=sys.stdout) -> None:
        self.out = out
        self.shown = 0

    def update(self, text: str, final: bool = False) -> None:
        visible = text if final else text.rstrip("\ufffd")
        if len(visible) > self.shown:
            self.out.write(visible[self.shown:])
            self.out.flush()
            self.shown = len(visible)


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    engine = LLMEngine(**engine_kwargs(args))
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) \
        if args.chat else args.prompt
    engine.add_request("cli", prompt, params)
    stream = None if args.json else TextStream()
    final: RequestOutput | None = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if stream:
                stream.update(out.outputs[0].text, final=out.finished)
            if out.finished:
                final = out
    assert final is not None
    report = figures(engine, final)
    if args.json:
        print(json.dumps({"text": final.outputs[0].text, "token_ids": final.outputs[0].token_ids,
                          "prompt_token_ids": final.prompt_token_ids,
                          "finish_reason": final.outputs[0].finish_reason, **report}))
    else:
        print(file=sys.stdout)
        print(describe(engine, report), file=sys.stderr)
    return 0


def figures(engine: LLMEngine, out: RequestOutput) -> dict[str, Any]:
    """Speed and KV bytes of one finished request: held (read off the tensors) and planned (formula)."""
    m = out.metrics
    prefill_s = m["first_token_time"] - m["arrival_time"]
    n_out = len(out.outputs[0].token_ids)
    decode_s = (m["finish_time"] or m["first_token_time"]) - m["first_token_time"]
    kv_tokens = m["num_kv_tokens"]
    return {
        "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": n_out,
        "prefill_seconds": prefill_s, "prefill_tokens_per_second": len(out.prompt_token_ids) / prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_second": (n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else None,
        "kv_tokens": kv_tokens,
        "kv_cache_bytes": engine.storage.bytes_held(kv_tokens),
        "kv_cache_bytes_formula": engine.kv_bytes_for_tokens(kv_tokens),
        "kv_blocks": m["peak_kv_blocks"], "kv_bytes_allocated": m["peak_kv_bytes"],
        "block_size": engine.cache_config.block_size, "dtype": engine.dtype,
        "kv_cache_dtype": engine.kv_cache_dtype,
    }


def describe(engine: LLMEngine, f: dict[str, Any]) -> str:
    cfg = engine.model_config
    bpe = f"{engine.storage.bytes_per_element:g}"
    decode = f"{f['decode_tokens_per_second']:.1f} tok/s" if f["decode_tokens_per_second"] else "n/a"
    match = "match" if f["kv_cache_bytes"] == f["kv_cache_bytes_formula"] else "MISMATCH"
    return "\n".join([
        "",
        f"prefill  {f['prompt_tokens']} tokens in {f['prefill_seconds']:.3f} s "
        f"({f['prefill_tokens_per_second']:.1f} tok/s)",
        f"decode   {f['completion_tokens']} tokens in {f['decode_seconds']:.3f} s ({decode}), {f['dtype']}, KV cache {f['kv_cache_dtype']}",
        f"KV held  {f['kv_cache_bytes']:,} B for {f['kv_tokens']} tokens "
        f"({engine.storage.bytes_per_token:,} B/token, read off the cache tensors); "
        f"{f['kv_blocks']} blocks of {f['block_size']} allocated = {f['kv_bytes_allocated']:,} B",
        f"formula  2 x {cfg.num_layers} layers x {cfg.num_kv_heads} kv_heads x {cfg.head_dim} head_dim x "
        f"{f['kv_tokens']} tokens x 1 x {bpe} B = {f['kv_cache_bytes_formula']:,} B  ({match})",
    ])
