"""Multi-head Latent Attention (MLA): low-rank queries and a shared compressed key/value latent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekV3Config
from .rope import apply_rope, softmax_scale


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight (as the checkpoint was trained)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# Ask data-dependent questions (is the batch packed? padded?) on the host when tensors are on the CPU. Tests set it
# False to run the accelerator's path, which never asks, on a CPU.
HOST_CHECKS_ON_CPU = True


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    query_len: int,
    past_len: int,
    given_positions: bool = True,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, S, past + S] (True = attend), or None when plain causal attention suffices.

    Three things restrict attention beyond causality: padded keys (attention_mask [B, past + S] with 0s), and
    packed samples, recognised by position_ids that do not continue by +1 (each sample restarts at 0): a token
    attends only within its own run. Padding query rows that would see no key at all attend to themselves,
    so no row of the softmax is empty (an empty row is NaN, and NaN * 0 would leak into real tokens).

    Whether a batch is packed or padded is a data-dependent question: on the CPU it is asked (free there, and plain
    causal attention is SDPA's fastest path); on an accelerator it would stall the stream once a forward, so the
    mask is built whenever the caller gave position_ids (packed rows) or an attention_mask, without asking.
    """
    on_host = position_ids.device.type == "cpu" and HOST_CHECKS_ON_CPU
    packed = False
    if past_len == 0 and query_len > 1 and given_positions:
        packed = bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any()) if on_host else True
    padded = attention_mask is not None and attention_mask.dim() == 2
    if padded and on_host:
        padded = not bool(attention_mask.all())
    if not packed and not padded and past_len == 0:
        return None
    device = position_ids.device
    key_len = past_len + query_len
    q_index = torch.arange(query_len, device=device) + past_len
    k_index = torch.arange(key_len, device=device)
    mask = (k_index[None, :] <= q_index[:, None])[None, None]  # [1, 1, S, T]
    if packed:
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        segment = starts.long().cumsum(-1)  # [B, S]
        mask = mask & (segment[:, None, :, None] == segment[:, None, None, :])
    if padded:
        mask = mask & attention_mask[:, None, None, :key_len].bool()
        mask = mask | (k_index[None, None, None, :] == q_index[None, None, :, None])
    return mask


class MLAttention(nn.Module):
    """MLA as in DeepSeek-V3: q from q_a -> norm -> q_b (or one q_proj), k/v from the kv_lora_rank latent.

    Each head is [nope | rope]; the rope part of k is one head shared by all heads. The KV cache holds the
    compressed latent (kv_lora_rank + rope dims per token), not per-head keys and values.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = softmax_scale(config)
        hidden, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        cos: torch.Tensor,  # [B, S, rope_dim // 2]
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # [B, 1, S, T] bool, or None for causal
        cache=None,  # a transformers Cache holding the latents, or None
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(bsz, seq, self.num_heads, self.qk_dim)  # [B, S, H, nope + rope]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, S, kv_lora_rank]
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin)  # [B, S, 1, rope]
        if cache is not None:
            # Latents are cached as [B, 1, T, D] so the cache's sequence axis is dim 2.
            latent, k_rope = cache.update(latent.unsqueeze(1), k_rope.transpose(1, 2), self.layer_idx)
            latent, k_rope = latent.squeeze(1), k_rope.transpose(1, 2)
        keys = latent.shape[1]
        kv = self.kv_b_proj(latent).view(bsz, keys, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, self.num_heads, -1)), dim=-1)  # [B, T, H, qk]

        if self.v_dim < self.qk_dim:
            # SDPA's fused CPU kernel needs equal q/k/v head dims; with zero-padded values it replaces the math
            # path that materialises [B, H, S, T] (measured 1.1x faster fwd+bwd at qk 96, v 64, S 256).
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None and seq > 1,
            scale=self.scale,
        )[..., : self.v_dim]  # [B, H, S, v]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.v_dim))
