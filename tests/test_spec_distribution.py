"""Sampled outputs with speculation follow the target's distribution, through the whole engine:
a tiny random llama over a 6-token vocabulary, thousands of seeded requests, and a chi-square test
of their first three tokens against the distribution computed exactly from the model."""

import math
from collections import Counter
from itertools import product

import pytest
import torch

from kvcache import SamplingParams
from kvcache.config import ModelConfig, SchedulerConfig, SpeculativeConfig
from kvcache.engine.engine import LLMEngine
from kvcache.engine.speculative import NgramProposer
from kvcache.models.loader import LoadedModel
from kvcache.models.tokenizer import Tokenizer
from kvcache.runtime.sampler import probabilities

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 6
PROMPT = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]  # after t1 in 0..3, prompt lookup drafts what followed t1
NUM_REQUESTS = 1500


def _toy() -> tuple[LoadedModel, torch.nn.Module]:
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({c: i for i, c in enumerate("abcdef")}, unk_token="a"))
    tokenizer = Tokenizer(backend, bos_token_id=None, eos_token_ids=frozenset(), add_bos=False, chat_template=None)
    weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return LoadedModel(ModelConfig.from_hf_config(cfg.to_dict()), weights, tokenizer, "toy"), hf


def _exact_joint(hf, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) of the target alone, from its logits at every prefix."""
    def dist(prefix):
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPT + list(prefix)])).logits[0, -1]
        return probabilities(logits.float(), params)
    joint = {}
    first = dist(())
    for t1 in range(VOCAB):
        second = dist((t1,))
        for t2 in range(VOCAB):
            third = dist((t1, t2))
            for t3 in range(VOCAB):
                joint[(t1, t2, t3)] = float(first[t1] * second[t2] * third[t3])
    return joint


def _chi_square(counts: Counter, joint: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic over the cells expecting at least 5 draws (the rest pooled): (stat, df)."""
    stat, df, rest_observed, rest_expected = 0.0, -1, 0, 0.0
    for cell, p in joint.items():
        if total * p >= 5:
            stat += (counts.get(cell, 0) - total * p) ** 2 / (total * p)
            df += 1
        else:
            rest_observed += counts.get(cell, 0)
            rest_expected += total * p
    if rest_expected > 0:
        stat += (rest_observed - rest_expected) ** 2 / max(rest_expected, 1e-9)
        df += 1
    return stat, df


def _critical(df: int, z: float = 3.09) -> float:
    """Chi-square quantile at 1 - 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _sample(loaded, params: SamplingParams, **spec) -> tuple[Counter, dict]:
    engine = LLMEngine(loaded=loaded, num_blocks=2048, block_size=4, device="cpu",
                       scheduler_config=SchedulerConfig(max_num_seqs=512, max_num_batched_tokens=8192), **spec)
    for i in range(NUM_REQUESTS):
        engine.add_request(str(i), PROMPT, SamplingParams(max_tokens=3, temperature=params.temperature,
                                                          top_k=params.top_k, seed=i, ignore_eos=True))
    counts = Counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                counts[tuple(out.outputs[0].token_ids)] += 1
    assert engine.pool.num_used == 0
    return counts, engine.stats()


def _trusting(joint: dict) -> dict:
    """What a verifier that trusted every draft would give: t2 = the draft prompt lookup makes
    after t1, when it makes one, and t3 from the target after it."""
    wrong = dict(joint)
    for t1 in range(VOCAB):
        drafts = NgramProposer(k=1, min_n=1).propose(PROMPT + [t1])
        if not drafts:
            continue
        p_t1 = sum(joint[(t1, a, b)] for a in range(VOCAB) for b in range(VOCAB))
        after = [joint[(t1, drafts[0], t3)] for t3 in range(VOCAB)]
        after = after if sum(after) > 0 else [1.0] * VOCAB  # the draft is outside the target's top-k
        for t2, t3 in product(range(VOCAB), range(VOCAB)):
            wrong[(t1, t2, t3)] = p_t1 * after[t3] / sum(after) if t2 == drafts[0] else 0.0
    return wrong


def test_sampled_tokens_with_speculation_follow_the_target_distribution():
    params = SamplingParams(temperature=0.9, top_k=5)
    loaded, hf = _toy()
    joint = _exact_joint(hf, params)
    counts, stats = _sample(loaded, params, speculative=SpeculativeConfig("ngram", 3, ngram_min=1, adaptive=False))
    # the drafts were verified often, and both accepted and rejected
    assert stats["spec_verifications"] > NUM_REQUESTS // 2
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_drafted_tokens"]
    stat, df = _chi_square(counts, joint, NUM_REQUESTS)
    assert df >= 10 and stat < _critical(df), (stat, df)
    # the same test tells apart a verifier that trusted the draft one time in five
    trusting = _trusting(joint)
    wrong = {cell: 0.8 * p + 0.2 * trusting[cell] for cell, p in joint.items()}
    assert _chi_square(counts, wrong, NUM_REQUESTS)[0] > _critical(df)
