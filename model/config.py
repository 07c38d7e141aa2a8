"""DeepSeek-V3 configuration: transformers' config (same keys and defaults) plus validation and training fields."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config as _HFDeepseekV3Config

SUPPORTED_ROPE_TYPES = ("default", "yarn")


class ConfigError(ValueError):
    """A config value that the model cannot run with; the message names the key."""


@strict
class DeepseekV3Config(_HFDeepseekV3Config):
    """transformers' DeepseekV3Config, validated, with the fields training needs.

    The extra fields are written to config.json; transformers ignores them when it reads the file back.
    """

    # Multi-token prediction: the layers are always built, loaded and saved when num_nextn_predict_layers > 0;
    # this switch only decides whether their loss is computed (off costs nothing).
    mtp_loss_enabled: bool = False
    mtp_loss_weight: float = 0.3
    # Sequence-wise balance loss weight (paper eq. 17-20 uses 1e-4); 0 disables it.
    balance_loss_alpha: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        validate_config(self)

    @property
    def num_mtp_modules(self) -> int:
        """How many MTP modules the checkpoint holds (layer indices num_hidden_layers ...)."""
        return int(self.num_nextn_predict_layers or 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` is a DeepSeekMoE layer (else a dense MLP)."""
        freq = getattr(self, "moe_layer_freq", 1) or 1
        return layer_idx >= self.first_k_dense_replace and layer_idx % freq == 0

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DeepseekV3Config:
        """A named preset (see PRESETS) with optional overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_json_file(cls, path: str | Path) -> DeepseekV3Config:
        """Read a checkpoint's config.json; a malformed file or value is one error naming the file."""
        return load_config(path)


def load_config(path: str | Path) -> DeepseekV3Config:
    """Read config.json from a file or a checkpoint folder and validate it."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json found")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if values.get("model_type", "deepseek_v3") not in ("deepseek_v3", "kimi_k2"):
        raise ConfigError(f"{path}: model_type={values['model_type']!r} is not a DeepSeek-V3 architecture")
    for key in ("auto_map", "transformers_version"):
        values.pop(key, None)
    try:
        return DeepseekV3Config(**values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except Exception as err:  # strict-dataclass type errors
        raise ConfigError(f"{path}: {str(err).splitlines()[0]} {str(err).splitlines()[-1].strip()}") from None


def _positive(config: DeepseekV3Config, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a positive integer")


def validate_config(config: DeepseekV3Config) -> None:
    """Raise ConfigError naming the first key whose value the architecture cannot use."""
    _positive(
        config,
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
    )
    if config.q_lora_rank is not None:
        _positive(config, "q_lora_rank")
    if config.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim={config.qk_rope_head_dim} must be even (RoPE rotates pairs)")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ConfigError(
            f"num_key_value_heads={config.num_key_value_heads} must equal num_attention_heads="
            f"{config.num_attention_heads} (MLA expands every head from the shared latent)"
        )
    if config.n_shared_experts is None or config.n_shared_experts < 0:
        raise ConfigError(f"n_shared_experts={config.n_shared_experts!r} must be >= 0")
    if not 0 <= config.first_k_dense_replace <= config.num_hidden_layers:
        raise ConfigError(
            f"first_k_dense_replace={config.first_k_dense_replace} must be between 0 and "
            f"num_hidden_layers={config.num_hidden_layers}"
        )
    if config.n_routed_experts % config.n_group:
        raise ConfigError(
            f"n_group={config.n_group} does not divide n_routed_experts={config.n_routed_experts} into equal groups"
        )
    if config.topk_group > config.n_group:
        raise ConfigError(f"topk_group={config.topk_group} exceeds n_group={config.n_group}")
    experts_per_group = config.n_routed_experts // config.n_group
    if config.n_group > 1 and experts_per_group < 2:
        raise ConfigError(
            f"n_group={config.n_group} leaves {experts_per_group} expert per group; group scores sum the top-2 experts"
        )
    reachable = config.topk_group * experts_per_group
    if config.num_experts_per_tok > reachable:
        raise ConfigError(
            f"num_experts_per_tok={config.num_experts_per_tok} exceeds the {reachable} experts in the "
            f"topk_group={config.topk_group} chosen groups"
        )
    scoring = getattr(config, "scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ConfigError(f"scoring_func={scoring!r} is not supported (DeepSeek-V3 uses 'sigmoid')")
    topk_method = getattr(config, "topk_method", "noaux_tc")
    if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ConfigError(f"topk_method={topk_method!r} is not supported (DeepSeek-V3 uses 'noaux_tc')")
    if config.hidden_act != "silu":
        raise ConfigError(f"hidden_act={config.hidden_act!r} is not supported (DeepSeek-V3 uses 'silu')")
    rope = config.rope_parameters or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_scaling.type={rope_type!r} is unknown; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "yarn":
        for key in ("factor", "original_max_position_embeddings"):
            if not isinstance(rope.get(key), (int, float)) or rope[key] <= 0:
                raise ConfigError(f"rope_scaling.{key}={rope.get(key)!r} must be a positive number for YaRN")
    if config.num_nextn_predict_layers is not None and config.num_nextn_predict_layers < 0:
        raise ConfigError(f"num_nextn_predict_layers={config.num_nextn_predict_layers} must be >= 0")
    if not math.isfinite(config.mtp_loss_weight) or config.mtp_loss_weight < 0:
        raise ConfigError(f"mtp_loss_weight={config.mtp_loss_weight} must be a finite number >= 0")
    if not math.isfinite(config.balance_loss_alpha) or config.balance_loss_alpha < 0:
        raise ConfigError(f"balance_loss_alpha={config.balance_loss_alpha} must be a finite number >= 0")
    quant = getattr(config, "quantization_config", None)
    if quant:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(
                f"quantization_config={quant} is not supported (expected quant_method 'fp8' with fmt 'e4m3')"
            )


_YARN_671B = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

# Presets keep the real architecture's shape (MLA, grouped sigmoid routing, shared expert, dense-first layers,
# one MTP module, YaRN) at sizes a CPU runs in seconds.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=512,
        rope_scaling={**_YARN_671B, "factor": 4, "original_max_position_embeddings": 128},
        rope_theta=10000.0,
    ),
    "debug": dict(
        vocab_size=129280,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=16384,
        rope_scaling={**_YARN_671B, "factor": 4, "original_max_position_embeddings": 4096},
        rope_theta=10000.0,
    ),
    "deepseek-v3-671b": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        max_position_embeddings=163840,
        rope_scaling=_YARN_671B,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
    ),
}
