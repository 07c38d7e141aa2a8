"""HF checkpoints under expert parallelism: each rank reads only the tensors it holds; consolidation is streamed.

Loading builds the model on the meta device, slices the experts to this rank's block before allocation, and reads
the checkpoint tensor by tensor with safe_open, skipping other ranks' expert tensors without touching their bytes.
Saving writes one HF-format checkpoint (per-expert keys with global indices, every expert) from all ranks at once:
each parameter is gathered only while it is written, each rank writes its own shard files, rank 0 writes the index.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.checkpoint import (
    INDEX_NAME,
    CheckpointError,
    _parse_size,
    _weight_block,
    build_meta_model,
    check_mtp_presence,
    dequantize_fp8_block,
    expert_slot,
    hf_key_to_internal,
    init_fresh_mtp,
    internal_to_hf,
    list_checkpoint_files,
    mtp_shared_copy,
    reset_nonpersistent_buffers,
    resolve_dtype,
    save_checkpoint_config,
)
from model.config import DeepseekV3Config, load_config
from model.fp8 import FP8_DTYPE

from .expert_parallel import ExpertParallelMixin, apply_expert_parallel
from .groups import ExpertParallelGroups

_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(.*)$")


@dataclass
class ReadStats:
    """What a rank read from the checkpoint: tensors and their bytes (experts counted apart)."""

    tensors: int = 0
    bytes: int = 0
    expert_bytes: int = 0
    skipped_tensors: int = 0
    experts_read: set[int] = field(default_factory=set)

    def add(self, tensor: torch.Tensor, expert: int | None) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.tensors += 1
        self.bytes += nbytes
        if expert is not None:
            self.expert_bytes += nbytes
            self.experts_read.add(expert)


def load_expert_parallel(
    cls,
    path: str | Path,
    groups: ExpertParallelGroups,
    dtype: torch.dtype | str | None = None,
    config: DeepseekV3Config | None = None,
    fp8: str = "keep",
) -> tuple[nn.Module, ReadStats]:
    """Build `cls` with this rank's experts only and stream in the tensors it holds; returns (model, ReadStats)."""
    path = Path(path)
    config = config or load_config(path)
    files = list_checkpoint_files(path)
    target_dtype = resolve_dtype(dtype, config)
    fresh_mtp = check_mtp_presence(config, files, path)
    model = build_meta_model(cls, config, path, files, target_dtype, fp8)
    apply_expert_parallel(model, groups)
    model.to_empty(device="cpu")
    reset_nonpersistent_buffers(model)
    stats = load_local_state(model, path, files, skip_mtp=fresh_mtp)
    if fresh_mtp:
        init_fresh_mtp(model)  # every rank draws the same values: the caller seeds all ranks alike
    model.config.dtype = target_dtype
    model.config._name_or_path = str(path)
    model.eval()
    return model, stats


def load_local_state(
    model: nn.Module, path: Path, files: dict[str, Path] | None = None, skip_mtp: bool = False
) -> ReadStats:
    """Stream the checkpoint tensors this rank holds into the allocated, expert-sliced `model`.

    The MTP layers' copies of the embedding and head are not read (the model shares the main ones); skip_mtp: the
    checkpoint has no MTP tensors and the module is initialised fresh.
    """
    config = model.config
    files = files or list_checkpoint_files(path)
    block = _weight_block(config)
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    offsets = {
        name: (m.expert_offset, m.num_experts)
        for name, m in model.named_modules()
        if isinstance(m, ExpertParallelMixin)
    }
    expected = {n for n in model.state_dict() if not (skip_mtp and n.startswith("model.mtp."))}
    filled: dict[str, set] = {name: set() for name in expected}
    stats, problems = ReadStats(), []
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as handle, torch.no_grad():
            for key in keys:
                if mtp_shared_copy(key, config) is not None:
                    stats.skipped_tensors += 1
                    continue
                name, expert, part = hf_key_to_internal(key, config)
                if name not in targets:
                    if key.endswith("_scale_inv") and key.removesuffix("_scale_inv") in files:
                        continue  # read with its weight when the weight is dequantized
                    problems.append(f"unexpected tensor {key}")
                    continue
                target = targets[name]
                if expert is not None:
                    first, count = offsets[name.rpartition(".")[0]]
                    if not first <= expert < first + count:
                        stats.skipped_tensors += 1
                        continue  # another rank's expert: its bytes are never read
                    target = expert_slot(target, expert - first, part)
                tensor = handle.get_tensor(key)
                stats.add(tensor, expert)
                if tensor.dtype == FP8_DTYPE and target.dtype != FP8_DTYPE:
                    scale_key = key + "_scale_inv"
                    with safe_open(str(files[scale_key]), framework="pt") as scales:
                        scale = scales.get_tensor(scale_key)
                    stats.add(scale, expert)
                    want = (math.ceil(tensor.shape[0] / block[0]), math.ceil(tensor.shape[1] / block[1]))
                    if tuple(scale.shape) != want:
                        problems.append(f"{scale_key} has shape {tuple(scale.shape)}, expected {want}")
                        continue
                    tensor = dequantize_fp8_block(tensor, scale, block)
                if tuple(tensor.shape) != tuple(target.shape):
                    problems.append(f"{key} {tuple(tensor.shape)} (model expects {tuple(target.shape)})")
                    continue
                target.copy_(tensor.to(target.dtype))
                filled[name].add((expert, part))
    for name in sorted(expected):
        base = name.rpartition(".")[0]
        if base in offsets:
            first, count = offsets[base]
            parts = ("gate", "up") if ".gate_up_proj" in name else ("down",)
            need = {(e, p) for e in range(first, first + count) for p in parts}
        else:
            need = {(None, None)}
        if not need <= filled[name]:
            problems.append(f"missing tensor {name} ({len(need - filled[name])} slices)")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
        raise CheckpointError(f"{path} does not match the expert-parallel model: {shown}")
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Consolidation


def _gathered(param: torch.Tensor):
    """Context that makes a ZeRO-3 partitioned parameter whole (a no-op for plain tensors); collective."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    from contextlib import nullcontext

    return nullcontext()


def _global_expert_keys(names: Iterator[tuple[str, torch.Tensor]], offset: int):
    for key, tensor in names:
        match = _EXPERT_KEY.match(key)
        if match:
            key = f"{match.group(1)}.{int(match.group(2)) + offset}.{match.group(3)}"
        yield key, tensor


def save_consolidated(
    model: nn.Module,
    save_directory: str | Path,
    groups: ExpertParallelGroups,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write one HF-format checkpoint with every expert from an expert-parallel (optionally ZeRO-3) model.

    Collective: every rank calls it. Each tensor is gathered only while it is copied out; a rank buffers at most
    one shard before writing it. Rank 0 writes the non-expert tensors; for each EP rank, its member of EDP rank 0
    writes that rank's experts. `save_directory` must be on a filesystem every node sees.
    """
    out = Path(save_directory)
    rank = groups.rank
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
            stale.unlink(missing_ok=True)
    dist.barrier()
    limit = _parse_size(max_shard_size)
    experts = {name: m.expert_offset for name, m in model.named_modules() if isinstance(m, ExpertParallelMixin)}
    config = model.config
    written: list[tuple[str, list[str], int]] = []  # (file, keys, bytes)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    kinds: list[torch.Tensor] = []  # rank 0: meta tensors of what it wrote, for config.json's dtype and format

    def flush() -> None:
        nonlocal shard, size
        if shard:
            file = f"model-rank{rank:05d}-{len(written):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            written.append((file, list(shard), size))
        shard, size = {}, 0

    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n in model.state_dict())
    for name, tensor in tensors.items():
        owner = name.rpartition(".")[0]
        is_expert = owner in experts
        writes = (groups.edp_rank == 0) if is_expert else rank == 0
        with _gathered(tensor):
            if not writes:
                continue
            full = tensor.detach().to("cpu").clone()
        for key, piece in _global_expert_keys(internal_to_hf(name, full, config), experts.get(owner, 0)):
            nbytes = piece.numel() * piece.element_size()
            if shard and size + nbytes > limit:
                flush()
            shard[key] = piece.contiguous()
            size += nbytes
            if rank == 0:
                kinds.append(torch.empty(piece.shape, dtype=piece.dtype, device="meta"))
    flush()
    everyone: list = [None] * groups.world_size
    dist.all_gather_object(everyone, written)
    if rank == 0:
        files = [entry for entries in everyone for entry in entries]
        weight_map, total = {}, 0
        for i, (file, keys, nbytes) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(out / file, out / final)
            weight_map.update(dict.fromkeys(keys, final))
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        save_checkpoint_config(config, out, kinds)
    dist.barrier()
