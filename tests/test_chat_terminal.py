"""`kvcache chat` on a real terminal (a pty): line editing, /help, Ctrl-C mid-reply, Ctrl-D."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest

pytestmark = pytest.mark.slow


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty, so Ctrl-C sends SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A child process on a pseudo-terminal, driven by keystrokes as a person would."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     preexec_fn=_own_terminal)
        os.close(slave)
        self.seen = ""

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def expect(self, pattern: str, timeout: float = 240) -> str:
        """Read until ``pattern`` (a regex) appears in what was printed since the last match."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.seen)):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {pattern!r}; screen:\n{self.seen[-2000:]}"
            ready, _, _ = select.select([self.master], [], [], min(remaining, 1.0))
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    assert False, f"the process ended while waiting for {pattern!r}:\n{self.seen[-2000:]}"
        before, self.seen = self.seen[:match.end()], self.seen[match.end():]
        return before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), TERM="xterm")
    t = Terminal([sys.executable, "-m", "kvcache", "chat", "--max-tokens", "300", "--num-blocks", "128"], env)
    yield t
    t.close()


def test_chat_on_a_terminal(terminal):
    t = terminal
    banner = t.expect(r">>> ")
    assert "site-packages" not in banner and "/help" in banner

    # readline: left arrow then right arrow moves the cursor, nothing reaches the line but /help
    t.type("/hel\x1b[D\x1b[Cp\r")
    assert "/stats" in t.expect(r">>> ")

    # Ctrl-C in the middle of a reply stops it and the session goes on
    t.type("Count from 1 to 200, one number per line.\r")
    t.expect(r"\b5\b")
    t.type("\x03")
    assert "stopped" in t.expect(r">>> ")
    assert t.proc.poll() is None

    # the next message is answered in the same session, with a status line
    t.type("What is the capital of France?\r")
    answer = t.expect(r">>> ")
    assert "Paris" in answer and "tokens in the conversation" in answer and "prompt tokens from the cache" in answer

    t.type("/stats\r")
    assert re.search(r"prefix cache hits\s+[\d,]+", t.expect(r">>> "))

    t.type("\x04")  # Ctrl-D leaves
    assert t.proc.wait(timeout=60) == 0
