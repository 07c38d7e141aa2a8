"""Rotary position embedding with YaRN, applied to interleaved pairs as the DeepSeek-V3 checkpoint lays them out."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import DeepseekV3Config


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_len: int) -> float:
    return dim * math.log(max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def build_inv_freq(config: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim // 2] and the cos/sin scale, as the official YaRN code computes them."""
    rope = config.rope_parameters or {}
    dim = config.qk_rope_head_dim
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope.get("rope_type", rope.get("type", "default")) != "yarn":
        return freqs, 1.0
    factor = float(rope["factor"])
    original = int(rope["original_max_position_embeddings"])
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1 keeps the original (high) frequency, 0 interpolates by `factor`
    inv_freq = freqs / factor * (1 - smooth) + freqs * smooth
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(config: DeepseekV3Config) -> float:
    """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on (0.1352 at 671B)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters or {}
    if rope.get("rope_type", rope.get("type", "default")) == "yarn" and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"])) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Computes cos/sin [B, S, rope_dim // 2] for given positions."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        inv_freq, self.attention_scaling = build_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, S, D/2]
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... of x [B, S, H, D] by cos/sin [B, S, D/2].

    The result is written de-interleaved (all first elements, then all second elements). q and k both go
    through this, so q.k is unchanged; the order of rope channels inside a head has no other observer.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, D/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
