"""Start ``kvcache serve`` as a real process on a free loopback port, for the server tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A server process; ``log()`` is what it printed so far (stdout and stderr together)."""

    def __init__(self, *args: str, start_timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = open(f"/tmp/kvcache-test-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvcache", "serve", "--port", str(self.port), *args],
                                     stdout=self.log_file, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited: {self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"server did not start in {start_timeout} s")

    def log(self) -> str:
        self.log_file.flush()
        with open(self.log_file.name) as f:
            return f.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log_file.close()
