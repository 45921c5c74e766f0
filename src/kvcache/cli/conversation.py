"""A chat conversation as plain data: the system message, the turns, fitting the context, files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from kvcache.cli.errors import check_text

Message = dict[str, str]


@dataclass
class Conversation:
    """The system message (if any) and the user/assistant messages after it, oldest first."""

    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def all_messages(self) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reset(self) -> None:
        self.messages.clear()

    def fit(self, num_tokens: Callable[[list[Message]], int], limit: int) -> int:
        """Drop the oldest turns (a user message and the reply to it) until ``num_tokens`` of the
        whole conversation is at most ``limit``; the system message and the last message stay.
        Returns how many turns were dropped; ValueError if even the last message alone is too long."""
        dropped = 0
        while num_tokens(self.all_messages()) > limit:
            if len(self.messages) <= 1:
                raise ValueError(f"This message needs {num_tokens(self.all_messages()):,} tokens (with the "
                                 f"template and the system message) but only {limit:,} fit beside the reply's "
                                 "room; send a shorter one.")
            del self.messages[:2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1]
            dropped += 1
        return dropped

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"system": self.system, "messages": self.messages}, f, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, path: str) -> "Conversation":
        """Read a file written by :meth:`save`; ValueError naming the file if it is not one."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a saved conversation (not UTF-8 JSON: {err}).") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        system = data.get("system") if isinstance(data, dict) else None
        valid = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages)
        if not valid or not (system is None or isinstance(system, str)):
            raise ValueError(f"{path} is not a saved conversation: it needs 'messages', a list of "
                             "{'role': 'user'|'assistant', 'content': text}.")
        for m in messages:
            check_text(m["content"], f"A message in {path}")
        return cls(system, [{"role": m["role"], "content": m["content"]} for m in messages])
