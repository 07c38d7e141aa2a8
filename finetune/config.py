"""Stage configs: trl's config dataclasses plus the model, LoRA, MoE and data fields, loaded from recipe YAML.

A recipe is flat YAML whose keys are the fields of the stage's config (plus a `data:` section, a
data_tools.pipeline.DataRecipe). `key=value` arguments on the command line override it (values parsed as YAML).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from trl import DPOConfig, KTOConfig, SFTConfig

# CPO (with SimPO) and ORPO live in trl.experimental, which warns at import; the pinned trl is tested here (see
# tests/finetune/test_preference_stages.py), so the notice would only repeat at every stage's start.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo import CPOConfig  # noqa: E402
from trl.experimental.orpo import ORPOConfig  # noqa: E402

LORA_PRESETS = ("attention", "shared_experts", "both")


class RecipeError(ValueError):
    """A recipe or command-line value that cannot be used; the message names the key."""


@dataclass
class ModelFields:
    """What every stage needs besides trl's arguments: the model, its dtype, LoRA and the MoE training knobs."""

    model_name_or_path: str = field(
        default="preset:tiny",
        metadata={"help": "A checkpoint folder (HF format) or `preset:<name>` for a randomly initialised preset."},
    )
    model_overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Config values changed before the model is built or loaded."}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder; default: the checkpoint's, else the packaged DeepSeek-V3 one."},
    )
    torch_dtype: str = field(
        default="float32", metadata={"help": "Weights dtype: float32 or bfloat16 (frozen base weights for LoRA)."}
    )
    data: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The data recipe (data_tools.pipeline.DataRecipe fields)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_preset: str = field(
        default="both",
        metadata={"help": "Modules that get adapters: attention, shared_experts or both (attention + shared experts)."},
    )
    lora_dense_mlp: bool = field(default=False, metadata={"help": "Also adapt the dense MLPs of the first layers."})
    lora_routed_experts: bool = field(
        default=False, metadata={"help": "Also adapt the fused routed experts (peft target_parameters; opt-in)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_trainable_tokens: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Tokens whose embedding rows train with the adapter (peft trainable_token_indices), e.g. chat "
            "tokens a Base never trained: ['<｜User｜>', '<｜Assistant｜>']; each entry must be one token."
        },
    )
    mtp_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the multi-token-prediction loss (paper: 0.3 then 0.1); 0 = off."}
    )
    balance_loss_alpha: float = field(
        default=0.0, metadata={"help": "Sequence-wise balance loss weight (paper: 1e-4); 0 = off."}
    )
    router_bias_gamma: float = field(
        default=0.001,
        metadata={"help": "Aux-loss-free bias update speed per optimizer step (paper: 0.001); 0 = no update."},
    )
    router_bias_update: str = field(
        default="auto",
        metadata={"help": "Update the router bias: auto (when the router weights train), always or never."},
    )
    loss_log_file: str | None = field(
        default="losses.jsonl", metadata={"help": "Every logged metric as JSON lines in output_dir; null = none."}
    )


@dataclass
class StageDefaults:
    """trl arguments whose defaults differ here: CPU-friendly, TensorBoard, every step logged, no column pruning."""

    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Old name of activation_checkpointing."}
    )
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Recompute each decoder layer's activations in backward (saves memory)."}
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 autocast (AMX on CPUs that have it)."})
    report_to: None | str | list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Loggers by trl/transformers name (tensorboard, wandb, trackio, ...); none for none."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every this many optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the last N checkpoints."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "Optimizer (fused AdamW: ~8x faster on CPU)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Datasets come prepared by data_tools."})
    output_dir: str | None = field(default="outputs/run", metadata={"help": "Checkpoints, logs and the final model."})


@dataclass
class SFTStageConfig(StageDefaults, ModelFields, SFTConfig):
    """Supervised fine-tuning (full or LoRA) on packed chat data."""


@dataclass
class CPTStageConfig(StageDefaults, ModelFields, SFTConfig):
    """Continued pre-training on a raw-text domain corpus (all tokens trained)."""


@dataclass
class DPOStageConfig(StageDefaults, ModelFields, DPOConfig):
    """Preference optimisation with trl's DPO loss family (sigmoid, ipo, hinge, robust, ...)."""


@dataclass
class KTOStageConfig(StageDefaults, ModelFields, KTOConfig):
    """KTO on unpaired examples (prompt, completion, desirable or not); loss_type kto or apo_zero_unpaired."""

    unpair_preferences: bool = field(
        default=False,
        metadata={
            "help": "The data are preference pairs (prompt/chosen/rejected): each pair gives one desirable and one "
            "undesirable example, shuffled with the seed (trl does the same with pairs)."
        },
    )


@dataclass
class CPOStageConfig(StageDefaults, ModelFields, CPOConfig):
    """Reference-free preference optimisation: CPO (sigmoid/hinge/ipo + cpo_alpha * NLL) and SimPO (loss_type=simpo)."""


@dataclass
class ORPOStageConfig(StageDefaults, ModelFields, ORPOConfig):
    """ORPO: NLL of prompt + chosen minus beta * mean log-sigmoid of the log odds ratio; no reference model."""


_T = TypeVar("_T")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict (values parsed as YAML, so 3e-4, true, [a, b] work; data.key sets data fields)."""
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML 1.1 reads 3e-4 as a string
        if key.startswith("data."):
            values.setdefault("data", {})[key[5:]] = value
        else:
            values[key] = value
    return values


def load_stage_config(cls: type[_T], path: str | Path | None, overrides: list[str] | None = None) -> _T:
    """Read a recipe YAML (and overrides) into `cls`; unknown keys fail with the closest known key."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of config keys")
    extra = parse_overrides(overrides or [])
    data = {**values.get("data", {}), **extra.pop("data", {})}
    values = {**values, **extra}
    if data:
        values["data"] = data
    return build_stage_config(cls, values, str(path) if path else "command line")


def build_stage_config(cls: type[_T], values: dict[str, Any], source: str = "config") -> _T:
    """Instantiate `cls` from a mapping, with our defaults and one-sentence errors."""
    known = {f.name for f in fields(cls) if f.init}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{source}: unknown key {key!r} for {cls.__name__}{hint}")
    merged = dict(values)
    if merged.get("bf16") and not torch.cuda.is_available():
        merged.setdefault("use_cpu", True)  # transformers refuses bf16 autocast on CPU unless told to use it
    lora_preset = merged.get("lora_preset", "both")
    if lora_preset not in LORA_PRESETS:
        raise RecipeError(f"{source}: lora_preset={lora_preset!r} is not one of {', '.join(LORA_PRESETS)}")
    if merged.get("torch_dtype", "float32") not in ("float32", "bfloat16"):
        raise RecipeError(f"{source}: torch_dtype must be float32 or bfloat16, got {merged['torch_dtype']!r}")
    if merged.get("lora_trainable_tokens") and not merged.get("use_lora"):
        raise RecipeError(f"{source}: lora_trainable_tokens needs use_lora: true (full fine-tuning trains every row)")
    if merged.get("router_bias_update", "auto") not in ("auto", "always", "never"):
        raise RecipeError(f"{source}: router_bias_update must be auto, always or never")
    try:
        return cls(**merged)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{source}: {str(err).splitlines()[0]}") from None


def fail(message: str) -> None:
    """Print a one-sentence error and exit 1 (user-facing errors are not tracebacks)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
