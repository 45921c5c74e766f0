"""How the scheduler plans drafts, without a model: a verification is one query of the last token
and its drafts, trimmed to the step's budget, max_tokens and the context; drafts never preempt; the
rollback after verification leaves KV for every token but the last."""

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import KVCacheManager
from kvcache.config import SamplingParams, SchedulerConfig
from kvcache.engine.request import Request
from kvcache.engine.scheduler import Scheduler


def _decoding(sched: Scheduler, prompt: list[int], max_tokens: int = 16) -> Request:
    """A request past its prefill with one sampled token, as the engine leaves it."""
    r = Request(f"r{len(sched.running)}", prompt, SamplingParams(max_tokens=max_tokens))
    sched.add(r)
    sched.schedule()
    sched.step_done()
    r.all_token_ids.append(7)
    return r


def _sched(num_blocks: int = 16, budget: int = 64, max_model_len: int = 64) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), 4)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), kv, max_model_len)


def test_a_verification_is_the_last_token_and_its_drafts_in_one_query():
    sched = _sched()
    r = _decoding(sched, [1, 2, 3, 4, 5])
    r.spec_token_ids = [8, 9, 10]
    (seq,) = sched.schedule().sequences
    assert seq.token_ids == (7, 8, 9, 10) and seq.start_position == 5 and seq.num_spec_tokens == 3 and seq.sample
    assert len(r.block_tables[0]) == 3  # slots for positions 5..8
    assert sched.step_done() == [r] and r.num_computed_tokens == 9
    # verification kept draft 8 and a token of its own: KV stays for every token but that one
    r.all_token_ids += [8, 11]
    sched.end_verification(r, 3)
    assert r.num_computed_tokens == r.num_tokens - 1 == 7 and len(r.block_tables[0]) == 2
    assert not r.spec_token_ids and len(r.block_hashes) == 1  # only the full, verified block is hashed


def test_drafts_are_trimmed_to_the_budget_max_tokens_and_context():
    sched = _sched(budget=3)
    r = _decoding(sched, [1, 2, 3])
    r.spec_token_ids = [4, 5, 6, 7]
    assert sched.schedule().sequences[0].num_spec_tokens == 2  # budget 3 = the token + 2 drafts
    sched.step_done()
    r.all_token_ids.append(4)
    sched.end_verification(r, 2)
    short = _sched()
    s = _decoding(short, [1, 2, 3], max_tokens=3)  # 1 of 3 tokens out: the step may add 2 more
    s.spec_token_ids = [4, 5, 6, 7]
    assert short.schedule().sequences[0].num_spec_tokens == 1
    ctx = _sched(max_model_len=6)
    c = _decoding(ctx, [1, 2, 3, 4])  # 5 tokens of a 6-token context: no room for a draft
    c.spec_token_ids = [4, 5]
    assert ctx.schedule().sequences[0].num_spec_tokens == 0


def test_drafts_never_preempt_another_request():
    sched = _sched(num_blocks=4)
    a = _decoding(sched, [1, 2, 3, 4, 5, 6, 7], max_tokens=8)  # 2 blocks
    b = _decoding(sched, [1, 2, 3], max_tokens=8)  # 1 block: one free
    a.spec_token_ids = [1, 2, 3, 4, 5, 6]  # would need 2 more blocks
    plan = sched.schedule()
    assert [s.num_spec_tokens for s in plan.sequences] == [0, 0] and not plan.preempted
    assert sched.running == [a, b]
