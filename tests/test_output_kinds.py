"""output_kind: cumulative outputs, deltas that add up to the same thing, or only the final output."""

import pytest

from kvcache.config import SamplingParams

pytestmark = pytest.mark.slow
PROMPT = "Write a short poem about the sea, with unicode: é, ü, 🌊."


def run(engine, **kwargs):
    engine.add_request("r", PROMPT, SamplingParams(**kwargs))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


@pytest.mark.parametrize("n,stop", [(1, None), (3, None), (1, ["\n\n"])])
def test_deltas_add_up_to_the_cumulative_output(smollm_engine_factory, n, stop):
    engine = smollm_engine_factory(num_blocks=128, enable_prefix_caching=False)  # same computation twice
    common = dict(n=n, max_tokens=40, temperature=0.8, seed=5, logprobs=2, stop=stop)
    cumulative = run(engine, **common)[-1]
    deltas = run(engine, output_kind="delta", **common)
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    for sample in cumulative.outputs:
        parts = [c for d in deltas for c in d.outputs if c.index == sample.index]
        assert "".join(c.text for c in parts) == sample.text
        assert [t for c in parts for t in c.token_ids] == sample.token_ids
        assert [e for c in parts for e in c.logprobs] == sample.logprobs
        assert parts[-1].finish_reason == sample.finish_reason
        assert sum(bool(c.finish_reason) for c in parts) == 1
    assert deltas[-1].metrics["num_output_tokens"] == sum(len(c.token_ids) for c in cumulative.outputs)


def test_final_kind_yields_one_output(smollm_engine_factory):
    engine = smollm_engine_factory(num_blocks=128)
    expected = run(engine, max_tokens=12, temperature=0)[-1]
    outs = run(engine, max_tokens=12, temperature=0, output_kind="final")
    assert len(outs) == 1 and outs[0].finished
    assert outs[0].outputs[0].token_ids == expected.outputs[0].token_ids


def test_unknown_output_kind_is_refused():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="partial")
