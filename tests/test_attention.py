"""The fast paged attention against the plain reference, on random data and scrambled block tables,
for every KV cache format (the reference reads the whole cache decoded to float32)."""

import pytest
import torch

from kvcache.cache.spec import KVCacheGroup, KVSpec
from kvcache.cache.storage import KVCache
from kvcache.models.attention import AttentionMetadata, build_masks, paged_attention, reference_attention

FORMATS = ["fp32", "bf16", "fp16", "fp8", "int8", "int4"]


def _filled_cache(kv_heads, head_dim, num_blocks, block_size, kv_format, seed):
    """A one-layer cache whose every slot holds random K/V (written through the format)."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache((KVCacheGroup(0, KVSpec(kv_heads, head_dim, kv_format), (0,)),), num_blocks, block_size)
    slots = num_blocks * block_size
    cache.layers[0].write(torch.randn(slots, kv_heads, head_dim, generator=gen),
                          torch.randn(slots, kv_heads, head_dim, generator=gen), torch.arange(slots))
    return cache


def _case(query_lens, seq_lens, heads, kv_heads, head_dim=8, block_size=4, window=None, seed=0,
          kv_format="fp32"):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()  # scrambled physical blocks
    tables, slots, used = [], [], 0
    for q, s in zip(query_lens, seq_lens):
        n = -(-s // block_size)
        table = order[used:used + n]
        used += n
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_lens=list(query_lens), seq_lens=list(seq_lens),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]), block_size=block_size,
        num_decodes=sum(1 for q, s in zip(query_lens, seq_lens) if q == 1 and s > 1), sliding_window=window)
    build_masks(meta, "cpu")
    t = sum(query_lens)
    q = torch.randn(t, heads, head_dim, generator=gen)
    k = torch.randn(t, kv_heads, head_dim, generator=gen)
    v = torch.randn(t, kv_heads, head_dim, generator=gen)

    def cache():
        return _filled_cache(kv_heads, head_dim, num_blocks, block_size, kv_format, seed)
    return q, k, v, cache, meta


@pytest.mark.parametrize("query_lens,seq_lens", [
    ([1], [9]),  # one decode
    ([1, 1, 1], [3, 17, 8]),  # batched decodes of different lengths
    ([7], [7]),  # a fresh prefill
    ([5], [12]),  # a prefill chunk after cached context
    ([1, 1, 6, 3], [5, 20, 6, 11]),  # decodes first, then prefills with and without context
    ([1] * 11, [41, 38, 35, 30, 22, 12, 10, 9, 8, 3, 2]),  # several length groups, padded separately
])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 3])
def test_fast_path_matches_reference(query_lens, seq_lens, heads, kv_heads, window):
    q, k, v, make_cache, meta = _case(query_lens, seq_lens, heads, kv_heads, window=window)
    fast_cache, slow_cache = make_cache(), make_cache()
    fast = paged_attention(q, k, v, fast_cache.layers[0], meta, 0.35)
    slow = reference_attention(q, k, v, slow_cache.layers[0], meta, 0.35)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_cache.pages.buffer, slow_cache.pages.buffer)  # same writes


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("query_lens,seq_lens", [
    ([1], [9]), ([1, 1, 1], [3, 17, 8]), ([5], [12]), ([1, 1, 6, 3], [5, 20, 6, 11]),
    ([1] * 6, [41, 38, 30, 12, 9, 2])])
@pytest.mark.parametrize("window", [None, 5])
def test_every_format_matches_the_reference_over_the_decoded_cache(kv_format, query_lens, seq_lens, window):
    q, k, v, make_cache, meta = _case(query_lens, seq_lens, 6, 2, head_dim=64, window=window, kv_format=kv_format)
    fast_cache, slow_cache = make_cache(), make_cache()
    fast = paged_attention(q, k, v, fast_cache.layers[0], meta, 0.125)
    slow = reference_attention(q, k, v, slow_cache.layers[0], meta, 0.125)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast_cache.pages.buffer, slow_cache.pages.buffer)


@pytest.mark.parametrize("query_lens,seq_lens", [([1], [9]), ([1, 1, 1], [3, 17, 8]), ([1, 5], [30, 9])])
def test_bfloat16_fast_path_matches_reference(query_lens, seq_lens):
    q, k, v, make_cache, meta = _case(query_lens, seq_lens, 6, 2, window=None, kv_format="bf16")
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    fast = paged_attention(q, k, v, make_cache().layers[0], meta, 0.35)
    slow = reference_attention(q, k, v, make_cache().layers[0], meta, 0.35)
    torch.testing.assert_close(fast.float(), slow.float(), atol=2e-2, rtol=2e-2)


def test_decode_groups_bound_padding():
    from kvcache.models.attention import group_decodes
    lens = [1000, 900, 800, 700, 300, 250, 200, 150, 40, 30, 20, 10, 5]
    groups = group_decodes(lens)
    assert groups[0] == (0, 4) and groups[-1][1] == len(lens)
    assert all(b > a for a, b in groups) and [g[0] for g in groups[1:]] == [g[1] for g in groups[:-1]]
    padded = sum((b - a) * lens[a] for a, b in groups)
    assert padded < 1.6 * sum(lens) < len(lens) * lens[0]


def test_write_goes_only_to_mapped_slots():
    q, k, v, make_cache, meta = _case([3], [3], 2, 2)
    cache = make_cache()
    before = cache.pages.regions["k"][0].clone()
    paged_attention(q, k, v, cache.layers[0], meta, 1.0)
    after = cache.pages.regions["k"][0]
    flat_before, flat_after = before.flatten(1, 2), after.flatten(1, 2)  # [kv_heads, slots, hd]
    changed = (flat_before != flat_after).any(-1).any(0).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(meta.slot_mapping.tolist())
    torch.testing.assert_close(flat_after[:, meta.slot_mapping].transpose(0, 1), k)


def test_sliding_tables_start_at_the_first_block_the_window_reaches():
    from kvcache.runtime.plan import ScheduledSequence
    from kvcache.runtime.runner import blocks_out_of_window
    table = (tuple(range(13)),)  # 13 blocks of 8: positions 0..103

    def seq(start: int, n: int) -> ScheduledSequence:
        return ScheduledSequence("r", tuple(range(n)), start, table, sample=True)

    # decode at position 99 (seq_len 100), window 24: keys 76..99 are visible, block 76 // 8 = 9 first
    assert blocks_out_of_window(seq(99, 1), 24, 8) == 9
    # a prefill chunk of 10 at positions 90..99: its first query sees from 90 - 23 = 67, block 8
    assert blocks_out_of_window(seq(90, 10), 24, 8) == 8
    assert blocks_out_of_window(seq(10, 1), 24, 8) == 0  # the window still reaches position 0
    assert blocks_out_of_window(seq(99, 1), None, 8) == 0  # full attention reads every block
