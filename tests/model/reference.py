"""Builds our model and transformers' DeepseekV3ForCausalLM from one tiny config with the same weights."""

from __future__ import annotations

import torch
from transformers import DeepseekV3Config as HFConfig
from transformers import DeepseekV3ForCausalLM as HFModel

from model import DeepseekV3Config, DeepseekV3ForCausalLM

OUR_FIELDS = ("mtp_loss_enabled", "mtp_loss_weight", "balance_loss_alpha")

# Three configs that between them cover q_lora_rank set/null, n_group > 1 and = 1, first_k_dense_replace 0 and > 0,
# YaRN and plain RoPE. Weights use a larger init than training would so routing and attention are far from uniform.
CONFIGS = {
    "qlora-groups-dense1-yarn": dict(initializer_range=0.1),
    "qproj-nogroup-dense0-plainrope": dict(
        q_lora_rank=None,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        rope_scaling=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.1,
    ),
    "qlora-2groups-dense2-yarn": dict(
        n_group=2,
        topk_group=1,
        num_hidden_layers=4,
        first_k_dense_replace=2,
        num_experts_per_tok=3,
        initializer_range=0.1,
    ),
}


def to_hf_config(config: DeepseekV3Config) -> HFConfig:
    """transformers' config with the same values; eager attention and eager experts as the independent reference."""
    values = {k: v for k, v in config.to_dict().items() if k not in OUR_FIELDS}
    hf_config = HFConfig(**values)
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = "eager"
    return hf_config


def build_pair(name: str, seed: int = 0, **overrides) -> tuple[DeepseekV3ForCausalLM, HFModel]:
    """(ours, transformers) in fp32 eval mode with identical weights and a non-zero routing bias."""
    config = DeepseekV3Config.from_preset("tiny", **{**CONFIGS[name], **overrides})
    torch.manual_seed(seed)
    reference = HFModel(to_hf_config(config)).float().eval()
    with torch.no_grad():
        for module in reference.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.05)
    ours = DeepseekV3ForCausalLM(config).float().eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(".mtp." in key for key in missing), (missing, unexpected)
    return ours, reference
