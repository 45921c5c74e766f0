"""The output head's product taken either way round gives the same logits."""

import pytest
import torch
import torch.nn.functional as F

from kvcache.models.layers import vocab_logits


@pytest.mark.parametrize("rows", [1, 2, 5, 9, 32, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_logits_equal_the_plain_product(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(3000, 64, generator=g).to(dtype)
    hidden = torch.randn(rows, 64, generator=g).to(dtype)
    got = vocab_logits(hidden, weight)
    assert got.shape == (rows, 3000) and got.dtype == dtype and got.is_contiguous()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), F.linear(hidden, weight).float(), rtol=tol, atol=tol)
