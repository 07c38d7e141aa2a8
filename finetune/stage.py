"""The steps every stage shares: parse the recipe, build tokenizer, model, LoRA and data, train with resume, save."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import get_peft_model
from transformers import PreTrainedTokenizerBase, set_seed

from data_tools import DataCollator, DataRecipe, build_datasets, load_tokenizer
from data_tools.tokenizer import TOKENIZER_FILES
from model import CheckpointError, DeepseekV3Config, DeepseekV3ForCausalLM, load_config
from model.checkpoint import has_mtp_tensors, list_checkpoint_files
from model.fp8 import FP8_GROUPS, apply_fp8_training

from .config import RecipeError, load_stage_config
from .export import ExportError, read_header
from .lora import build_lora_config
from .parallel import (
    ParallelConfigError,
    apply_expert_parallel,
    apply_global_expert_counts,
    build_expert_parallel_groups,
    init_distributed_cpu_aware,
    load_expert_parallel,
    prepare_zero3_expert_parallel,
)
from .parallel.launch import (
    apply_consolidated_save,
    check_zero_stage,
    cpu_backend_overrides,
    data_parallel_layout,
    expert_parallel_size,
    launched_world_size,
    resolve_deepspeed_config_path,
    zero3_enabled,
)
from .report import RunReportCallback, quiet_console
from .trainers import DeepseekSFTTrainer, LossFileCallback, trainer_kwargs, unwrap_base

_T = TypeVar("_T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_stage_args(cls: type[_T], argv: list[str] | None, stage: str, doc: str) -> _T:
    """`--config FILE [key=value ...]` -> the stage config."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        from .keys import stage_help

        print(stage_help(stage))
        raise SystemExit(0)
    quiet_known_notices()
    parser = argparse.ArgumentParser(prog=f"python -m finetune.{stage}", description=doc)
    parser.add_argument("--config", help="recipe YAML (keys are the fields of the stage config)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4 data.max_length=512")
    parsed = parser.parse_args(argv)
    try:
        resolve_deepspeed_config_path()
        ep_size = expert_parallel_size()
        if launched_world_size() > 1:
            # Before the config: its __post_init__ builds accelerate's state, which must find this group.
            init_distributed_cpu_aware()
        config = load_stage_config(cls, parsed.config, cpu_backend_overrides(parsed.overrides))
        check_zero_stage(config, ep_size)
    except ParallelConfigError as err:
        raise RecipeError(str(err)) from None
    check_output_dir(config)
    # Before anything random (a preset's init, LoRA's A matrices, peft inside trl's trainers, data shuffles): two
    # runs with the same seed are then bitwise equal on CPU.
    set_seed(config.seed)
    return config


def quiet_known_notices() -> None:
    """Notices a user cannot act on, which every run would print: DeepSpeed's "Setting accelerator to CPU" on a
    machine without a GPU (it is told instead), and transformers' deprecation of `is_gradient_checkpointing`, which
    peft and trl still call."""
    import warnings

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing. is deprecated", category=FutureWarning)


def align_tokens(model: Any, tokenizer: Any) -> None:
    """The model's pad / bos / eos ids set from the tokenizer, as transformers' Trainer does at its start, without
    its warning: the packaged tokenizer defines a pad id the checkpoint's config leaves unset, every run."""
    from transformers.trainer_utils import align_special_tokens
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.trainer_utils")
    level = logger.level
    logger.setLevel(hf_logging.ERROR)
    try:
        align_special_tokens(model, tokenizer)
    finally:
        logger.setLevel(level)


def model_config_values(config: Any) -> dict[str, Any]:
    """Config overrides from the recipe plus the training fields the stage sets."""
    return {
        **config.model_overrides,
        "mtp_loss_enabled": config.mtp_loss_weight > 0,
        "mtp_loss_weight": config.mtp_loss_weight if config.mtp_loss_weight > 0 else 0.3,
        "balance_loss_alpha": config.balance_loss_alpha,
    }


def build_model(config: Any) -> DeepseekV3ForCausalLM:
    """A preset (`preset:<name>`, random init from config.seed) or a checkpoint folder, with the stage's overrides.

    With EP_SIZE > 1 (see finetune.parallel.launch) each rank holds only its block of routed experts: a checkpoint
    is read expert-parallel (other ranks' expert tensors are never read), a preset is built whole with the same
    seed on every rank and then sliced. The groups ride on the model as `expert_parallel_groups`.
    """
    name = config.model_name_or_path
    dtype = DTYPES[config.torch_dtype]
    values = model_config_values(config)
    if name.startswith("preset:"):
        model_config = DeepseekV3Config.from_preset(name.removeprefix("preset:"), **values)
    elif (Path(name) / "config.json").is_file():
        model_config = load_config(name)
        for key, value in values.items():
            setattr(model_config, key, value)
        if config.use_lora and model_config.mtp_loss_enabled and model_config.num_mtp_modules:
            try:
                files = list_checkpoint_files(Path(name))
            except CheckpointError as err:
                raise RecipeError(str(err)) from None
            if not has_mtp_tensors(files, model_config):
                raise RecipeError(
                    f"{name} has no MTP layer (num_nextn_predict_layers={model_config.num_mtp_modules} but no "
                    f"model.layers.{model_config.num_hidden_layers}.* tensors, as transformers saves), and LoRA cannot "
                    "train a fresh one (its random block would stay frozen and unsaved): set mtp_loss_weight: 0, or "
                    "train fully"
                )
    else:
        raise RecipeError(f"model_name_or_path={name!r} is neither preset:<name> nor a checkpoint folder")
    ep_size = expert_parallel_size()
    groups = None
    if ep_size > 1:
        try:
            groups = build_expert_parallel_groups(ep_size, model_config.n_routed_experts)
        except ParallelConfigError as err:
            raise RecipeError(str(err)) from None
    if name.startswith("preset:"):
        set_seed(config.seed)
        model = DeepseekV3ForCausalLM(model_config).to(dtype)
        for moe in model.moe_layers():
            # The router and its bias stay fp32 in every dtype, as from_pretrained keeps them: a bias update of
            # gamma 1e-3 is lost in bf16 at |bias| 0.6 (bf16 steps there are 0.0039).
            moe.gate.float()
        if groups is not None:
            apply_expert_parallel(model, groups)
    else:
        fp8 = fp8_base_mode(config, name, model_config)
        quantized = bool(getattr(model_config, "quantization_config", None))
        if groups is None and zero3_enabled(config) and not (quantized and fp8 == "keep"):
            model = load_per_rank(name, model_config, dtype)
        elif groups is not None:
            model, _ = load_expert_parallel(
                DeepseekV3ForCausalLM, name, groups, dtype=dtype, config=model_config, fp8=fp8
            )
        else:
            model = DeepseekV3ForCausalLM.from_pretrained(
                name, config=model_config, torch_dtype=dtype, progress=is_main_process(), fp8=fp8
            )
    if groups is not None:
        model.expert_parallel_groups = groups
    apply_fp8_forward(model, config)
    return model


def load_per_rank(name: str, model_config: Any, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    """ZeRO-3 without expert parallelism: every rank builds and keeps only its partition (deepspeed.zero.Init) and the
    checkpoint streams in module by module (finetune.parallel.zero3.load_zero3_partitioned)."""
    import deepspeed

    from .parallel.zero3 import load_zero3_partitioned

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if is_main_process():
        print(f"zero3: each rank loads its partition of {name} (deepspeed.zero.Init)", file=sys.stderr)
    # Only how to partition: the rest of the DeepSpeed config (batch sizes, "auto" buckets) is the engine's business.
    ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    try:
        return load_zero3_partitioned(
            DeepseekV3ForCausalLM, name, model_config, dtype, ds_config, progress=is_main_process()
        )
    except CheckpointError as err:
        raise RecipeError(str(err)) from None


def fp8_base_mode(config: Any, name: str, model_config: Any) -> str:
    """How an FP8 checkpoint loads: frozen FP8 modules under LoRA, dequantized to torch_dtype for full fine-tuning
    (a full run on frozen FP8 modules trained only the norms, embeddings, head and routers); said in one line."""
    mode = config.fp8_base
    if mode == "auto":
        mode = "keep" if config.use_lora else "dequantize"
    if getattr(model_config, "quantization_config", None) and is_main_process():
        what = (
            "kept FP8 and frozen (1 byte a weight)"
            if mode == "keep"
            else f"dequantized to {config.torch_dtype} and trained"
        )
        if is_main_process():
            print(
                f"fp8: {name} is an FP8 checkpoint; its quantized weights are {what} (fp8_base: {mode})",
                file=sys.stderr,
            )
    return mode


def apply_fp8_forward(model: DeepseekV3ForCausalLM, config: Any) -> None:
    """fp8_training: an FP8 forward for the chosen trainable weights (model.fp8.apply_fp8_training)."""
    if config.fp8_training == "none":
        return
    groups = ("experts",) if config.fp8_training == "experts" else FP8_GROUPS
    changed = apply_fp8_training(model, groups)
    if is_main_process():
        print(
            f"fp8: FP8 forward for {len(changed)} trained modules (fp8_training: {config.fp8_training})",
            file=sys.stderr,
        )


def build_tokenizer(config: Any) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer, else the checkpoint's, else the packaged DeepSeek-V3 tokenizer."""
    path = config.tokenizer
    if path is None and (Path(config.model_name_or_path) / "tokenizer.json").is_file():
        path = config.model_name_or_path
    return load_tokenizer(path)


def build_data(
    config: Any, task: str, tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> tuple[Dataset, Dataset | None]:
    """Train and eval datasets from the recipe's `data:` section, checked against the model's vocabulary."""
    if not config.data:
        raise RecipeError("the recipe has no data: section")
    recipe = DataRecipe.from_dict({**config.data, "task": task})
    if len(tokenizer) > vocab_size:
        hint = (
            "; the packaged DeepSeek-V3 tokenizer needs a model with its vocabulary: preset:mini or preset:debug, or "
            "model_overrides: {vocab_size: 129280}"
            if config.model_name_or_path.startswith("preset:")
            else f"; pass the checkpoint's own tokenizer (tokenizer=...) or model_overrides: {{vocab_size: {len(tokenizer)}}}"
        )
        raise RecipeError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}{hint}")
    splits, report = build_datasets(recipe, tokenizer)
    if is_main_process():
        for warning in report.warnings():
            print(f"data: warning: {warning}", file=sys.stderr)
    return splits["train"], splits.get("eval")


def apply_lora(model: DeepseekV3ForCausalLM, config: Any, tokenizer: PreTrainedTokenizerBase | None = None):
    """Wrap the model with the recipe's LoRA preset (exact module names; see finetune.lora)."""
    return get_peft_model(model, build_lora_config_from(model, config, tokenizer))


def trainable_token_ids(tokenizer: PreTrainedTokenizerBase | None, tokens: list[str], vocab_size: int) -> list[int]:
    """lora_trainable_tokens -> token ids; each entry must be exactly one token of the tokenizer."""
    if not tokens:
        return []
    if tokenizer is None:
        raise RecipeError("lora_trainable_tokens needs the stage's tokenizer to find the tokens' ids")
    ids = []
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise RecipeError(f"lora_trainable_tokens: {token!r} is not a token string")
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise RecipeError(
                f"lora_trainable_tokens: {token!r} is {len(encoded)} tokens ({pieces}), not one; list the tokens "
                "separately"
            )
        if encoded[0] >= vocab_size:
            raise RecipeError(f"lora_trainable_tokens: {token!r} is id {encoded[0]}, past the model's {vocab_size}")
        ids.append(encoded[0])
    return ids


def build_lora_config_from(model: DeepseekV3ForCausalLM, config: Any, tokenizer: PreTrainedTokenizerBase | None = None):
    """The LoraConfig a stage config asks for (the MTP modules get adapters only when the MTP loss is on)."""
    try:
        return _build_lora_config(model, config, tokenizer)
    except RecipeError:
        raise
    except ValueError as err:  # a preset that matches nothing in this model
        raise RecipeError(str(err)) from None


def _build_lora_config(model: DeepseekV3ForCausalLM, config: Any, tokenizer: PreTrainedTokenizerBase | None):
    return build_lora_config(
        model,
        preset=config.lora_preset,
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        dense_mlp=config.lora_dense_mlp,
        routed_experts=config.lora_routed_experts,
        include_mtp=config.mtp_loss_weight > 0,
        trainable_tokens=trainable_token_ids(tokenizer, config.lora_trainable_tokens, model.config.vocab_size),
    )


# Files a folder may hold without being a run (a tokenizer or config put there by hand).
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
# A run's own files in output_dir (what overwrite_output_dir removes); checkpoint folders and shards by pattern.
RUN_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "trainer_state.json",
    "training_args.bin",
    *SIDE_FILES,
)
RUN_PATTERNS = (r"checkpoint-\d+", r"unverified-checkpoint-\d+", r"model-\d+-of-\d+\.safetensors")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def is_main_process() -> bool:
    """Rank 0 of a launch (or a single process): the one that removes and rewrites shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def resuming(config: Any) -> bool:
    return config.resume_from_checkpoint not in (None, False, "false", "none", "")


def check_output_dir(config: Any) -> None:
    """A used output_dir is refused unless the recipe resumes it or says overwrite_output_dir (then it is cleared).

    Otherwise the old run's checkpoints stay beside the new ones and `resume_from_checkpoint=last` later picks
    the old run's.
    """
    folder = Path(config.output_dir).absolute()
    for name, value in (("model_name_or_path", config.model_name_or_path), ("tokenizer", config.tokenizer)):
        if value and not str(value).startswith("preset:"):
            source = Path(value).absolute()
            if folder == source or source.is_relative_to(folder):
                raise RecipeError(
                    f"output_dir={config.output_dir} is or contains {name}={value}: the run would write over what "
                    "it reads; choose another output_dir"
                )
    if not folder.is_dir() or resuming(config):
        return
    run_files = (*RUN_FILES, config.loss_log_file or "")
    used = sorted(
        p.name for p in folder.iterdir() if p.name in run_files or any(re.fullmatch(r, p.name) for r in RUN_PATTERNS)
    )
    if all(name in SIDE_FILES for name in used):
        return  # only tokenizer or config files: nothing a run would mix up
    if not config.overwrite_output_dir:
        shown = ", ".join(used[:3]) + (", ..." if len(used) > 3 else "")
        raise RecipeError(
            f"output_dir={folder} already holds a run ({shown}): resume it with resume_from_checkpoint=last or "
            "start over with overwrite_output_dir=true"
        )
    if is_main_process():
        for name in [*used, ".staging"]:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None: it verifies): state, weights, and every torch file
    complete. Cheap: headers and zip directories only, nothing is unpickled."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    if not any((folder / name).is_file() for name in WEIGHT_FILES) and not any(folder.glob("global_step*")):
        return "no model or adapter weights"
    for file in sorted(folder.rglob("*")):
        if file.suffix == ".safetensors":
            try:
                read_header(file)  # the export's reader: header readable, every tensor inside the file
            except ExportError as err:
                return str(err)
        if file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
            return f"{file.relative_to(folder)} is truncated or not a torch file"
    return None


def resume_checkpoint(config: Any) -> str | None:
    """resume_from_checkpoint: a folder, or true/last/auto for the newest checkpoint in output_dir that verifies
    (checkpoint_problem); a checkpoint set aside after a divergence (unverified-checkpoint-N) is never picked."""
    value = config.resume_from_checkpoint
    if not resuming(config):
        return None
    if value in (True, "true", "last", "auto"):
        folder = Path(config.output_dir)
        candidates = []
        if folder.is_dir():
            candidates = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
        for candidate in sorted(candidates, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return str(candidate)
            if is_main_process():
                print(f"resume: skipping {candidate}: {problem}", file=sys.stderr)
        if value != "auto":
            raise RecipeError(f"resume_from_checkpoint={value}: no checkpoint in {folder} that verifies")
        return None
    if not Path(value).is_dir():
        raise RecipeError(f"resume_from_checkpoint={value!r} is not a folder")
    problem = checkpoint_problem(Path(value))
    if problem is not None:
        raise RecipeError(f"resume_from_checkpoint={value}: cannot resume from it: {problem}")
    return str(value)


def trim_loss_log(config: Any, checkpoint: str) -> None:
    """Drop the records of steps after `checkpoint` from the loss log: the resumed run logs them again."""
    if not config.loss_log_file or not is_main_process():
        return
    path = Path(config.output_dir) / config.loss_log_file
    if not path.is_file():
        return
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0)
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by the kill that ended the run
    path.write_text("".join(f"{line}\n" for line in kept))


def train_and_save(trainer: Any, config: Any) -> None:
    """Train (resuming when asked) and save the final model or adapter with the tokenizer."""
    if hasattr(trainer.model, "peft_config") and not config.model_name_or_path.startswith("preset:"):
        # peft records the base only from a model's __dict__; the adapter must name its base to be loadable alone.
        for peft_config in trainer.model.peft_config.values():
            peft_config.base_model_name_or_path = str(Path(config.model_name_or_path).absolute())
    prepare_distributed(trainer, config)
    checkpoint = resume_checkpoint(config)
    if checkpoint is not None:
        trim_loss_log(config, checkpoint)
        if is_main_process():
            print(f"resuming from {checkpoint}", file=sys.stderr)
    quiet_console(trainer)
    if is_main_process():
        print(f"precision: {precision_summary(config)}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.output_dir)
    if is_main_process():
        write_adapter_card(config)
        report = Path(config.output_dir) / "report.md"
        print(f"saved to {config.output_dir}" + (f" (report: {report})" if report.is_file() else ""), file=sys.stderr)


def precision_summary(config: Any) -> str:
    """What the run computes in, and on a CPU why (bf16: auto follows what the CPU does natively)."""
    mode = (
        f"bf16 autocast ({config.torch_dtype} weights; router and losses fp32)" if config.bf16 else config.torch_dtype
    )
    if torch.cuda.is_available():
        return mode
    from .hardware import cpu_description

    return f"{mode} (CPU: {cpu_description()})"


def write_adapter_card(config: Any) -> None:
    """An adapter folder's README.md says what it is and how to use it (in place of peft's template, whose fields
    all read "[More Information Needed]")."""
    folder = Path(config.output_dir)
    if not (folder / "adapter_config.json").is_file():
        return
    adapter = json.loads((folder / "adapter_config.json").read_text())
    base = adapter.get("base_model_name_or_path") or config.model_name_or_path
    targets = adapter.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, (list, set)) else [str(targets)]
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags:",
        "- deepseek_v3",
        "- lora",
        "- dsv3-finetune",
        "---",
        "",
        f"# LoRA adapter ({folder.name})",
        "",
        f"- base model: `{base}`",
        f"- LoRA: r {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, preset `{config.lora_preset}`, "
        f"modules: {', '.join(f'`{t}`' for t in targets) or 'see adapter_config.json'}",
        f"- trained by dsv3-finetune; the run's curves and numbers: report.md, plots/, {config.loss_log_file or '-'}",
        "",
        "Use it:",
        "",
        "```bash",
        f"dsv3-finetune chat --model {folder}                       # base + adapter, in the terminal",
        f"dsv3-finetune export --base {base} --adapter {folder} --out merged  # one checkpoint engines load",
        f"dsv3-finetune export --base {base} --adapter {folder} --out served --format adapter  # vLLM / peft LoRA",
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def loss_callbacks(config: Any, stage: str = "") -> list:
    """The LossFileCallback writing every log record to output_dir/loss_log_file, and the run report (plots/ and
    report.md) drawn from it at each save and at the end; none when loss_log_file is empty."""
    if not config.loss_log_file:
        return []
    return [
        LossFileCallback(f"{config.output_dir}/{config.loss_log_file}"),
        RunReportCallback(config.output_dir, config.loss_log_file, stage, config.model_name_or_path),
    ]


def train_lm_stage(
    config_class: type,
    task: str,
    argv: list[str] | None,
    doc: str | None,
    prepare_model: Any = None,
    trainer_cls: type = DeepseekSFTTrainer,
) -> None:
    """sft and cpt: the same language-modelling run over data_tools' `task` (chats or raw text), full or LoRA.

    `prepare_model(model, config)` runs after the model is built (ESFT freezes all but its experts there);
    `trainer_cls` replaces DeepseekSFTTrainer with a subclass."""
    config = parse_stage_args(config_class, argv, task, doc)
    tokenizer = build_tokenizer(config)
    model = build_model(config)
    if prepare_model is not None:
        prepare_model(model, config)
    train, evaluation = build_data(config, task, tokenizer, model.config.vocab_size)
    if config.use_lora:
        model = apply_lora(model, config, tokenizer)
    align_tokens(unwrap_base(model), tokenizer)
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollator(pad_id=tokenizer.eos_token_id),
        processing_class=tokenizer,
        callbacks=loss_callbacks(config, task),
        **trainer_kwargs(config),
    )
    train_and_save(trainer, config)


def train_preference_stage(trainer_cls: type, config: Any, model: Any, tokenizer: Any, train: Any, evaluation: Any):
    """Build a preference trainer (DPO, KTO, CPO, ORPO) the same way for every stage, train it and save."""
    align_tokens(model, tokenizer)
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=build_lora_config_from(model, config, tokenizer) if config.use_lora else None,
        callbacks=loss_callbacks(config, trainer_cls.__name__.removeprefix("Deepseek").removesuffix("Trainer").lower()),
        **trainer_kwargs(config),
    )
    train_and_save(trainer, config)


def prepare_distributed(trainer: Any, config: Any) -> None:
    """Under several processes: global expert counts, ZeRO-3 marking of an expert-parallel model, an HF final save.

    Runs after LoRA (the stage's or the trainer's own peft wrapping) and before trainer.train, where accelerate
    hands the model to deepspeed.initialize. A no-op for a single process.
    """
    if launched_world_size() == 1 or not dist.is_initialized():
        return
    base = unwrap_base(trainer.model)
    groups = getattr(base, "expert_parallel_groups", None)
    if groups is not None:
        prepare_zero3_expert_parallel(trainer.model, groups)
    else:
        # Router biases are buffers no data-parallel engine syncs: each rank must update them from the global
        # batch's expert counts, or they drift apart rank by rank.
        apply_global_expert_counts(trainer.model)
    if zero3_enabled(config):
        apply_consolidated_save(trainer, groups or data_parallel_layout(), base)
