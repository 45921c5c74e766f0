"""``kvcache chat``: a multi-turn chat on the terminal that reuses the conversation's KV cache.

Each turn renders the whole conversation with the chat template; prefix caching finds the blocks
of every earlier turn (prompt and reply), so only the new message is prefilled.
"""

from __future__ import annotations

import argparse
import sys

from kvcache.cli.generate import TextStream
from kvcache.cli.options import add_model_options, add_sampling_options, engine_kwargs, sampling_params

HELP = "Commands: /reset starts over, /stats shows the cache, /exit (or Ctrl-D) ends."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat on the terminal; each turn reuses the conversation's KV cache.")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvcache.engine.engine import LLMEngine

    params = sampling_params(args)
    engine = LLMEngine(**engine_kwargs(args))
    engine.tokenizer.apply_chat_template([{"role": "user", "content": "check"}])  # fail early without a template
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"kvcache chat: {engine.model_source} ({engine.dtype}). {HELP}", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text == "/stats":
            print(engine.stats(), file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        reply = _turn(engine, messages, params, f"turn-{turn}")
        messages.append({"role": "assistant", "content": reply})
        turn += 1


def _turn(engine, messages: list[dict], params, request_id: str) -> str:
    prompt = engine.tokenizer.apply_chat_template(messages)
    hits_before = engine.kv.prefix_cache_hits
    engine.add_request(request_id, prompt, params)
    sys.stdout.write("bot> ")
    stream = TextStream()
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            stream.update(out.outputs[0].text, final=out.finished)
            if out.finished:
                final = out
    m = final.metrics
    n_out = len(final.outputs[0].token_ids)
    seconds = (m["finish_time"] or m["first_token_time"]) - m["arrival_time"]
    print()
    print(f"  [{len(final.prompt_token_ids)} prompt tokens, {engine.kv.prefix_cache_hits - hits_before} "
          f"reused from the cache; {n_out} new tokens in {seconds:.2f} s]", file=sys.stderr)
    return final.outputs[0].text
