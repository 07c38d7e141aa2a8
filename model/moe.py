"""DeepSeekMoE: sigmoid group-limited router with a selection-only bias, fused routed experts, shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekV3Config


class MLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts (names as in the checkpoint)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The noaux_tc gate: sigmoid scores, bias used only to choose, group-limited top-k, normalised weights."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))
        # Aux-loss-free balancing bias: changed by the training loop's bias update, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (expert indices [N, K], weights [N, K] fp32, scores [N, E] fp32)."""
        # fp32 even under autocast (bf16 mixed precision): autocast would run the linear in bf16 whatever the
        # input's dtype, and the routing decisions and the bias update need the fp32 scores.
        with no_autocast(x.device.type):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            top_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, self.num_experts)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [N, K]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return indices, weights * self.scaling, scores


def no_autocast(device_type: str):
    """A context without autocast for `device_type` (a no-op where autocast is off or does not exist)."""
    import contextlib

    if device_type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on `x` runs in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    if device in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class RoutedExperts(nn.Module):
    """All routed experts as two fused 3-D weights, run as grouped GEMMs over tokens sorted by expert.

    gate_up_proj [E, 2I, H] holds each expert's gate rows then up rows; down_proj [E, H, I]. The layout is
    transformers 5's, so the checkpoint adapter is the only place that knows the per-expert keys.
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, inter))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices/weights [N, K] -> sum_k weights * expert_k(x) [N, H]."""
        num_tokens, top_k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)  # [N*K], token-expert pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        tokens = x[order // top_k]  # [N*K, H]
        out = self.run_experts(tokens, counts)  # [N*K, H]
        out = out * weights.reshape(-1)[order].unsqueeze(-1)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(num_tokens, top_k, -1).sum(1).to(x.dtype)

    def run_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert MLPs over tokens sorted by expert ([T, H], counts [E]) -> [T, H], as two grouped GEMMs.

        (A zero-padded [E, capacity, H] batch through torch.bmm looked 4x faster on CPU while the machine was
        loaded by other jobs; measured alone it is 10% slower than torch._grouped_mm, so it was dropped.)
        """
        offsets = counts.cumsum(0, dtype=torch.int32)
        # Autocast does not cover _grouped_mm: under bf16 mixed precision the GEMMs are cast here, as a Linear's.
        dtype = compute_dtype(tokens)
        gate_up, down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        gate, up = torch._grouped_mm(tokens.to(dtype), gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)


def sequence_balance_loss(
    scores: torch.Tensor,  # [B, S, E] sigmoid scores
    indices: torch.Tensor,  # [B, S, K]
    token_mask: torch.Tensor | None,  # [B, S] bool, False for padding
    top_k: int,
) -> torch.Tensor:
    """Sequence-wise balance loss sum_i f_i P_i (paper eq. 17-20), averaged over sequences; alpha not applied."""
    bsz, seq, num_experts = scores.shape
    mask = torch.ones(bsz, seq, device=scores.device) if token_mask is None else token_mask.float()
    tokens = mask.sum(-1).clamp(min=1)  # [B]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0) * mask[..., None]  # [B, S, E]
    f = chosen.sum(1) * num_experts / (top_k * tokens[:, None])  # [B, E]
    probs = scores / scores.sum(-1, keepdim=True)
    p = (probs * mask[..., None]).sum(1) / tokens[:, None]  # [B, E]
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts plus shared experts; records per-expert token counts and the balance loss of its call."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.balance_loss_alpha = config.balance_loss_alpha
        self.expert_counts: torch.Tensor | None = None  # [E] tokens routed to each expert in the last call
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        indices, weights, scores = self.gate(flat)
        with torch.no_grad():
            chosen = indices if token_mask is None else indices[token_mask.reshape(-1)]
            self.expert_counts = torch.bincount(chosen.reshape(-1), minlength=self.gate.num_experts)
        self.balance_loss = None
        if self.balance_loss_alpha > 0 and self.training:
            self.balance_loss = self.balance_loss_alpha * sequence_balance_loss(
                scores.view(bsz, seq, -1), indices.view(bsz, seq, -1), token_mask, self.top_k
            )
        out = self.experts(flat, indices, weights).view(bsz, seq, hidden)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
