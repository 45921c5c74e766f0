"""``kvcache generate | chat | size | serve``: the command line.

A person's mistake or a condition of the environment (a missing directory, a closed pipe, bytes
that are not UTF-8, a damaged file) gets one sentence on stderr and a non-zero exit, never a
traceback. Building the parser imports no torch: ``--help``, ``--version`` and ``size`` start fast.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

from kvcache import __version__ as VERSION
from kvcache.cli import chat, generate, perplexity, serve, size
from kvcache.cli.errors import CommandFailed, UsageError, describe_os_error
from kvcache.cli.threads import apply_threads

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own parser (for usage messages)."""
    parser = argparse.ArgumentParser(
        prog="kvcache", description="An LLM inference engine built around its KV cache.")
    parser.add_argument("--version", action="version", version=f"kvcache {VERSION}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (generate, chat, size, serve, perplexity):
        module.add_parser(sub)
    return parser, dict(sub.choices)


def _parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse argv; an unknown option is reported with the usage of the command it was given to."""
    parser, commands = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = commands.get(args.command, parser)
        target.error(f"unrecognized arguments: {' '.join(extra)}{_suggestion(target, extra)}")
    return parser, args


def _suggestion(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """' (did you mean --top-p?)' for the first unknown option that is close to a real one."""
    known = [s for action in parser._actions for s in action.option_strings]
    for word in extra:
        close = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("-") else []
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    name = f"kvcache {args.command}"
    try:
        if hasattr(args, "threads"):  # a command that runs a model
            apply_threads(args.threads)
        return args.run(args) or 0
    except (ValueError, UsageError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        _silence_stdout()
        print(f"{name}: stopped: the program reading the output closed the pipe.", file=sys.stderr)
        return EXIT_BROKEN_PIPE
    except CommandFailed as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{name}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise  # a bug, not a condition of the machine: the traceback is for us
        print(f"{name}: error: out of memory: {_first_line(err)}; give a smaller --kv-cache-memory or "
              "--num-blocks, or a smaller model.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted.", file=sys.stderr)
        return 130


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].split("] ")[-1].rstrip(".") if text else type(err).__name__


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
