"""llama.cpp as a continuous-batching peer, through llama-cpp-python's low-level API (benchmarks only).

llama-cpp-python's high-level ``Llama`` runs one sequence at a time; llama.cpp itself batches many
sequences in one ``llama_decode`` (each token tagged with its ``seq_id``, one unified KV cache), which
is what its C++ server does. This driver does the same: greedy decoding, prompts prefilled in chunks
of the batch size, a sequence's KV removed the moment it finishes.

Requires ``pip install llama-cpp-python`` (it compiles llama.cpp, about 6 minutes). Never imported by
the engine.

Timed comparisons run the peer in a process of its own (:func:`start`, peer_process.py says why).
This module imports nothing from kvcache, so that importing it there never sets ``OMP_WAIT_POLICY``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import llama_cpp as L

FTYPES = {"float32": 0, "float16": 1, "bfloat16": 32}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_BF16


def convert(src: Path, dtype: str, cache: Path) -> Path:
    """The GGUF requantized to a plain float type (llama_model_quantize with allow_requantize)."""
    if dtype == "native":
        return src
    out = cache / f"{src.stem}.{dtype}.gguf"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        params = L.llama_model_quantize_default_params()
        params.ftype = FTYPES[dtype]
        params.allow_requantize = True
        params.nthread = os.cpu_count() or 1
        tmp = out.with_suffix(".tmp")
        if L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {dtype}")
        tmp.rename(out)
    return out


@dataclass
class _Seq:
    key: object
    prompt: list[int]
    max_tokens: int
    seq_id: int
    pos: int = 0
    output: list[int] = field(default_factory=list)
    next_token: int | None = None
    first_token_time: float | None = None


class LlamaCppBatched:
    def __init__(self, path: Path, n_ctx: int, n_seq: int, n_batch: int = 512, threads: int | None = None,
                 swa_full: bool | None = None, repack: bool = False):
        """``repack``: llama.cpp's default of repacking quantized weights for this CPU's kernels (AVX-512,
        AMX); it crashed on the AVX2-only AMD machine, so off unless asked (:func:`start` tries it)."""
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = repack
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads or os.cpu_count() or 1
        cp.kv_unified = True  # one KV pool shared by all sequences, like a paged pool
        if swa_full is not None:  # llama-cpp-python's default is a full-size SWA cache (--swa-full)
            cp.swa_full = swa_full
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context (KV cache too large?)")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch, self.n_seq = n_batch, n_seq
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.free_ids = list(range(n_seq))

    def model_bytes(self) -> int:
        """The bytes of weights llama.cpp holds."""
        return int(L.llama_model_size(self.model))

    def system_info(self) -> str:
        """Where this llama.cpp was loaded from and the CPU features its build uses (its system info)."""
        return f"{os.path.dirname(L.__file__)}: {L.llama_print_system_info().decode().strip()}"

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _add(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq_id

    def prefill(self, ids: list[int], seq_id: int = 0) -> None:
        """Compute the KV of ``ids`` for sequence ``seq_id`` in batches of n_batch (logits for the last)."""
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            for i, token in enumerate(chunk):
                self._add(i, token, start + i, seq_id, start + i == len(ids) - 1)
            self.batch.n_tokens = len(chunk)
            if L.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")

    def seq_state_bytes(self, seq_id: int) -> int:
        """Bytes of sequence ``seq_id``'s serialized state: the KV cells it holds."""
        return int(L.llama_state_seq_get_size(self.ctx, seq_id))

    def run(self, requests, clock=time.perf_counter):
        """requests: [(key, prompt ids, max_tokens, arrival offset s)] -> {key: (tokens, ttft, finish)}."""
        start = clock()
        pending = sorted(requests, key=lambda r: r[3])
        running: list[_Seq] = []
        prefilling: list[_Seq] = []
        done = {}
        while pending or running or prefilling:
            now = clock() - start
            while pending and pending[0][3] <= now and self.free_ids:
                key, prompt, max_tokens, arrival = pending.pop(0)
                prefilling.append(_Seq((key, arrival), list(prompt), max_tokens, self.free_ids.pop(0)))
            if not running and not prefilling:
                time.sleep(max(0.0, pending[0][3] - now))
                continue
            n, outputs = 0, []
            for s in running:  # one token each
                self._add(n, s.next_token, s.pos, s.seq_id, True)
                outputs.append((s, n))
                s.pos += 1
                n += 1
            for s in list(prefilling):  # then prompt chunks within the batch budget
                take = min(len(s.prompt) - s.pos, self.n_batch - n)
                if take <= 0:
                    break
                for j in range(take):
                    last = s.pos + j == len(s.prompt) - 1
                    self._add(n, s.prompt[s.pos + j], s.pos + j, s.seq_id, last)
                    if last:
                        outputs.append((s, n))
                    n += 1
                s.pos += take
                if s.pos == len(s.prompt):
                    prefilling.remove(s)
                    running.append(s)
            self.batch.n_tokens = n
            if L.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed (KV cache full?)")
            t = clock() - start
            for s, i in outputs:
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                s.next_token = int(row.argmax())
                s.output.append(s.next_token)
                s.first_token_time = s.first_token_time if s.first_token_time is not None else t
                if len(s.output) >= s.max_tokens:
                    running.remove(s)
                    L.llama_memory_seq_rm(self.mem, s.seq_id, -1, -1)
                    self.free_ids.append(s.seq_id)
                    key, arrival = s.key
                    done[key] = (s.output, s.first_token_time - arrival, t - arrival)
        return done


class PromptLookup:
    """llama-cpp-python's own prompt-lookup speculation (``Llama(draft_model=LlamaPromptLookupDecoding)``),
    greedy, one request at a time; ``k=None``: no speculation."""

    def __init__(self, path: Path, k: int | None, threads: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        draft = LlamaPromptLookupDecoding(num_pred_tokens=k) if k else None
        self.llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                         draft_model=draft, verbose=False)

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        self.llm.reset()
        tokens = []
        for t in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if self.llm.token_eos() == t or len(tokens) == max_tokens:
                break
            tokens.append(t)
            if len(tokens) == max_tokens:
                break
        return tokens

    def close(self) -> None:
        self.llm.close()


def start(path: Path, repack: bool | None = None, **kwargs):
    """A :class:`LlamaCppBatched` over ``path`` in its own process, and whether it repacks its weights.
    ``repack=None``: llama.cpp's default (repack) where it survives loading and a first decode here;
    where its process is killed by a signal doing so (the repack paths segfault on both machines here
    for Q8_0/Q4_1), without, saying so on stderr. Any other failure is raised."""
    from peer_process import PeerCrashed, PeerProcess
    for attempt in ((True, False) if repack is None else (repack,)):
        try:
            peer = PeerProcess("llamacpp_peer:LlamaCppBatched", path, repack=attempt, **kwargs)
            peer.run([("warm-up", [1, 2, 3, 4], 2, 0.0)])
            return peer, attempt
        except PeerCrashed as err:
            if not attempt or repack is not None or err.exit_code >= 0:
                raise
            print(f"llama.cpp with weight repacking died (exit code {err.exit_code}) on {path.name}; "
                  "running it without", file=sys.stderr)
    raise AssertionError("unreachable")
