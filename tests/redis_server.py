"""A real redis-server for the offload tests, on a free loopback port, in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest
from live_server import free_port


def redis_server_path() -> str:
    """Debian's redis-server; `make test` installs it. Missing: a failure on CI, else a skip."""
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's redis-server (make test installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


class RedisServer:
    """``redis-server`` started on 127.0.0.1 with no persistence, ``maxmemory`` and allkeys-lru (the
    policy the README recommends). ``url`` is what ``kv_offload`` takes; :meth:`kill` stops it hard."""

    def __init__(self, maxmemory: str = "512mb") -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="kvcache-redis-")
        self.proc = subprocess.Popen(
            [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--maxmemory", maxmemory,
             "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        deadline = time.time() + 20
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.kill()
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)

    def keys(self) -> list[bytes]:
        return sorted(self.client.scan_iter(match="kvcache:*"))

    def kill(self) -> None:
        """Stop the server at once (SIGKILL), as a crash would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.client.close()
        shutil.rmtree(self.dir, ignore_errors=True)
