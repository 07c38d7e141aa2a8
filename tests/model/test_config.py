"""Config reading, validation errors naming the key, presets, and the real 671B size on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config as HFConfig

from model import PRESETS, ConfigError, DeepseekV3Config, DeepseekV3ForCausalLM, load_config

REAL_CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "deepseek-v3-671b" / "config.json"


def test_real_config_reads_with_transformers_defaults() -> None:
    config = load_config(REAL_CONFIG)
    reference = HFConfig(**json.loads(REAL_CONFIG.read_text()))
    for key in ("hidden_size", "q_lora_rank", "n_group", "topk_group", "routed_scaling_factor", "rope_parameters"):
        assert getattr(config, key) == getattr(reference, key), key
    assert config.num_mtp_modules == 1 and config.mtp_loss_weight == 0.3
    # Keys left out of a config.json take transformers 5's defaults.
    minimal = DeepseekV3Config(hidden_size=64, num_hidden_layers=4)
    assert minimal.n_routed_experts == HFConfig().n_routed_experts == 256
    assert minimal.max_position_embeddings == HFConfig().max_position_embeddings


def test_preset_671b_equals_the_real_config() -> None:
    real, preset = load_config(REAL_CONFIG), DeepseekV3Config.from_preset("deepseek-v3-671b")
    for key in PRESETS["deepseek-v3-671b"]:
        if key not in ("rope_scaling", "rope_theta"):
            assert getattr(real, key) == getattr(preset, key), key
    assert real.rope_parameters == preset.rope_parameters


def test_671b_counts_671b_parameters_without_mtp_on_meta() -> None:
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(load_config(REAL_CONFIG))
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.model.mtp.parameters())
    assert round((total - mtp) / 1e9, 1) == 671.0
    # The MTP module shares the embedding and head (11.6B with them, as the paper counts it); the checkpoint's
    # MTP layer also stores copies of both, which makes the files' 684.5B ("685B" on the model card).
    assert round(total / 1e9, 1) == 682.6
    copies = 2 * model.config.vocab_size * model.config.hidden_size
    assert round((total + copies) / 1e9, 1) == 684.5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (dict(n_group=3), "n_group=3 does not divide n_routed_experts=8"),
        (dict(topk_group=5), "topk_group=5 exceeds n_group=4"),
        (dict(num_experts_per_tok=5, topk_group=2), "num_experts_per_tok=5 exceeds the 4 experts"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
        (dict(v_head_dim=0), "v_head_dim=0 must be a positive integer"),
        (dict(num_key_value_heads=2), "num_key_value_heads=2 must equal num_attention_heads=4"),
        (dict(rope_scaling={"type": "ntk", "factor": 2.0}), "rope_scaling.type='ntk' is unknown"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace=9 must be between 0 and num_hidden_layers=3"),
        (dict(scoring_func="softmax"), "scoring_func='softmax' is not supported"),
    ],
)
def test_inconsistent_values_name_the_key(override: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        DeepseekV3Config.from_preset("tiny", **override)


def test_bad_config_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64,\n "n_group": }')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 2"):
        load_config(tmp_path)
    bad.write_text(json.dumps({**PRESETS["tiny"], "topk_group": 9}))
    with pytest.raises(ConfigError, match=r"config.json: topk_group=9 exceeds n_group=4"):
        load_config(bad)
    bad.write_text(json.dumps({**PRESETS["tiny"], "n_group": "four"}))
    with pytest.raises(ConfigError, match=r"config.json: .*n_group"):
        load_config(bad)
    bad.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama' is not a DeepSeek-V3 architecture"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        DeepseekV3Config.from_preset("huge")


def test_yarn_softmax_scale_of_671b() -> None:
    from model.rope import softmax_scale

    assert softmax_scale(load_config(REAL_CONFIG)) == pytest.approx(0.1352338, abs=1e-7)
