"""The fast paged attention against the plain reference, on random data and scrambled block tables."""

import pytest
import torch

from kvcache.models.attention import AttentionMetadata, build_masks, paged_attention, reference_attention


def _case(query_lens, seq_lens, heads, kv_heads, head_dim=8, block_size=4, window=None, seed=0):
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
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen)
    t = sum(query_lens)
    q = torch.randn(t, heads, head_dim, generator=gen)
    k = torch.randn(t, kv_heads, head_dim, generator=gen)
    v = torch.randn(t, kv_heads, head_dim, generator=gen)
    return q, k, v, k_cache, v_cache, meta


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
    q, k, v, kc, vc, meta = _case(query_lens, seq_lens, heads, kv_heads, window=window)
    kc2, vc2 = kc.clone(), vc.clone()
    fast = paged_attention(q, k, v, kc, vc, meta, 0.35)
    slow = reference_attention(q, k, v, kc2, vc2, meta, 0.35)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc2)  # both wrote the same slots


@pytest.mark.parametrize("query_lens,seq_lens", [([1], [9]), ([1, 1, 1], [3, 17, 8]), ([1, 5], [30, 9])])
def test_bfloat16_fast_path_matches_reference(query_lens, seq_lens):
    q, k, v, kc, vc, meta = (t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t
                             for t in _case(query_lens, seq_lens, 6, 2, window=None))
    fast = paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.35)
    slow = reference_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.35)
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
    q, k, v, kc, vc, meta = _case([3], [3], 2, 2)
    before = kc.clone()
    paged_attention(q, k, v, kc, vc, meta, 1.0)
    flat_before, flat_after = before.flatten(1, 2), kc.flatten(1, 2)  # [kv_heads, slots, hd]
    changed = (flat_before != flat_after).any(-1).any(0).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(meta.slot_mapping.tolist())
    torch.testing.assert_close(flat_after[:, meta.slot_mapping].transpose(0, 1), k)
