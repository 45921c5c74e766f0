"""``kvcache generate | chat | size``: the command line. Bad input gets one sentence and exit code 2."""

from __future__ import annotations

import argparse
import sys

from kvcache.cli import chat, generate, perplexity, serve, size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcache", description="An LLM inference engine built around its KV cache.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_parser(sub)
    chat.add_parser(sub)
    size.add_parser(sub)
    serve.add_parser(sub)
    perplexity.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except ValueError as err:
        print(f"kvcache {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
