"""``kvcache serve``: the OpenAI-compatible server (FastAPI + uvicorn) on one engine loop."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kvcache.cli.options import add_model_options, engine_kwargs
from kvcache.server.limits import HEADER_TIMEOUT, Limits


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API over HTTP",
                       description="An OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions, "
                                   "/health, /metrics, and a live view of the KV cache at /.")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("KVCACHE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page at / "
                        "(default: $KVCACHE_API_KEY)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the model file's name)")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                   help=f"largest request body accepted (default: {Limits.max_body_bytes})")
    p.add_argument("--max-prompt-chars", type=int,
                   help="longest prompt (or sum of chat messages) in characters (default: 32 per token of "
                        "the context)")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT, metavar="SECONDS",
                   help=f"close connections whose request headers take longer (default: {HEADER_TIMEOUT:.0f})")
    p.add_argument("--metrics-open", action="store_true",
                   help="with --api-key, leave /metrics open for a Prometheus scraper")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from kvcache.engine.engine import LLMEngine
    from kvcache.server.app import create_app
    from kvcache.server.engine_loop import EngineLoop
    from kvcache.server.http_protocol import with_header_timeout

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}.")
    if args.api_key == "":
        raise ValueError("--api-key is empty; give a key, or leave the option out for an open server.")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars)
    protocol = with_header_timeout(args.header_timeout)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = LLMEngine(**engine_kwargs(args))
    name = args.served_model_name or Path(engine.model_source).stem.split(".")[0]
    app = create_app(EngineLoop(engine), name, args.api_key, limits, args.metrics_open)
    print(f"kvcache serve: {name} on http://{args.host}:{args.port} ({engine.pool.num_blocks} KV blocks of "
          f"{engine.cache_config.block_size}, {engine.dtype})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=protocol)
    return 0
