"""Our llama runtime against HF transformers' implementation on tiny random configs (float32)."""

import pytest
import torch

from kvcache.cache.spec import group_layers, layer_specs
from kvcache.cache.storage import KVCache
from kvcache.config import ModelConfig
from kvcache.engine.engine import build_model
from kvcache.models.loader import LoadedModel
from kvcache.runtime.plan import ScheduledSequence
from kvcache.runtime.runner import ModelRunner

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "odd-heads": dict(num_attention_heads=9, num_key_value_heads=3, head_dim=8, hidden_size=72),
    "untied-bias": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                        tie_word_embeddings=False),
}


def _hf_model(name: str):
    torch.manual_seed(sum(map(ord, name)))
    extra = {"hidden_size": 64, **CONFIGS[name]}
    cfg = transformers.LlamaConfig(vocab_size=256, intermediate_size=96, num_hidden_layers=3,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=5000.0,
                                   tie_word_embeddings=CONFIGS[name].get("tie_word_embeddings", True),
                                   **{k: v for k, v in extra.items() if k != "tie_word_embeddings"})
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a wrong wiring cannot hide behind ones and zeros
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ours(hf) -> torch.nn.Module:
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return build_model(LoadedModel(config, weights, None, "hf"), "float32", torch.device("cpu"))


class Session:
    """Drive our model step by step through a paged cache with a scrambled block table."""

    def __init__(self, model, block_size=4, num_blocks=64):
        self.model = model
        groups = group_layers(layer_specs(model.config, "fp32"))
        self.storage = KVCache(groups, num_blocks * len(groups), block_size)
        self.runner = ModelRunner(model, self.storage)
        scrambled = list(reversed(range(num_blocks * len(groups))))  # non-contiguous on purpose
        self.blocks = tuple(tuple(scrambled[g::len(groups)]) for g in range(len(groups)))
        self.length = 0

    def run(self, tokens):
        seq = ScheduledSequence("s", tuple(tokens), self.length, self.blocks, True)
        t, pos, meta = self.runner.prepare((seq,))
        hidden = self.model(t, pos, meta, self.storage.layers)
        self.length += len(tokens)
        return self.model.compute_logits(hidden)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_logits_match_transformers(name):
    hf = _hf_model(name)
    ours = _ours(hf)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (13,), generator=gen).tolist()
    steps = torch.randint(0, 256, (12,), generator=gen).tolist()

    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
    session = Session(ours)
    ours_prefill = session.run(prompt)
    torch.testing.assert_close(ours_prefill, out.logits[0].float(), atol=1e-4, rtol=1e-4)

    past = out.past_key_values
    for token in steps:
        with torch.no_grad():
            out = hf(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        torch.testing.assert_close(session.run([token])[0], out.logits[0, -1].float(), atol=1e-4, rtol=1e-4)


def test_config_reads_transformers_config_json():
    hf = _hf_model("gqa")
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.rope_theta) == (8, 2, 16, 5000.0)
