"""``kvcache generate``: one prompt, streamed to the terminal, with speed and KV-cache figures."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import TYPE_CHECKING, Any

from kvcache.cli.errors import CommandFailed, UsageError, check_text
from kvcache.cli.options import add_model_options, add_sampling_options, engine_kwargs, sampling_params

if TYPE_CHECKING:
    from kvcache.config import ModelConfig
    from kvcache.engine.engine import LLMEngine, RequestOutput
    from kvcache.models.tokenizer import Tokenizer

DEFAULT_PROMPT = "Explain in three sentences why a KV cache makes text generation faster."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate from PROMPT and report prefill/decode speed and KV-cache bytes. "
                                   "The prompt is read from stdin when PROMPT is '-' or stdin is a pipe.")
    p.add_argument("prompt", nargs="?",
                   help=f"the prompt; '-' reads stdin (default: stdin if piped, else {DEFAULT_PROMPT!r})")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="a system message (implies --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(run=run)


class TextStream:
    """Prints only what is new in a growing text, holding back a half-decoded character."""

    def __init__(self, out=None) -> None:
        self.out = out or sys.stdout
        self.shown = 0

    def update(self, text: str, final: bool = False) -> None:
        visible = text if final else text.rstrip("\ufffd")
        if len(visible) > self.shown:
            self.out.write(visible[self.shown:])
            self.out.flush()
            self.shown = len(visible)


def _stdin_is_piped() -> bool:
    mode = os.fstat(sys.stdin.fileno()).st_mode if sys.stdin and not sys.stdin.closed else 0
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def read_stdin_text() -> str:
    """All of stdin as UTF-8 text; ValueError naming the first byte that is not UTF-8."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"stdin is not valid UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "pass UTF-8 text.") from None


def prompt_text(args: argparse.Namespace) -> str:
    """The prompt from the argument, '-' (stdin) or a piped stdin, checked to be UTF-8 text."""
    if args.prompt == "-" or (args.prompt is None and _stdin_is_piped()):
        text = read_stdin_text()
        if not text.strip():
            raise UsageError("The prompt read from stdin is empty; pipe some text or give PROMPT.")
        return text.rstrip("\n")
    return check_text(args.prompt if args.prompt is not None else DEFAULT_PROMPT, "The prompt")


def build_prompt(tokenizer: Tokenizer, args: argparse.Namespace, text: str, max_model_len: int) -> list[int]:
    """Token ids of the prompt (chat-templated with --chat or --system), checked against the context."""
    if args.chat or args.system is not None:
        system = [{"role": "system", "content": check_text(args.system, "--system")}] if args.system else []
        text = tokenizer.apply_chat_template(system + [{"role": "user", "content": text}])
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("The prompt is empty; give at least one token.")
    room = max_model_len - len(ids)
    if room < 1:
        raise ValueError(f"The prompt has {plural(len(ids), 'token')}; the context is "
                         f"{plural(max_model_len, 'token')}, which must also hold at least one new token.")
    if args.max_tokens > room:
        raise ValueError(f"--max-tokens {args.max_tokens} plus the prompt's {plural(len(ids), 'token')} is past "
                         f"the context of {plural(max_model_len, 'token')}; give --max-tokens {room} or less.")
    return ids


def sized_to_request(kwargs: dict[str, Any], num_tokens: int, config: ModelConfig) -> dict[str, Any]:
    """A one-shot command needs KV blocks for its one request only: unless the pool's size was
    given, allocate ceil(tokens / block_size) blocks per cache group (each group's table holds its
    own; Gemma-3-270M has six) instead of the default 1 GiB."""
    if kwargs["num_blocks"] is None and kwargs["kv_cache_memory"] is None:
        from kvcache.cache.spec import group_layers, layer_specs, resolve_kv_cache_dtype
        from kvcache.engine.engine import resolve_dtype
        from kvcache.sizing import kv_dtype
        fmt = resolve_kv_cache_dtype(kwargs["kv_cache_dtype"], resolve_dtype(kwargs["dtype"]))
        block_size = kwargs["block_size"] or kv_dtype(fmt).default_block_size
        groups = len(group_layers(layer_specs(config, fmt)))
        kwargs = dict(kwargs, num_blocks=groups * -(-num_tokens // block_size))
    return kwargs


def run(args: argparse.Namespace) -> int:
    from kvcache.engine.engine import LLMEngine
    from kvcache.models.loader import load_model

    params = sampling_params(args)
    text = prompt_text(args)
    kwargs = engine_kwargs(args)
    loaded = load_model(args.model)
    context = min(args.max_model_len or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings)
    ids = build_prompt(loaded.tokenizer, args, text, context)
    engine = LLMEngine(loaded=loaded, **sized_to_request(kwargs, len(ids) + args.max_tokens, loaded.config))
    del loaded  # the engine holds what it needs from it
    engine.add_request("cli", ids, params)
    stream = None if args.json else TextStream()
    final: RequestOutput | None = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if stream:
                stream.update(out.outputs[0].text, final=out.finished)
            if out.finished:
                final = out
    if final is None or getattr(final, "error", None):
        raise CommandFailed(f"generation failed: {getattr(final, 'error', None) or 'no output'}.")
    report = figures(engine, final)
    if args.json:
        print(json.dumps({"text": final.outputs[0].text, "token_ids": final.outputs[0].token_ids,
                          "prompt_token_ids": final.prompt_token_ids,
                          "finish_reason": final.outputs[0].finish_reason, **report}))
    else:
        print(file=sys.stdout, flush=True)
        print(describe(engine, report), file=sys.stderr)
    return 0


def figures(engine: LLMEngine, out: RequestOutput) -> dict[str, Any]:
    """Speed and KV bytes of one finished request: held (read off the tensors) and planned (formula)."""
    import torch

    m = out.metrics
    prefill_s = m["first_token_time"] - m["arrival_time"]
    n_out = len(out.outputs[0].token_ids)
    decode_s = (m["finish_time"] or m["first_token_time"]) - m["first_token_time"]
    held = m["num_kv_tokens_held"]  # per cache group, after any eviction
    kv_tokens = max(held)
    return {
        "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": n_out,
        "prefill_seconds": prefill_s, "prefill_tokens_per_second": len(out.prompt_token_ids) / prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_second": (n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else None,
        "kv_tokens": kv_tokens, "kv_tokens_evicted": m["num_kv_tokens"] - kv_tokens,
        "kv_cache_bytes": engine.storage.bytes_held(held),
        "kv_cache_bytes_formula": engine.kv_bytes_for_tokens(kv_tokens),
        "kv_blocks": m["peak_kv_blocks"], "kv_bytes_allocated": m["peak_kv_bytes"],
        "block_size": engine.cache_config.block_size, "kv_pool_blocks": engine.pool.num_blocks, "dtype": engine.dtype,
        "weights": engine.weight_formats, "weight_bytes": engine.weight_bytes,
        "kv_cache_dtype": engine.kv_cache_dtype, "threads": torch.get_num_threads(),
    }


def plural(n: int, word: str) -> str:
    """'1 token', '2 tokens', '1,024 tokens'."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def describe(engine: LLMEngine, f: dict[str, Any]) -> str:
    """The figures as the lines printed after the text. The first token comes out of the prefill,
    so decode covers the tokens after it, and its rate is over exactly those."""
    cfg = engine.model_config
    bpe = f"{engine.storage.bytes_per_element:g}"
    decoded = f["completion_tokens"] - 1
    rate = f", {f['decode_tokens_per_second']:.1f} tok/s" if f["decode_tokens_per_second"] else ""
    match = "match" if f["kv_cache_bytes"] == f["kv_cache_bytes_formula"] else "MISMATCH"
    evicted = f" ({f['kv_tokens_evicted']:,} dropped by the eviction policy)" if f["kv_tokens_evicted"] else ""
    draft = engine.stats().get("draft_kv_cache_bytes")
    draft_line = [] if draft is None else [
        f"draft    the draft model's own KV pool: {draft:,} B for {engine.pool.num_blocks:,} blocks, beside the "
        "target's (not in the lines above); its prefill of the prompt counts in the decode time"]
    per_token_formula = f"{cfg.num_layers} layers x {cfg.mla.latent_dim} latent values" if cfg.mla else \
        f"2 x {cfg.num_layers} layers x {cfg.num_kv_heads} kv_heads x {cfg.head_dim} head_dim"
    return "\n".join([
        "",
        f"prefill  {plural(f['prompt_tokens'], 'token')} in {f['prefill_seconds']:.3f} s "
        f"({f['prefill_tokens_per_second']:.1f} tok/s), then the first new token",
        f"decode   {plural(decoded, 'more token')} in {f['decode_seconds']:.3f} s{rate}; "
        f"{f['dtype']}, KV cache {f['kv_cache_dtype']}, {plural(f['threads'], 'thread')}",
        f"weights  {f['weight_bytes']:,} B held ({f['weights']})",
        f"KV held  {f['kv_cache_bytes']:,} B for {plural(f['kv_tokens'], 'token')}{evicted} "
        f"({engine.storage.bytes_per_token:,} B/token, read off the cache tensors); "
        f"{plural(f['kv_blocks'], 'block')} of {f['block_size']} allocated = {f['kv_bytes_allocated']:,} B",
        f"formula  {per_token_formula} x "
        f"{plural(f['kv_tokens'], 'token')} x 1 x {bpe} B = {f['kv_cache_bytes_formula']:,} B  ({match})",
        *draft_line,
    ])
