"""A peer engine in a process of its own, so that it runs with the OpenMP settings its users have.

Importing kvcache sets ``OMP_WAIT_POLICY=PASSIVE`` (kvcache/__init__.py says why), and OpenMP reads
it once, when its library loads. A peer loaded into our process inherits it, and it costs the peers
far more than it costs us: llama.cpp built with OpenMP meets at an OpenMP barrier after every graph
node, and PyTorch runs hundreds of small parallel regions a token in HF transformers; a passive wait
puts the waiting thread to sleep each time. Measured on a 2-core AVX-512 Xeon, batch-1 SmolLM2 decode
after a 128-token prompt: llama.cpp F32 44 -> 22 tok/s, HF transformers float32 31 -> 17 tok/s.

``PeerProcess("module:Class", *args, **kwargs)`` builds ``Class(*args, **kwargs)`` in a child process
(this file run as a script, its environment ours without ``OMP_WAIT_POLICY``) and forwards method
calls to it, arguments and results pickled over the child's stdin and stdout. The module is imported
there before anything else of ours, so a module that imports torch before kvcache gets torch's
OpenMP with the library's default policy.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import traceback


class PeerCrashed(RuntimeError):
    """The child process died; ``exit_code`` is its return code (negative: killed by that signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PeerProcess:
    """``Class(*args, **kwargs)`` in a child process; ``peer.method(*args)`` calls it there."""

    def __init__(self, kind: str, *args, omp_wait_policy: str | None = None, **kwargs) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                          env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        try:
            self._call("__init__", kind, args, kwargs)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _call(self, method: str, *args):
        try:
            pickle.dump((method, args), self.proc.stdin)
            self.proc.stdin.flush()
            ok, value = pickle.load(self.proc.stdout)
        except (EOFError, BrokenPipeError) as err:
            code = self.proc.wait()
            raise PeerCrashed(f"the peer's process died (exit code {code})", code) from err
        if not ok:
            raise RuntimeError(f"the peer's process: {value}")
        return value

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "proc":
            raise AttributeError(name)
        return lambda *args: self._call(name, *args)

    def close(self) -> None:
        """Close the object (if it has a close method) and end the process, killing it if need be."""
        try:
            if self.proc.poll() is None:
                self._call("__close__")
        finally:
            if self.proc.poll() is None:
                self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def _serve() -> None:
    """The child's side: build one object, then call its methods until stdin closes."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the peer's own prints go to stderr, never into the channel
    requests = sys.stdin.buffer
    obj = None
    while True:
        try:
            method, args = pickle.load(requests)
        except EOFError:
            return
        try:
            value = None
            if method == "__init__":
                kind, a, kw = args
                module, name = kind.split(":")
                obj = getattr(importlib.import_module(module), name)(*a, **kw)
            elif method == "__close__":
                if hasattr(obj, "close"):
                    obj.close()
            else:
                value = getattr(obj, method)(*args)
            reply = pickle.dumps((True, value))
        except Exception:  # noqa: BLE001 (sent back to the parent, which raises it)
            reply = pickle.dumps((False, traceback.format_exc()))
        channel.write(reply)
        channel.flush()


if __name__ == "__main__":
    _serve()
