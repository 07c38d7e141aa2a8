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
# tiny with the real 129,280-token vocabulary and twice its width: what a recipe on the packaged DeepSeek-V3 tokenizer
# needs (the quickstart's recipes and the demo's Base). About 34M parameters, 33M of them the embedding and the head.
PRESETS["mini"] = {
    **PRESETS["tiny"],
    "vocab_size": 129280,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
}


# The keys of the official DeepSeek-V3 config.json (deepseek-ai/DeepSeek-V3, HF format), in the forms it writes them:
# serving engines (vLLM, SGLang, llama.cpp's converter) and transformers 4.x and 5.x read these and nothing else.
# vLLM builds the router bias only when topk_method is "noaux_tc" and llama.cpp gates with softmax unless
# scoring_func says "sigmoid", so a checkpoint without them loads wrongly or not at all. Training-only settings
# (mtp_loss_*, balance_loss_alpha) live in the recipe, never here.
OFFICIAL_CONFIG_KEYS = (
    "architectures",
    "model_type",
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "first_k_dense_replace",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "kv_lora_rank",
    "max_position_embeddings",
    "moe_intermediate_size",
    "moe_layer_freq",
    "n_group",
    "n_routed_experts",
    "n_shared_experts",
    "norm_topk_prob",
    "num_attention_heads",
    "num_experts_per_tok",
    "num_hidden_layers",
    "num_key_value_heads",
    "num_nextn_predict_layers",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "quantization_config",
    "rms_norm_eps",
    "rope_scaling",
    "rope_theta",
    "routed_scaling_factor",
    "scoring_func",
    "tie_word_embeddings",
    "topk_group",
    "topk_method",
    "torch_dtype",
    "use_cache",
    "v_head_dim",
    "vocab_size",
)
# The official FP8 format (the 671B checkpoint's quantization_config).
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
_OFFICIAL_DEFAULTS = {"moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def official_rope_scaling(config: DeepseekV3Config) -> dict[str, Any] | None:
    """rope_scaling as the official file writes it ({"type": "yarn", ...} without rope_theta), or None for plain RoPE."""
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        return None
    scaling = {"type": rope.get("rope_type", rope.get("type"))}
    scaling.update({key: rope[key] for key in _YARN_KEYS if rope.get(key) is not None})
    return scaling


def official_config_dict(
    config: DeepseekV3Config, torch_dtype: str = "bfloat16", quantization_config: dict | None = None
) -> dict[str, Any]:
    """config.json for a checkpoint: exactly the official key set and forms, with the stored tensors' dtype.

    quantization_config is written only when given (an FP8 checkpoint); every other value comes from `config`.
    """
    rope = dict(config.rope_parameters or {})
    values: dict[str, Any] = {}
    for key in OFFICIAL_CONFIG_KEYS:
        if key == "architectures":
            values[key] = ["DeepseekV3ForCausalLM"]
        elif key == "model_type":
            values[key] = "deepseek_v3"
        elif key == "rope_scaling":
            values[key] = official_rope_scaling(config)
        elif key == "rope_theta":
            values[key] = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        elif key == "torch_dtype":
            values[key] = torch_dtype
        elif key == "quantization_config":
            if quantization_config:
                values[key] = dict(quantization_config)
        else:
            values[key] = getattr(config, key, _OFFICIAL_DEFAULTS.get(key))
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(values[key], list) and len(values[key]) == 1:
            values[key] = values[key][0]
    return values


def save_official_config(
    config: DeepseekV3Config,
    out: str | Path,
    torch_dtype: str = "bfloat16",
    quantization_config: dict | None = None,
) -> dict[str, Any]:
    """Write `out`/config.json in the official form (see official_config_dict) and return what was written."""
    values = official_config_dict(config, torch_dtype, quantization_config)
    path = Path(out) / "config.json"
    tmp = path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    tmp.replace(path)
    return values
