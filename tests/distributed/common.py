"""Shared pieces of the multi-process tests: a tiny DeepSeek-V3 checkpoint and batches split over ranks."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from model import DeepseekV3Config, DeepseekV3ForCausalLM
from model.checkpoint import list_checkpoint_files


def tiny_config(**overrides) -> DeepseekV3Config:
    """The tiny preset with MTP on: two MoE decoder layers plus the MoE MTP layer, 8 experts."""
    return DeepseekV3Config.from_preset("tiny", mtp_loss_enabled=True, **overrides)


def training_config(path: Path, **overrides) -> DeepseekV3Config:
    """The checkpoint's config with the MTP loss on, as a stage sets it from its recipe (config.json holds only the
    official keys: training settings are not saved into checkpoints)."""
    from model import load_config

    config = load_config(path)
    config.mtp_loss_enabled = True
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(tiny_config(**overrides)).float()


def write_tiny_checkpoint(path: Path, seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    """Save a random tiny model in several shards (so ranks open several files)."""
    model = build_tiny(seed, **overrides)
    model.save_pretrained(path, max_shard_size="150KB")
    return model


def batch(world_size: int, per_rank: int = 2, seq: int = 24, vocab: int = 1024, seed: int = 1) -> torch.Tensor:
    """[world_size * per_rank, seq] token ids; rank r takes rows [r * per_rank, (r + 1) * per_rank)."""
    return torch.randint(0, vocab, (world_size * per_rank, seq), generator=torch.Generator().manual_seed(seed))


def tensor_bytes(path: Path) -> dict[str, int]:
    """Checkpoint key -> stored bytes, from the safetensors headers only."""
    sizes = {}
    for key, file in list_checkpoint_files(path).items():
        with safe_open(str(file), framework="pt") as handle:
            piece = handle.get_slice(key)
            numel = 1
            for dim in piece.get_shape():
                numel *= dim
            sizes[key] = numel * torch.empty(0, dtype=getattr(torch, _DTYPES[piece.get_dtype()])).element_size()
    return sizes


_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "float8_e4m3fn", "I64": "int64"}


def write_fp8_checkpoint(path: Path, seed: int = 0, **overrides) -> None:
    """A tiny model quantized as the official FP8 checkpoint: every linear projection except the router, eh_proj
    and the heads in e4m3 with 128x128 block scales (partial edge blocks at these sizes)."""
    import json

    from safetensors.torch import save_file

    from model.checkpoint import iter_hf_state
    from model.fp8 import is_official_fp8_weight, quantize_weight

    model = build_tiny(seed, **overrides)
    tensors = {}
    for key, tensor in iter_hf_state(model):
        if is_official_fp8_weight(key):
            tensors[key], tensors[key + "_scale_inv"] = quantize_weight(tensor)
        else:
            tensors[key] = tensor.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps({**model.config.to_dict(), "quantization_config": quant}))
