"""Incremental detokenization: each new token costs a decode of a few tokens, not of the whole output."""

from __future__ import annotations

from kvcache.models.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Grows one sample's text token by token.

    Decodes only the window ``ids[prefix:]`` against ``ids[prefix:read]``; text is released once
    it no longer ends in a half-decoded character (byte-level BPE can split one across tokens),
    then the window slides forward.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Append a token; returns the text it released (possibly empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            self.text += new
            self._prefix, self._read = self._read, len(self.ids)
            return new
        return ""

    def final_text(self) -> str:
        """Everything, including a trailing partial character if generation stopped inside one."""
        return self.text + self.tokenizer.decode(self.ids[self._read:]) if self._read < len(self.ids) else self.text
