"""A llama-family step of few tokens as one call into ``kvcache.kernels`` (decode.c), when it applies.

The PyTorch forward of one SmolLM2 decode step runs ~40 operators per layer at 5-10 us of dispatch
each: ~20 ms a token, as much as reading the weights. :class:`FusedDecode` hands the whole stack
of layers to one C function instead: per step Python passes the token ids and positions (the C step
widens the embedding's rows and reads the RoPE table's), the plan's slot mappings, block tables and
each token's visible keys, and gets the last hidden states (or the logits and their argmax) back.

It applies when the step has at most ``MAX_TOKENS`` tokens, all decoding or verifying drafts (a
prompt's rows go to PyTorch's GEMM, so its KV is the same however it is split), the model computes
in float32 on the CPU with the paged attention, the kernels are built, every layer's cache keeps
plain float32 or bfloat16 keys and values, and no eviction policy (h2o, snapkv) asked for the
step's attention weights; the live slots of a policy that evicted are read like any others (each
token sees its table's first seq_len slots, compacted). Anything else takes the PyTorch path, which
computes the same function (the tests hold the two together).
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Sequence

import torch
from torch import nn

from kvcache import kernels
from kvcache.cache.storage import LayerCache
from kvcache.models.attention import AttentionMetadata, paged_attention
from kvcache.models.layers import head_weight
from kvcache.models.packed import KERNEL_MAX_ROWS, PackedEmbedding, PackedLinear, PackedWeight

MAX_TOKENS = 16


def _weight(linear: PackedLinear | PackedWeight) -> kernels.Weight:
    ptr = (lambda t: None if t is None else t.data_ptr())
    rows, cols = linear.shape if isinstance(linear, PackedWeight) else (linear.out_features, linear.in_features)
    return kernels.Weight(kernels.FORMAT_CODES[linear.fmt], rows, cols, linear.data.data_ptr(), ptr(linear.scale),
                          ptr(linear.minimum), ptr(getattr(linear, "bias", None)))


def _kernel_weight(weight: torch.Tensor | PackedWeight) -> PackedWeight | None:
    """A weight as the kernel reads it (the output head, the embedding), or None where it cannot (a
    float16 tensor, another device, a view with gaps)."""
    if isinstance(weight, torch.Tensor):
        if weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        weight = PackedWeight(str(weight.dtype).removeprefix("torch."), weight)
    ok = weight.data.device.type == "cpu" and weight.data.is_contiguous() and weight.fmt in kernels.FORMAT_CODES
    return weight if ok else None


def _kernel_embedding(model) -> PackedWeight | None:
    """The embedding table for the C step to widen rows of, where its lookup is nothing more (an
    nn.Embedding without max_norm, or a PackedEmbedding, with no hooks) and gives float32; else None,
    and the step takes the module's own output."""
    embed = model.embed_tokens
    plain = (type(embed) in (nn.Embedding, PackedEmbedding) and getattr(embed, "max_norm", None) is None
             and not embed._forward_hooks and not embed._forward_pre_hooks)
    return _kernel_weight(head_weight(embed)) if plain and activation_dtype(model) == torch.float32 else None


class FusedDecode:
    """The C structures describing one model over one set of layer caches, built once and reused."""

    def __init__(self, model, caches: Sequence[LayerCache]) -> None:
        config = model.config
        self.caches = caches  # kept alive: the structures point into their tensors
        layers = (kernels.Layer * config.num_layers)()
        planes = [c.plain_tensors() for c in caches]
        for i, (layer, cache, kv) in enumerate(zip(model.layers, caches, planes)):
            attn, mlp = layer.self_attn, layer.mlp
            layers[i] = kernels.Layer(layer.input_layernorm.weight.data_ptr(),
                                      layer.post_attention_layernorm.weight.data_ptr(),
                                      _weight(attn.qkv_proj), _weight(attn.o_proj), _weight(mlp.gate_up_proj),
                                      _weight(mlp.down_proj), kv[0].data_ptr(), kv[1].data_ptr(), cache.group_id,
                                      config.window_of(i) or 0)
        keys = planes[0][0]  # [kv_heads, num_blocks, block_size, head_dim]
        self.layers = layers
        self.head = _kernel_weight(head_weight(model.embed_tokens if model.lm_head is None else model.lm_head))
        # the model's rope and (where C cannot look rows up) its embedding are read at each step; a weak
        # reference, as the model keeps this object (LlamaForCausalLM._fused) and a cycle would hold
        # both, weights and all, until the cyclic garbage collector ran
        self._owner = weakref.ref(model)
        self.embed = _kernel_embedding(model)
        # the head runs in the step for as many rows as the head's own matmul takes through the kernel
        # (more go to PyTorch's GEMM there), so a row's logits do not depend on which path computed them
        self.head_rows = KERNEL_MAX_ROWS[self.head.fmt] if self.head is not None else 0
        self.final_norm = model.norm.weight
        self.model = kernels.Model(config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
                                   config.head_dim, config.intermediate_size, int(keys.dtype == torch.bfloat16),
                                   keys.shape[1], keys.shape[2], config.rms_norm_eps, model.layers[0].self_attn.scale,
                                   layers, self.final_norm.data_ptr(),
                                   _weight(self.head) if self.head is not None else kernels.Weight(),
                                   _weight(self.embed) if self.embed is not None else kernels.Weight())

    @property
    def owner(self):
        """The model this step runs (alive while anything can call :meth:`run`: the model holds this)."""
        return self._owner()

    @staticmethod
    def supports(model, caches: Sequence[LayerCache]) -> bool:
        """Whether this model and these caches can take the fused path at all (per-step conditions
        are checked in :func:`applies`)."""
        if kernels.library() is None or not all(isinstance(m, PackedLinear) for layer in model.layers
                                                for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                          layer.mlp.gate_up_proj, layer.mlp.down_proj)):
            return False
        planes = [c.plain_tensors() for c in caches]
        return (all(p is not None and p[0].device.type == "cpu" for p in planes)
                and len({(p[0].dtype, p[0].shape) for p in planes}) == 1
                and model.norm.weight.dtype == torch.float32 and model.norm.weight.device.type == "cpu")

    def computes_logits(self, n: int) -> bool:
        """Whether :meth:`run` can also compute the final norm and the head for a step of n tokens."""
        return n <= self.head_rows

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, metas: Sequence[AttentionMetadata],
            logits: bool = False, h: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The step of tokens [n] at positions [n] (integers, on the CPU): the last layer's output
        [n, hidden] float32, or with ``logits`` (where :meth:`computes_logits`) the float32 logits
        [n, vocab] of its final norm and each row's argmax [n] (int64, as ``logits.argmax(-1)``), from
        the same call. ``h`` [n, hidden] float32 on the CPU: the tokens' embeddings where the caller has
        them; else the C step widens the embedding's rows itself where it can read the table, or the
        model's embedding computes them. A token id outside the embedding or a negative position
        raises a ValueError before anything is computed."""
        n = tokens.shape[0]
        if positions.shape != (n,) or tokens.device.type != "cpu" or positions.device.type != "cpu":
            raise ValueError(f"the fused step takes CPU tokens and positions of one shape, not {tuple(tokens.shape)} "
                             f"on {tokens.device} and {tuple(positions.shape)} on {positions.device}")
        tokens, positions = tokens.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous()  # as C reads them
        if h is None and self.embed is None:
            h = self.owner.embed_tokens(tokens)
        ids = None
        if h is None:
            h, ids = torch.empty(n, self.model.hidden, dtype=torch.float32), tokens.data_ptr()  # [n, hidden]
        elif h.shape != (n, self.model.hidden) or h.dtype != torch.float32 or h.device.type != "cpu":
            raise ValueError(f"the fused step's embeddings must be float32 [{n}, {self.model.hidden}] on the CPU, "
                             f"not {h.dtype} {tuple(h.shape)} on {h.device}")
        h = h.contiguous()
        cos, sin = self.owner.rope.table(int(positions.max()) + 1)  # [rows > every position, head_dim]
        query_lens = metas[0].query_lens
        token_seq = torch.tensor([seq for seq, q in enumerate(query_lens) for _ in range(q)],
                                 dtype=torch.int32)  # [n]: each token's sequence
        keep = [token_seq]  # the plan's tensors live until the call returns
        plans = (kernels.GroupPlan * len(metas))()
        for g, meta in enumerate(metas):
            tables = meta.block_tables.contiguous()
            # a sequence's query j of q sees seq_len - q + 1 + j keys (itself and what comes before)
            keys = torch.tensor([length - q + 1 + j for q, length in zip(query_lens, meta.seq_lens) for j in range(q)],
                                dtype=torch.int32)  # [n]
            keep += [tables, keys]
            plans[g] = kernels.GroupPlan(meta.slot_mapping.data_ptr(), tables.data_ptr(), token_seq.data_ptr(),
                                         keys.data_ptr(), tables.shape[1])
        out = torch.empty(n, self.head.shape[0], dtype=torch.float32) if logits else None  # [n, vocab]
        best = torch.empty(n, dtype=torch.int64) if logits else None  # [n]
        status = kernels.library().kv_llama_decode(ctypes.byref(self.model), n, ids, h.data_ptr(),
                                                   positions.data_ptr(), cos.shape[0], cos.data_ptr(), sin.data_ptr(),
                                                   plans, None if out is None else out.data_ptr(),
                                                   None if best is None else best.data_ptr(),
                                                   torch.get_num_threads())
        if status == -3:
            raise ValueError(f"a token id outside the embedding's {self.embed.shape[0]} rows")
        if status == -4:
            raise ValueError("a negative position")
        if status != 0:
            raise RuntimeError(f"the fused decode kernel failed (status {status})")
        return h if out is None else (out, best)


def activation_dtype(model) -> torch.dtype:
    """The dtype the model's embedding hands its layers (a packed embedding widens to its out_dtype)."""
    embed = model.embed_tokens
    return getattr(embed, "out_dtype", None) or embed.weight.dtype


def applies(model, tokens: torch.Tensor, metas: Sequence[AttentionMetadata]) -> bool:
    """Whether this step of tokens [n] can run fused: few tokens, all decoding (or verifying drafts; a
    prompt's rows go through PyTorch, see AttentionMetadata.prefill_tokens), float32 on the CPU, paged
    attention, and no eviction policy waiting for the step's attention weights (the kernel does not
    hand them out)."""
    return (model.attention_fn is paged_attention and activation_dtype(model) == torch.float32
            and tokens.device.type == "cpu" and 0 < tokens.shape[0] <= MAX_TOKENS
            and all(m.scores is None and m.decode_rows for m in metas))
