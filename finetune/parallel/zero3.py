"""ZeRO-3 with our expert-parallel layer under DeepSpeed 0.19.8 (directly or through accelerate).

Every parameter but the routed experts is partitioned over the whole world. Trainable expert parameters are
partitioned over their expert-data-parallel (EDP) group only, and their gradients reduced there, through the marking
DeepSpeed's AutoEP layer puts on its own experts (`ds_zero_placement_family="autoep_expert"`, the EDP group as
`ds_zero_partition_process_group`, `allreduce=False`, `group_name`), with our groups registered under that name.
Without it ZeRO-3 would flatten and average different ranks' experts together. Frozen FP8 tensors become buffers
(finetune.parallel.apply_local_fp8): never partitioned, never cast, never sent through a float8 collective.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import ExpertParallelMixin, apply_global_expert_counts, apply_local_fp8
from .groups import ExpertParallelGroups, register_with_deepspeed


def init_distributed_cpu_aware(timeout_minutes: int = 30) -> None:
    """Create the default process group: nccl with GPUs, gloo without; a no-op when it exists.

    The expert-parallel groups need it before the model is built. It is not enough for accelerate on CPUs:
    accelerate 1.15 + DeepSpeed without a GPU still sets num_processes=1 on every rank unless its own state is
    created with backend="gloo" (TrainingArguments' ddp_backend="gloo"; finetune.parallel.launch sets it).
    """
    if dist.is_initialized():
        return
    from datetime import timedelta

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def mark_expert_parameters(model: nn.Module, groups: ExpertParallelGroups) -> int:
    """Tag every routed-expert parameter for EDP partitioning and gradient reduction; returns how many."""
    count = 0
    for module in model.modules():
        if not isinstance(module, ExpertParallelMixin):
            continue
        for param in module.parameters(recurse=False):
            param.allreduce = False
            param.group_name = groups.name
            param.ds_zero_placement_family = "autoep_expert"
            param.ds_zero_partition_group_name = groups.name
            param.ds_zero_partition_process_group = groups.edp_group
            count += 1
    return count


def prepare_zero3_expert_parallel(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Everything ZeRO-3 needs on an expert-parallel model before deepspeed.initialize / accelerator.prepare."""
    register_with_deepspeed(groups)
    apply_local_fp8(model)
    mark_expert_parameters(model, groups)
    apply_global_expert_counts(model)


def prepare_zero3_reference(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """The same for a frozen expert-parallel reference model (full DPO/KTO), before trl's deepspeed.initialize.

    Unmarked, ZeRO-3 would partition each rank's (different) experts over the whole world, so a gathered expert
    would be a mix of ranks' experts, and the engine's start-up broadcast would give every rank rank 0's block.
    The expert counts stay rank-local: no bias update reads the reference's.
    """
    register_with_deepspeed(groups)
    apply_local_fp8(model)
    mark_expert_parameters(model, groups)


def zero3_config(
    micro_batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    gradient_clipping: float = 1.0,
    bf16: bool = False,
    world_size: int | None = None,
    bucket_size: int = 50_000_000,
    offload_optimizer: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed ZeRO-3 config the recipes ship (recipes/deepspeed/zero3_ep.json), as a dict.

    gradient_clipping is always explicit: DeepSpeed 0.19.8 clips at 1.0 when the key is absent.
    """
    world_size = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": gradient_clipping,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": bucket_size,
            "stage3_prefetch_bucket_size": bucket_size,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return config


def _deepspeed_state_classes() -> list[type]:
    """The non-tensor classes DeepSpeed 0.19.8 writes into its ZeRO checkpoints (found in real ones: the ZeRO stage
    enum and the loss scaler, in every rank's optim_states.pt)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects that unpickling would construct or call: refused before any of it runs."""


def check_deepspeed_checkpoint(folder: str) -> None:
    """Refuse a checkpoint whose DeepSpeed state files (any rank's) hold objects beyond tensors and DeepSpeed's own
    state classes. Reads the pickles' opcodes only, nothing runs; every rank checks every file, so all ranks stop
    with the same sentence before any collective (a rank that only met its own file would hang in the next one)."""
    from pathlib import Path

    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_state_classes()}
    files = set(Path(folder).glob("global_step*/*.pt"))
    latest = Path(folder) / "latest"  # the tag folder DeepSpeed actually loads
    if latest.is_file():
        files |= set((Path(folder) / latest.read_text().strip()).glob("*.pt"))
    for file in sorted(files):
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(file)) if g not in allowed]
        except Exception as err:  # not a torch zip at all
            raise UnsafeCheckpointError(f"{file}: not a readable DeepSpeed state file ({err})") from None
        if unsafe:
            raise UnsafeCheckpointError(
                f"{file}: refused to load: it holds objects other than tensors and DeepSpeed's own states "
                f"({', '.join(unsafe)}), which unpickling would run; resume only from checkpoints this toolkit wrote"
            )


def weights_only_checkpoint_engine(engine: Any) -> Any:
    """Wrap a DeepSpeed engine's checkpoint engine so that `load` unpickles tensors, containers and DeepSpeed's own
    state classes only (torch.load weights_only=True): DeepSpeed 0.19.8's TorchCheckpointEngine loads with
    weights_only=False, so a file planted in a checkpoint folder would run code on resume."""
    import pickle

    inner = engine

    class WeightsOnly:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_deepspeed_state_classes()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_state_classes()}
                names = ", ".join(g for g in unsafe if g not in allowed) or str(err).splitlines()[0]
                raise UnsafeCheckpointError(
                    f"{path}: refused to load: it holds objects other than tensors and DeepSpeed's own states "
                    f"({names}), which unpickling would run; resume only from checkpoints this toolkit wrote"
                ) from None

    return WeightsOnly()


# ---------------------------------------------------------------------------------------------------------------
# Per-rank loading (ZeRO-3 without expert parallelism)


def load_zero3_partitioned(
    cls,
    path,
    config,
    dtype: torch.dtype,
    ds_config: dict | str,
    progress: bool = True,
) -> nn.Module:
    """Build `cls` under deepspeed.zero.Init (each rank allocates only its partition of every parameter) and stream
    the checkpoint in module by module: rank 0 reads a module's tensors (dequantizing FP8 ones) into its gathered
    parameters, which DeepSpeed broadcasts and re-partitions on leaving the gather. Peak memory of a rank: its
    partition of the model, the module being filled (whole, on every rank), and on rank 0 the mapped pages of the
    shard it reads. Buffers (router biases, not partitioned) are read by every rank.

    Without it every rank built the whole model before DeepSpeed partitioned it: 8 x 1.34 TB of host memory for the
    671B model on one node.
    """
    from pathlib import Path

    import deepspeed
    from tqdm.auto import tqdm

    from model.checkpoint import (
        CheckpointError,
        _open_safetensors,
        _weight_block,
        check_mtp_presence,
        dequantize_fp8_block,
        expert_slot,
        hf_key_to_internal,
        list_checkpoint_files,
        mtp_shared_copy,
    )

    path = Path(path)
    files = list_checkpoint_files(path)
    fresh_mtp = check_mtp_presence(config, files, path)
    block = _weight_block(config)
    # The dtype goes through the config: DeepSpeed 0.19.8's Init ignores an explicit `dtype` on accelerators without
    # fp16 (`dtype or torch.float16 if fp16 else torch.bfloat16 ...` parses as `(dtype or fp16) if fp16 else bf16`):
    # every parameter of a CPU run came out bf16.
    if isinstance(ds_config, str):
        import json

        ds_config = json.loads(Path(ds_config).read_text())
    ds_config = {
        **ds_config,
        "bf16": {**(ds_config.get("bf16") or {}), "enabled": dtype == torch.bfloat16},
        "fp16": {**(ds_config.get("fp16") or {}), "enabled": dtype == torch.float16},
    }
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = cls(config)
    # Init casts every floating tensor made inside it to the config dtype, the router-bias buffers too; a buffer is
    # never partitioned, so it goes back to fp32 (a gamma 1e-3 bias update is lost in bf16 at |bias| 0.6).
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    # internal tensor name -> [(checkpoint key, expert, part)], from the key names alone: every rank agrees on what
    # is missing before any collective starts.
    slots: dict[str, list[tuple[str, int | None, str | None]]] = {}
    for key in files:
        if key.endswith("_scale_inv") or mtp_shared_copy(key, config) is not None:
            continue
        name, expert, part = hf_key_to_internal(key, config)
        slots.setdefault(name, []).append((key, expert, part))
    state_names = [n for n, _ in model.named_parameters()] + [
        n for n, _ in model.named_buffers() if n in dict(model.state_dict())
    ]
    missing = [n for n in state_names if n not in slots and not (fresh_mtp and ".mtp." in n)]
    if missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0

    def fill(name: str, target: torch.Tensor) -> None:
        """Copy the checkpoint's tensor(s) for `name` into `target` (experts into their slice of the fused layout)."""
        for key, expert, part in slots[name]:
            with _open_safetensors(files[key]) as handle:
                tensor = handle.get_tensor(key)
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_key = key + "_scale_inv"
                    with _open_safetensors(files[scale_key]) as scales:
                        tensor = dequantize_fp8_block(tensor, scales.get_tensor(scale_key), block)
            view = expert_slot(target, expert, part)
            if tuple(view.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}, the model expects {tuple(view.shape)}")
            view.copy_(tensor)
            del tensor

    modules = [(n, m) for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    bar = tqdm(total=len(modules), desc="loading weights (ZeRO-3)", unit="module", disable=not progress or rank != 0)
    with torch.no_grad():
        for module_name, module in modules:
            params = list(module.named_parameters(recurse=False))
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if rank == 0:
                    for pname, param in params:
                        name = f"{module_name}.{pname}" if module_name else pname
                        if name in slots:
                            fill(name, param.data)
            bar.update(1)
        for name, buffer in model.named_buffers():
            if name in slots:
                fill(name, buffer)
        if fresh_mtp:  # a checkpoint without MTP tensors: a fresh module, made on rank 0 and broadcast
            for layer in model.model.mtp:
                params = [*layer.parameters(), model.model.norm.weight]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    if rank == 0:
                        layer.apply(model._init_weights)
                        layer.shared_head.norm.weight.copy_(model.model.norm.weight)
    bar.close()
    return model
