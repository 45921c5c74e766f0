"""Helpers for the tests that run tiny random models against HF transformers: a real byte-level
tokenizer over a 256-token vocabulary, and an engine run that keeps every step's logits."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from kvcache.config import SamplingParams
from kvcache.engine.engine import LLMEngine
from kvcache.models.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
    """A real byte-level tokenizer over the tiny vocabulary (one token per byte, no merges)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=frozenset(), add_bos=False, chat_template=None)


def run_recording_logits(engine: LLMEngine, prompts: list[list[int]],
                         params: SamplingParams) -> list[tuple[list[int], torch.Tensor]]:
    """Run ``prompts`` together to the end; per prompt, (its output tokens, the logits the real
    runner returned for each of its sampled steps [max_tokens, vocab], or for every row a step
    verifying drafts returned). The recording changes nothing."""
    seen: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def recording(plan):
        out = execute(plan)
        for rid, (rows, _) in out.rows().items():  # one row, or k + 1 when k drafts are verified
            seen.setdefault(rid, []).extend(row.clone() for row in rows)
        return out
    engine.runner.execute = recording
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    engine.runner.execute = execute
    return [(list(done[rid].outputs[0].token_ids), torch.stack(seen[f"{rid}#0"])) for rid in ids]
