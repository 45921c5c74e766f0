"""Perplexity and KL divergence of a text under the model, with the KV cache in a chosen format.

The text's tokens are cut into consecutive windows of ``ctx`` tokens; each window is computed in
one pass over an empty paged cache (so every key and value is read back through the cache's
format, quantized or not), and scored from its second token on:

    tokens   t0 t1 t2 ... t1023 | t1024 t1025 ... t2047 | ...
    scored      ^  ^  ...  ^    |        ^    ...   ^   |        ctx - 1 predictions per window

With a reference format, the same windows are also run with that (unquantized) cache, and each
position's distribution is compared: KL(P_ref || P) and whether both put the same token first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from kvcache.models.llama import LlamaForCausalLM
from kvcache.runtime.reference import logits_without_cache
from kvcache.sizing import kv_dtype

ROWS_PER_CHUNK = 256  # logits rows turned into log-probabilities at once (bounds the memory)


@dataclass(frozen=True)
class Score:
    """Totals over every scored position."""

    tokens: int  # predictions scored
    nll: float  # summed negative log-likelihood, nats
    kld: float | None = None  # summed KL(P_ref || P), nats
    top1_agree: int | None = None  # positions where both distributions rank the same token first

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def mean_kld(self) -> float | None:
        return None if self.kld is None else self.kld / self.tokens

    @property
    def top1_agreement(self) -> float | None:
        return None if self.top1_agree is None else self.top1_agree / self.tokens


def windows(token_ids: list[int], ctx: int, max_scored: int | None = None) -> list[list[int]]:
    """Consecutive windows of up to ``ctx`` tokens whose predictions total at most ``max_scored``."""
    if ctx < 2:
        raise ValueError(f"--ctx must be at least 2 tokens (one to read, one to predict), got {ctx}.")
    budget = max_scored if max_scored is not None else len(token_ids)
    out, start = [], 0
    while start + 1 < len(token_ids) and budget > 0:
        window = token_ids[start:start + min(ctx, budget + 1)]
        out.append(window)
        budget -= len(window) - 1
        start += len(window)
    return out


def score_logits(logits: torch.Tensor, window: list[int], ref_logits: torch.Tensor | None = None) -> Score:
    """Score a window from its logits [n, vocab] (row i predicts token i + 1); against ``ref_logits``
    (the same window under the reference cache), also KL(P_ref || P) and top-1 agreement."""
    targets = torch.tensor(window[1:], device=logits.device)
    nll = kld = 0.0
    agree = 0
    for lo in range(0, len(targets), ROWS_PER_CHUNK):
        rows = slice(lo, lo + ROWS_PER_CHUNK)
        logp = torch.log_softmax(logits[rows].double(), dim=-1)  # [rows, vocab]
        nll -= logp.gather(1, targets[rows, None]).sum().item()
        if ref_logits is not None:
            ref_logp = torch.log_softmax(ref_logits[rows].double(), dim=-1)
            kld += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    has_ref = ref_logits is not None
    return Score(len(targets), nll, kld if has_ref else None, agree if has_ref else None)


def window_logits(model: LlamaForCausalLM, window: list[int], kv_format: str,
                  block_size: int | None = None) -> torch.Tensor:
    """Logits of every position but the last, [len(window) - 1, vocab], with the cache in ``kv_format``
    in blocks of ``block_size`` tokens (default: the format's, as the engine's)."""
    block_size = kv_dtype(kv_format).default_block_size if block_size is None else block_size
    return logits_without_cache(model, window, block_size, kv_format)[:-1]


def add(a: Score, b: Score) -> Score:
    return Score(a.tokens + b.tokens, a.nll + b.nll, None if b.kld is None else (a.kld or 0.0) + b.kld,
                 None if b.top1_agree is None else (a.top1_agree or 0) + b.top1_agree)


def score_text(model: LlamaForCausalLM, token_ids: list[int], ctx: int, kv_format: str,
               reference_format: str | None = None, max_scored: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> Score:
    """Perplexity (and KLD against ``reference_format``) over consecutive ``ctx``-token windows."""
    parts = windows(token_ids, ctx, max_scored)
    if not parts:
        raise ValueError("The text has fewer than two tokens; there is nothing to score.")
    total = Score(0, 0.0)
    for i, window in enumerate(parts):
        logits = window_logits(model, window, kv_format)
        ref = None if reference_format is None else window_logits(model, window, reference_format)
        total = add(total, score_logits(logits, window, ref))
        if progress:
            progress(i + 1, len(parts))
    return total
