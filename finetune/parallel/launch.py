"""What a stage launched on several processes needs: the expert-parallel size, the CPU backend, the final save.

`accelerate launch --config_file recipes/accelerate/zero3_ep.yaml -m finetune.sft --config R` with `EP_SIZE=N` in
the environment runs the stage with ZeRO-3 and N-way expert parallelism; finetune/stage.py calls these functions so
every stage gets it. The size is an environment variable (not a recipe key) because it belongs to the launch, as
the process count does: the same recipe runs on one CPU or on 64 GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_tools import save_tokenizer

from .checkpoint import save_consolidated
from .groups import ExpertParallelGroups, ParallelConfigError, check_ep_size

EP_SIZE_VAR = "EP_SIZE"


TOOLKIT_ROOT = Path(__file__).resolve().parents[2]  # where recipes/ lives in a checkout


def resolve_deepspeed_config_path() -> None:
    """The accelerate configs name `deepspeed_config_file: recipes/deepspeed/...` relative to the toolkit; accelerate
    reads it relative to the working directory. Under `accelerate launch`, a relative path that is not there is
    looked up in the toolkit's folder (and the environment updated to it), so the configs work from any directory;
    one that is in neither is one sentence here, before DeepSpeed starts."""
    value = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not value or value.lower() == "none" or Path(value).is_file():
        return
    candidate = TOOLKIT_ROOT / value
    if not Path(value).is_absolute() and candidate.is_file():
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(candidate)
        return
    raise ParallelConfigError(
        f"the accelerate config's deepspeed_config_file {value!r} is not a file (relative paths are read from the "
        f"working directory {os.getcwd()}, then from the toolkit's folder {TOOLKIT_ROOT})"
    )


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 for a plain `python -m`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def expert_parallel_size() -> int:
    """EP_SIZE from the environment (1 when unset), checked against the launch; one-sentence errors."""
    raw = os.environ.get(EP_SIZE_VAR, "").strip()
    if raw in ("", "1"):
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ParallelConfigError(f"{EP_SIZE_VAR}={raw!r} must be a positive integer")
    ep_size, world = int(raw), launched_world_size()
    if world == 1:
        raise ParallelConfigError(
            f"{EP_SIZE_VAR}={ep_size} needs several processes: launch with "
            "`accelerate launch --config_file recipes/accelerate/zero3_ep.yaml` (or zero3_ep_cpu.yaml)"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        raise ParallelConfigError(
            f"{EP_SIZE_VAR}={ep_size} needs DeepSpeed ZeRO-3 (recipes/accelerate/zero3_ep*.yaml): plain data "
            "parallelism would average different ranks' experts"
        )
    check_ep_size(ep_size, world)
    return ep_size


def cpu_backend_overrides(overrides: list[str]) -> list[str]:
    """Add `ddp_backend=gloo` for a multi-process run without GPUs unless the command line sets ddp_backend.

    accelerate 1.15 + DeepSpeed on CPUs sets num_processes=1 on every rank unless the state is created with
    backend="gloo"; the stage config (transformers' TrainingArguments) creates that state in its __post_init__
    from `ddp_backend`, so it must be set before the config is built.
    """
    if launched_world_size() == 1 or torch.cuda.is_available():
        return overrides
    if any(item.split("=", 1)[0] == "ddp_backend" for item in overrides):
        return overrides
    return [*overrides, "ddp_backend=gloo"]


def check_zero_stage(config: Any, ep_size: int) -> None:
    """Expert parallelism is only correct under DeepSpeed ZeRO-3 (the stage the expert marking is written for)."""
    plugin = getattr(config, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    if ep_size > 1 and stage != 3:
        raise ParallelConfigError(
            f"{EP_SIZE_VAR}={ep_size} needs DeepSpeed ZeRO stage 3, the launch configures stage {stage} "
            "(use recipes/deepspeed/zero3_ep.json)"
        )


def zero3_enabled(config: Any) -> bool:
    """True when the stage runs under DeepSpeed ZeRO-3 (accelerate's DeepSpeed plugin or a deepspeed config)."""
    plugin = getattr(config, "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None) == 3


def data_parallel_layout() -> ExpertParallelGroups:
    """The trivial layout (ep_size 1, every rank data parallel) that save_consolidated takes without experts split."""
    world, rank = dist.get_world_size(), dist.get_rank()
    return ExpertParallelGroups(
        ep_size=1,
        ep_rank=0,
        ep_group=None,
        edp_size=world,
        edp_rank=rank,
        edp_group=None,
        world_size=world,
        rank=rank,
    )


def _gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter made whole (collective under ZeRO-3); filled on rank 0 only."""
    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if dist.get_rank() == 0:
                    state[name] = param.detach().to("cpu").clone()
        elif dist.get_rank() == 0:
            state[name] = param.detach().to("cpu").clone()
    return state


def apply_consolidated_save(trainer: Any, groups: ExpertParallelGroups, base: nn.Module) -> None:
    """Make `trainer.save_model` write a loadable HF folder under ZeRO-3 (and expert parallelism).

    transformers' own save under ZeRO-3 either gathers the whole model on rank 0 (only with
    stage3_gather_16bit_weights_on_model_save, and it knows nothing of our expert split) or falls back to a DeepSpeed
    checkpoint alone. Full models are written by save_consolidated (every expert, global indices, streamed); LoRA
    adapters are gathered (they are never expert-parallel) and saved by peft on rank 0. Intermediate checkpoints
    (Trainer._save_checkpoint calls save_model) get the same folder plus DeepSpeed's optimizer states.
    """

    def save_model(output_dir: str | None = None, _internal_call: bool = False) -> None:
        out = Path(output_dir or trainer.args.output_dir)
        if hasattr(trainer.model, "peft_config"):
            state = _gather_trainable(trainer.model)
            if dist.get_rank() == 0:
                trainer.model.save_pretrained(str(out), state_dict=state)
        else:
            save_consolidated(base, out, groups)
        if dist.get_rank() == 0 and trainer.processing_class is not None:
            save_tokenizer(trainer.processing_class, out)
        dist.barrier()
        if dist.get_rank() == 0:
            print(
                f"consolidated HF checkpoint ({groups.world_size} ranks, ep_size={groups.ep_size}) in {out}",
                file=sys.stderr,
            )

    trainer.save_model = save_model
