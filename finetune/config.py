"""Stage configs: trl's config dataclasses plus the model, LoRA, MoE and data fields, loaded from recipe YAML.

A recipe is flat YAML whose keys are the fields of the stage's config (plus a `data:` section, a
data_tools.pipeline.DataRecipe). `key=value` arguments on the command line override it (values parsed as YAML).
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import enum
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from trl import DPOConfig, KTOConfig, SFTConfig

from data_tools.pipeline import DataRecipe

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
    fp8_base: str = field(
        default="auto",
        metadata={
            "help": "An FP8 checkpoint's weights: keep (frozen FP8 modules, 1 byte a weight), dequantize (to "
            "torch_dtype, trainable), or auto: keep under LoRA (the base is frozen), dequantize for full "
            "fine-tuning (every weight trains)."
        },
    )
    fp8_training: str = field(
        default="none",
        metadata={
            "help": "FP8 forward (block-scaled e4m3 GEMMs, master weights kept in torch_dtype) for the trained "
            "weights: none, experts (the routed experts) or all (attention, dense, shared and routed experts); "
            "full fine-tuning only."
        },
    )
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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds a run (its checkpoints and logs are removed)."},
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
    bf16: bool | str | None = field(
        default="auto",
        metadata={
            "help": "bf16 autocast with fp32 master weights: true, false, or auto (on where the GPU supports bf16 or "
            "the CPU runs it natively, AVX512-BF16/AMX; off on CPUs that emulate it and under DeepSpeed)."
        },
    )
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
class ESFTStageConfig(StageDefaults, ModelFields, SFTConfig):
    """Expert-specialised fine-tuning (ESFT): only the routed experts an expert config selects train."""

    esft_config: str | None = field(
        default=None,
        metadata={
            "help": "The expert config (ESFT's JSON: experts per layer, shared_experts, non_expert_modules), e.g. "
            "written by python -m finetune.esft_select."
        },
    )


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
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of config keys")
    extra = parse_overrides(overrides or [])
    data = {**values.get("data", {}), **extra.pop("data", {})}
    values = {**values, **extra}
    if data:
        values["data"] = data
    return build_stage_config(cls, values, str(path) if path else "command line")


# Names users bring from other tools (and trl's own data keys, which the toolkit does not read: data_tools prepares
# every dataset) -> the key that does it here.
ALIASES = {
    "lora_rank": "lora_r",
    "rank": "lora_r",
    "r": "lora_r",
    "alpha": "lora_alpha",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "model": "model_name_or_path",
    "model_path": "model_name_or_path",
    "lora_target": "lora_preset",
    "lora_target_modules": "lora_preset",
    "dataset": "data.sources",
    "dataset_name": "data.sources",
}
TRL_DATA_KEYS = {
    "max_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "max_prompt_length": "data.max_length",
    "max_completion_length": "data.max_length",
    "packing": "data.pack",
    "padding_free": "data.pack",
    "dataset_text_field": "data.sources (with format:)",
    "completion_only_loss": "data.sources (the chat template masks prompts)",
    "assistant_only_loss": "data.sources (the chat template masks prompts)",
    "dataset_num_proc": "data.num_proc",
    "truncation_mode": "data.on_too_long",
}
# Text fields that also take true/false (resume_from_checkpoint: true means the newest checkpoint).
BOOL_AS_TEXT = {"resume_from_checkpoint"}
# Range checks: key -> (test, what the value must be).
RANGES: dict[str, tuple[Any, str]] = {
    "learning_rate": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "per_device_train_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "an integer >= 1"),
    "max_steps": (lambda v: v == -1 or v >= 1, "an integer >= 1 (or -1: train by num_train_epochs)"),
    "num_train_epochs": (lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "lora_r": (lambda v: v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_steps": (lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "max_grad_norm": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = no clipping)"),
    "logging_steps": (lambda v: v >= 0, "a number >= 0"),
    "save_steps": (lambda v: v >= 0, "a number >= 0"),
    "eval_steps": (lambda v: v is None or v > 0, "a number > 0"),
    "mtp_loss_weight": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "balance_loss_alpha": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "router_bias_gamma": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "beta": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "save_total_limit": (lambda v: v is None or v >= 0, "an integer >= 0 (0 or null: keep every checkpoint)"),
}


def _unknown_key(key: str, known: set[str], cls: type, source: str) -> RecipeError:
    if key in TRL_DATA_KEYS:
        return RecipeError(
            f"{source}: {key!r} is trl's key, which the toolkit does not read (data_tools prepares the data); "
            f"use {TRL_DATA_KEYS[key]}"
        )
    if key in ALIASES:
        return RecipeError(f"{source}: unknown key {key!r} for {cls.__name__}; did you mean {ALIASES[key]!r}?")
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"{source}: unknown key {key!r} for {cls.__name__}{hint}")


def _kinds(hint: Any) -> list[Any]:
    """The alternatives of a type hint (X | Y | None -> [X, Y, NoneType])."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [k for arg in typing.get_args(hint) for k in _kinds(arg)]
    return [hint]


def check_value(key: str, value: Any, hint: Any, source: str) -> Any:
    """`value` for a field typed `hint`, converted where that is safe; a RecipeError naming the key otherwise."""
    kinds = _kinds(hint)
    origins = {typing.get_origin(k) or k for k in kinds}
    if value is None:
        if type(None) in kinds or Any in kinds:
            return value
        raise RecipeError(f"{source}: {key} cannot be null")
    if Any in origins or type(value) in origins:
        if isinstance(value, bool) and bool not in origins and int in origins:
            raise RecipeError(f"{source}: {key}={value!r} must be an integer, not true/false")
        return value
    enums = [k for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum)]
    if isinstance(value, bool) and str in origins:
        if key in BOOL_AS_TEXT:
            return str(value).lower()
        if value is False and type(None) in kinds:
            return None  # `key: false` for an optional text field means unset
        # YAML reads no/yes/off/on as booleans: save_strategy=no means "no".
        if not value and any("no" in {m.value for m in e} for e in enums):
            return "no"
        raise RecipeError(f"{source}: {key}={value!r}: YAML read a boolean; quote the text you meant, e.g. {key}='no'")
    if isinstance(value, bool):
        raise RecipeError(f"{source}: {key}={value!r} must be {_describe(origins)}, not true/false")
    if str in origins and not (int in origins or float in origins) and isinstance(value, (int, float, datetime.date)):
        return str(value)  # run_name: 2024-06-01 or run_name=123: YAML read a date or a number
    if int in origins and isinstance(value, float) and value.is_integer():
        return int(value)
    if float in origins and isinstance(value, int):
        return float(value)
    if (int in origins or float in origins) and isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
            if float in origins:
                return number
            if number.is_integer():
                return int(number)
    if list in origins and isinstance(value, (str, int, float)):
        return [value]  # one item for a list field, as trl takes loss_type='ipo'
    raise RecipeError(f"{source}: {key}={value!r} must be {_describe(origins)}")


def _describe(origins: set[Any]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    names[dict] = "a mapping"
    return " or ".join(names[o] for o in (int, float, bool, str, list, dict) if o in origins) or "valid"


def build_stage_config(cls: type[_T], values: dict[str, Any], source: str = "config") -> _T:
    """Instantiate `cls` from a mapping, with our defaults and one-sentence errors.

    Every value is type-checked and range-checked here, before a model or a tokenizer loads.
    """
    known = {f.name for f in fields(cls) if f.init}
    for key in values:
        if key not in known or key in TRL_DATA_KEYS:
            raise _unknown_key(key, known, cls, source)
    data = values.get("data") or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: data must be a mapping of data recipe keys (data_tools.pipeline.DataRecipe)")
    data_keys = sorted(f.name for f in fields(DataRecipe))
    for key in data:
        if key not in data_keys:
            close = difflib.get_close_matches(key, data_keys, n=1)
            close = close or (["max_length"] if key in ("max_len", "max_seq_length", "seq_len") else [])
            hint = f"; did you mean 'data.{close[0]}'?" if close else ""
            raise RecipeError(f"{source}: unknown key 'data.{key}'{hint}")
    hints = typing.get_type_hints(cls)
    merged = {key: check_value(key, value, hints.get(key, Any), source) for key, value in values.items()}
    for key, value in merged.items():
        if key in RANGES and value is not None and not RANGES[key][0](value):
            raise RecipeError(f"{source}: {key}={value!r} must be {RANGES[key][1]}")
    if cls.__name__ in ("DPOStageConfig", "KTOStageConfig", "CPOStageConfig", "ORPOStageConfig"):
        if merged.get("mtp_loss_weight", 0) > 0:
            raise RecipeError(
                f"{source}: mtp_loss_weight: the preference stages do not train the MTP module; set it to 0"
            )
    if cls.__name__ in ("DPOStageConfig", "KTOStageConfig", "CPOStageConfig", "ORPOStageConfig"):
        # trl's preference collators truncate to their own max_length (DPO/KTO default 1024, CPO/ORPO 512): follow
        # data.max_length, which data_tools already enforces, so nothing is cut a second time behind the user's back.
        data_max = data.get("max_length", next(f.default for f in fields(DataRecipe) if f.name == "max_length"))
        merged["max_length"] = data_max
    if cls.__name__ == "KTOStageConfig" and merged.get("per_device_train_batch_size", 8) < 2:
        raise RecipeError(
            f"{source}: per_device_train_batch_size must be >= 2 for KTO (its KL term pairs each example with "
            "another completion of the same batch)"
        )
    if not torch.cuda.is_available():
        merged.setdefault("dataloader_pin_memory", False)  # nothing to pin for; torch warns at every dataloader
    bf16 = merged.get("bf16", "auto")
    if bf16 not in (True, False, None, "auto"):
        raise RecipeError(f"{source}: bf16={bf16!r} must be true, false or auto")
    if bf16 == "auto":
        bf16 = auto_bf16(bool(merged.get("deepspeed")), merged.get("fp8_training", "none") != "none")
    merged["bf16"] = bool(bf16)
    if merged["bf16"] and not torch.cuda.is_available():
        merged.setdefault("use_cpu", True)  # transformers refuses bf16 autocast on CPU unless told to use it
    lora_preset = merged.get("lora_preset", "both")
    if lora_preset not in LORA_PRESETS:
        raise RecipeError(f"{source}: lora_preset={lora_preset!r} is not one of {', '.join(LORA_PRESETS)}")
    if merged.get("torch_dtype", "float32") not in ("float32", "bfloat16"):
        raise RecipeError(f"{source}: torch_dtype must be float32 or bfloat16, got {merged['torch_dtype']!r}")
    if merged.get("lora_trainable_tokens") and not merged.get("use_lora"):
        raise RecipeError(f"{source}: lora_trainable_tokens needs use_lora: true (full fine-tuning trains every row)")
    if merged.get("fp8_base", "auto") not in ("auto", "keep", "dequantize"):
        raise RecipeError(f"{source}: fp8_base must be auto, keep or dequantize, got {merged['fp8_base']!r}")
    if merged.get("fp8_training", "none") not in ("none", "experts", "all"):
        raise RecipeError(f"{source}: fp8_training must be none, experts or all, got {merged['fp8_training']!r}")
    if merged.get("fp8_training", "none") != "none" and merged.get("use_lora"):
        raise RecipeError(
            f"{source}: fp8_training applies to fully trained weights; with use_lora the frozen base already runs "
            "in FP8 (fp8_base: keep)"
        )
    if merged.get("router_bias_update", "auto") not in ("auto", "always", "never"):
        raise RecipeError(f"{source}: router_bias_update must be auto, always or never")
    try:
        return cls(**merged)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{source}: {str(err).splitlines()[0]}") from None


def auto_bf16(deepspeed: bool = False, fp8_training: bool = False) -> bool:
    """What `bf16: auto` means here: bf16 autocast where the hardware runs bf16 natively.

    Not under DeepSpeed: its bf16 mode is not autocast but bf16 weights (fp32 master copies in the optimizer), a
    different precision a recipe asks for by name. Not with fp8_training (its FP8 forward sets its own precision).
    DSV3_AUTO_BF16=0 or 1 in the environment decides instead of the detection (the test suite sets 0, so its
    comparisons against fp32 references stay fp32).
    """
    forced = os.environ.get("DSV3_AUTO_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise RecipeError(f"DSV3_AUTO_BF16={forced!r} in the environment must be 0 or 1 (or unset)")
        return forced == "1"
    if deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return False
    if fp8_training:
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from .hardware import cpu_bf16_native

    return cpu_bf16_native()


def fail(message: str) -> None:
    """Print a one-sentence error and exit 1 (user-facing errors are not tracebacks)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
