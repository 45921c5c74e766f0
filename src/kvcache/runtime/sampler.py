"""Turning logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

from typing import Sequence

import torch

from kvcache.config import SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k and the top-p nucleus with -inf. logits [V] float32.

    The most likely token always survives, so the candidate set is never empty (top_p may be as
    small as the smallest positive float, which is 0 in float32)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled (non-greedy) request draws from: temperature, top-k, top-p.
    logits [..., V] -> probs [..., V] float32, rows summing to 1."""
    # shifted so the largest is 0: no overflow for any temperature the params accept
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if scaled.dim() == 1:
        return torch.softmax(_filter(scaled, params.top_k, params.top_p), dim=-1)
    return torch.stack([torch.softmax(_filter(row, params.top_k, params.top_p), dim=-1) for row in scaled])


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator]) -> list[int]:
    """logits [N, V] float32 -> one token id per row, each with its own params and generator."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            tokens.append(greedy[row])
            continue
        tokens.append(int(torch.multinomial(probabilities(logits[row], p), 1, generator=gen)))
    return tokens


def logprobs_of(logits: torch.Tensor, token: int, top: int) -> dict:
    """The chosen token's log-probability and the ``top`` most likely alternatives. logits [V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, top) if top > 0 else (logp[:0], logp[:0].long())
    return {"token_id": token, "logprob": float(logp[token]),
            "top": [(int(i), float(v)) for i, v in zip(ids, values)]}
