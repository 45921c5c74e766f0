"""Decode attention over an fp8 / int8 / int4 KV cache in one C call (``kvcache.kernels``, kvquant.c).

The PyTorch path (``QuantizedGroup.key_scores``, a softmax, ``weighted_values``) gathers a step's
codes, widens them in several whole-tensor passes and folds the scales into matmuls: at 64
sequences x 1,024 tokens that read cost 1.1-1.75x float32's. The kernel reads each code where it
lies, decodes it inside the dot product and keeps nothing but one row of head_dim floats per thread.

It applies to a step's decode rows (one query token per sequence) when the kernels are built, the
queries are float32 on the CPU, the layer's group keeps quantized keys and values
(:meth:`~kvcache.cache.storage.LayerCache.quantized_tensors`), and no eviction policy asked for the
step's attention weights (the kernel does not hand them out). Anything else takes the PyTorch path,
which computes the same function (the tests hold the two together).
"""

from __future__ import annotations

import ctypes

import torch

from kvcache import kernels
from kvcache.cache.storage import LayerCache


def applies(q: torch.Tensor, cache: LayerCache, collecting: bool) -> bool:
    """Whether :func:`decode` can take these decode rows (``collecting``: a policy wants their weights)."""
    return (not collecting and q.dtype == torch.float32 and q.device.type == "cpu"
            and kernels.library() is not None and cache.quantized_tensors() is not None)


def decode(q: torch.Tensor, cache: LayerCache, tables: torch.Tensor, seq_lens: list[int],
           window: int | None, scale: float) -> torch.Tensor:
    """Single-token queries q [n, heads, hd] float32 -> attention outputs [n, heads, hd].

    Sequence i attends to the first ``seq_lens[i]`` tokens its row of ``tables`` [n, width] (block ids)
    holds, the last ``window`` of them if ``window`` is set, as :func:`paged_attention`'s decode rows
    do. Raises IndexError for a table that points outside the cache or a sequence longer than its row.
    """
    stored = cache.quantized_tensors()
    heads_kv, num_blocks, block_size, _ = stored.k_codes.shape  # [kv_heads, num_blocks, block_size, code_width]
    n, heads, hd = q.shape
    tables = tables.to(torch.int64).contiguous()  # [n, width]
    lens = torch.tensor(seq_lens, dtype=torch.int32)  # [n]
    if n and (min(seq_lens) < 1 or max(seq_lens) > tables.shape[1] * block_size
              or int(tables.min()) < 0 or int(tables.max()) >= num_blocks):
        raise IndexError(f"decode rows read outside the cache (lengths {seq_lens}, {num_blocks} blocks)")
    if stored.rotation is not None:  # keys stored as k @ R: q . k = (q @ R) . (k @ R)
        q = q.view(n, heads_kv, heads // heads_kv, hd).transpose(0, 1) @ stored.rotation  # [kv_heads, n, group, hd]
        q = q.transpose(0, 1).reshape(n, heads, hd)
    q = q.contiguous()
    out = torch.empty_like(q)  # [n, heads, hd]
    ptr = (lambda params, i: params[i].data_ptr() if len(params) > i else None)
    layer = kernels.QuantCache(kernels.QUANT_FORMAT_CODES[stored.kv_format], heads_kv, heads // heads_kv, hd,
                               num_blocks, block_size, stored.value_group, stored.unit,
                               stored.k_codes.data_ptr(), stored.v_codes.data_ptr(), ptr(stored.k_params, 0),
                               ptr(stored.k_params, 1), ptr(stored.v_params, 0), ptr(stored.v_params, 1))
    step = kernels.QuantStep(n, tables.shape[1], window or 0, scale, q.data_ptr(), tables.data_ptr(),
                             lens.data_ptr(), out.data_ptr())
    status = kernels.library().kv_quant_decode(ctypes.byref(layer), ctypes.byref(step), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"the quantized decode attention kernel failed (status {status})")
    return out
