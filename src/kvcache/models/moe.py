"""Mixture of experts as DeepSeek-V2/V3 run it: a gate picks ``experts_per_token`` routed experts
per token, their gated-MLP outputs are summed with the gate's weights, and the shared experts (one
wider gated MLP) see every token:

    out = sum_{e in topk(x)} w_e(x) expert_e(x) + shared(x)

The gate's rules (softmax or sigmoid scores, group-limited choice, correction bias, normalization,
scaling) are :class:`~kvcache.config.MoEConfig`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvcache.config import ModelConfig, MoEConfig
from kvcache.models.layers import GatedMLP


class Router(nn.Module):
    """The gate: [num_experts, hidden] logits, scored and chosen in float32."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = self.moe = config.moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, config.hidden_size))
        # V3's e_score_correction_bias: shifts which experts are chosen, not their weights
        self.register_buffer("e_score_correction_bias", torch.zeros(moe.num_experts) if moe.topk_method == "noaux_tc"
                             else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k])."""
        moe = self.moe
        logits = F.linear(x.float(), self.weight.float())  # [T, experts]
        scores = logits.sigmoid() if moe.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if moe.topk_method != "greedy":
            choice = _within_best_groups(choice, moe)
        ids = torch.topk(choice, k=moe.experts_per_token, dim=-1, sorted=False).indices  # [T, k]
        weights = scores.gather(1, ids)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * moe.routed_scaling_factor, ids


def _within_best_groups(choice: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """``choice`` [T, experts] with every expert outside each token's ``topk_group`` best groups
    ruled out (V3: groups ranked by the sum of their two best, outsiders -inf; V2: by their best,
    outsiders 0)."""
    grouped = choice.view(choice.shape[0], moe.n_group, -1)  # [T, groups, experts / group]
    if moe.topk_method == "noaux_tc":
        group_scores, outside = grouped.topk(2, dim=-1).values.sum(dim=-1), float("-inf")
    else:
        group_scores, outside = grouped.max(dim=-1).values, 0.0
    best = torch.topk(group_scores, k=moe.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, groups]
    return grouped.masked_fill(~keep.unsqueeze(-1), outside).view_as(choice)


class Experts(nn.Module):
    """The routed experts' weights stacked: gate_up [E, 2 x I, hidden], down [E, hidden, I]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe, hidden = config.moe, config.hidden_size
        self.intermediate = moe.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(moe.num_experts, 2 * moe.intermediate_size, hidden))
        self.down_proj = nn.Parameter(torch.empty(moe.num_experts, hidden, moe.intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], weights and ids [T, k] -> sum over each token's k experts, [T, hidden].
        Each chosen expert runs once, on the tokens that chose it."""
        out = torch.zeros_like(x)
        for expert in torch.unique(ids).tolist():
            tokens, slot = torch.where(ids == expert)  # [m], [m]
            gate, up = F.linear(x[tokens], self.gate_up_proj[expert]).split(self.intermediate, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])  # [m, hidden]
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
        return out


class MoE(nn.Module):
    """Routed experts plus the shared experts (none when the config has none)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = GatedMLP(config, F.silu, moe.intermediate_size * moe.num_shared_experts) \
            if moe.num_shared_experts else None

    def forward(self, x: torch.Tensor, decode_rows: bool = True) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (``decode_rows``: as GatedMLP's; experts are plain tensors)."""
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x, decode_rows)
