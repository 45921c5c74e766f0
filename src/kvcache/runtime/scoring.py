"""Perplexity and KL divergence of a text under the model, with the KV cache in a chosen format.

The text's tokens are cut into consecutive windows of ``ctx`` tokens; each window is computed in
one pass over an empty paged cache (so every key and value is read back through the cache's
format, quantized or not), and scored from its second token on:

    tokens   t0 t1 t2 ... t1023 | t1024 t1025 ... t2047 | ...
    scored      ^  ^  ...  ^    |        ^    ...   ^   |        ctx - 1 predictions per window

With a reference format, the same windows are also run with that (unquantized) cache, and each
position's distribution is compared: KL(P_ref || P) and whether both put the same token first.

Under an eviction policy a window is not computed in one pass: it advances ``step`` tokens at a
time (16 by default) through a paged cache whose policy evicts before every step, exactly as the
engine runs a request, so each prediction sees only the tokens the policy kept by then.

    window   t0 .. t15 | t16 .. t31 | ... | t4080 .. t4095       each step: evict, then compute 16
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import KVCacheManager
from kvcache.cache.policies import KVPolicy, PolicyState
from kvcache.cache.spec import group_layers, layer_specs
from kvcache.cache.storage import KVCache
from kvcache.models.llama import LlamaForCausalLM
from kvcache.runtime.plan import ScheduledSequence
from kvcache.runtime.reference import logits_without_cache
from kvcache.runtime.runner import ModelRunner, collected_scores
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


# --- scoring under an eviction policy -----------------------------------------------------------

DEFAULT_POLICY_STEP = 16  # tokens computed per step when a policy evicts as the text advances


@dataclass
class _Text:
    """The text being scored, as the kv manager sees a request (a CachedSequence)."""

    all_token_ids: list[int]
    kv_state: PolicyState | None
    request_id: str = "text"
    num_computed_tokens: int = 0
    block_tables: list[list[int]] = field(default_factory=list)
    block_hashes: list = field(default_factory=list)
    cache_salt: str | None = None


def policy_step_logits(model: LlamaForCausalLM, window: list[int], kv_format: str, policy: KVPolicy,
                       step: int = DEFAULT_POLICY_STEP,
                       block_size: int | None = None) -> Iterator[tuple[int, torch.Tensor, PolicyState | None]]:
    """Run ``window`` through a paged cache ``step`` tokens at a time with ``policy`` evicting as it
    goes, the engine's way: each step first drops what the policy says (the kv manager compacts
    the slots, the runner moves them), then computes the step's tokens, whose attention weights go
    back to the policy. Yields (first position, logits [tokens of the step, vocab], policy state).

    A budget that holds the whole window evicts nothing (the state is then None)."""
    if step < 1:
        raise ValueError(f"The scoring step must be at least 1 token, got {step}.")
    param = next(model.parameters())
    block_size = kv_dtype(kv_format).default_block_size if block_size is None else block_size
    groups = group_layers(layer_specs(model.config, kv_format))
    windows = tuple(g.spec.window for g in groups)
    budget = policy.tokens_for(len(window))
    governed = tuple(g for g, w in enumerate(windows) if w is None)
    state = PolicyState(policy, budget, governed) if budget is not None and governed else None
    most = [len(window) if w is None and state is None else budget + step if w is None else w + step
            for w in windows]  # the tokens a group holds at once at most
    num_blocks = sum(-(-min(m, len(window)) // block_size) + 2 for m in most)
    storage = KVCache(groups, num_blocks, block_size, param.device)
    if state is not None and not storage.moves_slots:
        raise ValueError(f"kv_policy {policy.name} moves single tokens between cache slots, which the "
                         f"{kv_format} cache cannot (its key scales cover whole blocks).")
    kv = KVCacheManager(BlockPool(num_blocks, enable_prefix_caching=False), block_size, windows)
    runner = ModelRunner(model, storage)
    text = _Text(list(window), state)
    for start in range(0, len(window), step):
        kv.evict(text)
        count = min(step, len(window) - start)
        if not kv.allocate_slots(text, count):
            raise RuntimeError("The scoring pool is too small for the policy's budget; this is a bug.")
        seq = ScheduledSequence(text.request_id, tuple(window[start:start + count]), start,
                                tuple(tuple(t) for t in text.block_tables), True,
                                kv_offsets=kv.kv_offsets(text), score_rows=kv.score_rows(text, count))
        storage.move_slots(kv.take_pending_moves())
        storage.copy_blocks(kv.take_pending_copies())
        tokens, positions, metas = runner.prepare((seq,))
        hidden = model(tokens, positions, metas, storage.layers)  # [count, hidden]
        text.num_computed_tokens += count
        scores = collected_scores((seq,), metas)
        if scores:
            kv.observe(text, scores[text.request_id], seq.score_rows)
        yield start, model.compute_logits(hidden), state


def score_text_with_policy(model: LlamaForCausalLM, token_ids: list[int], ctx: int, kv_format: str,
                           policy: KVPolicy, step: int = DEFAULT_POLICY_STEP, reference_format: str | None = None,
                           max_scored: int | None = None,
                           progress: Callable[[int, int], None] | None = None) -> Score:
    """Perplexity over consecutive ``ctx``-token windows with ``policy`` evicting as each window
    advances ``step`` tokens at a time (see :func:`policy_step_logits`); with ``reference_format``,
    also KLD and top-1 agreement against the full cache in that format, computed in one pass."""
    parts = windows(token_ids, ctx, max_scored)
    if not parts:
        raise ValueError("The text has fewer than two tokens; there is nothing to score.")
    total = Score(0, 0.0)
    for i, window in enumerate(parts):
        ref = None if reference_format is None else window_logits(model, window, reference_format)
        for start, logits, _ in policy_step_logits(model, window, kv_format, policy, step):
            rows = min(len(logits), len(window) - 1 - start)  # the window's last token predicts nothing
            if rows > 0:
                total = add(total, score_logits(logits[:rows], window[start:start + rows + 1],
                                                None if ref is None else ref[start:start + rows]))
        if progress:
            progress(i + 1, len(parts))
    return total
