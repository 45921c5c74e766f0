"""``kvcache chat``: a multi-turn chat on the terminal, as people know it from llama-cli or ollama run.

Line editing and history (the standard ``readline``), multi-line messages (end a line with ``\\``,
or wrap them in lines of ``\"\"\"``), Ctrl-C stops the reply and keeps the session, Ctrl-D leaves,
slash commands (``/help``). Each turn renders the whole conversation with the chat template; prefix
caching finds the full KV blocks of the earlier turns, so they are not computed again. When the
conversation outgrows the context, the oldest turns are dropped, and the status line says so.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kvcache.cli.conversation import Conversation
from kvcache.cli.errors import check_text, describe_os_error, writable_file
from kvcache.cli.generate import TextStream, plural
from kvcache.cli.options import add_model_options, add_sampling_options, engine_kwargs, sampling_params
from kvcache.sizing import human_bytes

PROMPT, MORE = ">>> ", "... "
HELP = """Commands:
  /help           this list
  /stats          the KV cache and the prefix cache, as a table
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message (/system alone shows it)
  /save FILE      write the conversation to FILE (JSON)
  /load FILE      continue a conversation saved with /save
  /exit           leave (or Ctrl-D)
Keys: arrows and Ctrl-R edit and recall lines; end a line with \\ or wrap lines in \"\"\" for a
multi-line message; Ctrl-C stops a reply (what was written stays in the conversation)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat on the terminal; each turn reuses the conversation's KV cache. "
                                   "Type /help in the chat for its commands.")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    p.set_defaults(run=run)


def _enable_line_editing() -> None:
    """Arrow keys, history (kept in the cache folder between sessions) and Ctrl-R, where available."""
    try:
        import atexit
        import readline
    except ImportError:  # no readline (e.g. Windows): plain input still works
        return
    from kvcache.models.loader import cache_dir
    history = cache_dir() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass
    atexit.register(save)


def read_message() -> str:
    """One message from the terminal: a line, lines joined by a trailing backslash, or a block
    between lines of triple quotes. EOFError on Ctrl-D."""
    line = input(PROMPT)
    if line.strip() == '"""':
        lines = []
        while (line := input(MORE)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    while line.endswith("\\"):
        line = line[:-1] + "\n" + input(MORE)
    return line


class Chat:
    """The session: one engine, one conversation, the commands, one reply at a time."""

    def __init__(self, engine, params, conversation: Conversation) -> None:
        self.engine = engine
        self.params = params
        self.conversation = conversation
        self.turns = 0
        self.last_turn: str | None = None  # its KV is kept for the next turn to continue from
        self.room = engine.max_model_len - params.max_tokens  # prompt tokens a turn may use
        if self.room < 1:
            raise ValueError(f"--max-tokens {params.max_tokens} leaves no room for a message in the context of "
                             f"{engine.max_model_len:,} tokens; give a smaller --max-tokens.")

    # --- commands ----------------------------------------------------------------------------

    def command(self, text: str) -> bool:
        """Run a slash command; False when the session should end."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        actions = {"/help": lambda: print(HELP), "/stats": self.print_stats, "/reset": self.reset,
                   "/system": lambda: self.set_system(arg), "/save": lambda: self.save(arg),
                   "/load": lambda: self.load(arg)}
        action = actions.get(name)
        if action is None:
            say(f"unknown command {name}; /help lists the commands (start a message with // to send a slash).")
            return True
        try:
            action()
        except ValueError as err:
            say(str(err))
        except OSError as err:
            say(describe_os_error(err))
        return True

    def reset(self) -> None:
        self.conversation.reset()
        say("conversation cleared" + (" (the system message stays)" if self.conversation.system else ""))

    def set_system(self, text: str) -> None:
        if not text:
            say(f"system message: {self.conversation.system!r}" if self.conversation.system else
                "no system message; /system TEXT sets one")
            return
        self.conversation.system = text
        say("system message set")

    def save(self, path: str) -> None:
        if not path:
            raise ValueError("/save needs a file name, e.g. /save chat.json")
        target = writable_file(path, "/save", ".json")
        self.conversation.save(str(target))
        say(f"saved {plural(len(self.conversation.messages), 'message')} to {target}")

    def load(self, path: str) -> None:
        if not path:
            raise ValueError("/load needs a file name, e.g. /load chat.json")
        self.conversation = Conversation.load(path)
        say(f"loaded {plural(len(self.conversation.messages), 'message')} from {path}")

    def print_stats(self) -> None:
        print(stats_table(self.engine.stats()))

    # --- one turn ----------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.engine.encode_prompt(self.engine.tokenizer.apply_chat_template(messages))

    def send(self, text: str) -> None:
        """Add the message, fit the context, stream the reply (Ctrl-C stops it), print the status."""
        self.conversation.messages.append({"role": "user", "content": text})
        try:
            dropped = self.conversation.fit(lambda m: len(self.prompt_ids(m)), self.room)
        except ValueError as err:
            self.conversation.messages.pop()
            say(str(err))
            return
        if dropped:
            say(f"dropped the oldest {plural(dropped, 'turn')} to fit the context of "
                f"{self.engine.max_model_len:,} tokens")
        reply, out, stopped = self.stream_reply(self.prompt_ids(self.conversation.all_messages()))
        self.conversation.messages.append({"role": "assistant", "content": reply})
        print(self.status(out, stopped), file=sys.stderr, flush=True)

    def stream_reply(self, ids: list[int]):
        """(reply text, last output, stopped by Ctrl-C). Ctrl-C only sets a flag, read between
        steps, so a step is never cut in half and the request is aborted cleanly."""
        request_id = f"turn-{self.turns}"
        self.turns += 1
        # the last turn's KV stays held, so only what this prompt adds to it is prefilled
        self.engine.add_request(request_id, ids, self.params, keep_kv=True, continue_from=self.last_turn)
        self.last_turn = request_id
        interrupted: list[bool] = []
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
        stream, last = TextStream(), None
        try:
            while self.engine.has_unfinished_requests() and not interrupted:
                for out in self.engine.step():
                    stream.update(out.outputs[0].text, final=out.finished)
                    last = out
        finally:
            signal.signal(signal.SIGINT, previous)
            if interrupted:
                self.engine.abort(request_id)
        print()
        return (last.outputs[0].text if last else ""), last, bool(interrupted)

    def status(self, out, stopped: bool) -> str:
        """[tokens in the conversation, KV bytes they hold, reuse, speed] after a reply."""
        if out is None:
            return "[stopped before the first token]"
        m = out.metrics
        n_out = len(out.outputs[0].token_ids)
        end = m.get("finish_time") or time.monotonic()
        first = m.get("first_token_time") or end
        rate = f", {(n_out - 1) / (end - first):.1f} tok/s" if n_out > 1 and end > first else ""
        total = len(out.prompt_token_ids) + n_out
        held = self.engine.storage.bytes_held(total)
        return (f"[{'stopped; ' if stopped else ''}{total:,} tokens in the conversation, KV {human_bytes(held)}; "
                f"{m.get('num_cached_prompt_tokens', 0):,} of {len(out.prompt_token_ids):,} prompt tokens from "
                f"the cache; {plural(n_out, 'new token')}{rate}]")


def stats_table(stats: dict[str, Any]) -> str:
    """engine.stats() as a two-column table: ratios in percent, counts with separators, bytes human."""
    rows = []
    for key, value in stats.items():
        if isinstance(value, float):
            shown = f"{value:.1%}"
        elif isinstance(value, int) and not isinstance(value, bool):
            shown = human_bytes(value) if key.endswith("bytes") else f"{value:,}"
        else:
            shown = str(value)
        rows.append((key.replace("_", " "), shown))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>12}" for k, v in rows)


def say(text: str) -> None:
    """A line from the program itself (not the model), on stderr."""
    print(f"({text})", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from kvcache.engine.engine import LLMEngine

    params = sampling_params(args)
    system = check_text(args.system, "--system") if args.system else None
    engine = LLMEngine(**engine_kwargs(args))
    engine.tokenizer.apply_chat_template([{"role": "user", "content": "check"}])  # fail early without a template
    chat = Chat(engine, params, Conversation(system))
    if sys.stdin.isatty():
        _enable_line_editing()
    name = Path(engine.model_source).stem.split(".")[0]
    say(f"kvcache chat: {name}, {engine.dtype}, KV cache {engine.kv_cache_dtype}, context "
        f"{engine.max_model_len:,} tokens. /help lists commands; Ctrl-C stops a reply; Ctrl-D leaves")
    while True:
        try:
            text = check_text(read_message(), "The message")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            print(file=sys.stderr)
            continue
        except ValueError as err:
            say(str(err))
            continue
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            if not chat.command(text.strip()):
                return 0
            continue
        chat.send(text[1:] if text.startswith("//") else text)

