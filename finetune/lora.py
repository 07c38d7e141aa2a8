"""LoRA presets for DeepSeek-V3 that wrap exactly the intended modules.

peft 0.21 rewrites any target named gate_proj/up_proj/down_proj of a `deepseek_v3` model onto the fused routed
experts (its transformers v4 -> v5 conversion table) and silently drops the shared experts. Our model already has
v5 names, so the conversion is skipped for it (install_peft_guard), and targets are full module names.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import peft.utils.transformers_weight_conversion as peft_conversion
import torch
from peft import LoraConfig
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn

from model.modeling import DeepseekV3PreTrainedModel

ATTENTION = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_original_convert = peft_conversion.convert_peft_config_for_transformers
_guard_disabled_for: set[int] = set()


def _convert_unless_ours(peft_config, model: nn.Module, conversions=None) -> None:
    """peft's v4 -> v5 target conversion, skipped for our model (whose names need none)."""
    if isinstance(model, DeepseekV3PreTrainedModel) or id(peft_config) in _guard_disabled_for:
        return
    _original_convert(peft_config, model=model, conversions=conversions)


def install_peft_guard() -> None:
    """Make peft leave LoRA targets of our DeepSeek-V3 model alone (idempotent)."""
    peft_conversion.convert_peft_config_for_transformers = _convert_unless_ours


@contextlib.contextmanager
def exact_targets(peft_config: LoraConfig) -> Iterator[None]:
    """Within the block, peft applies `peft_config` to any model (e.g. transformers' DeepseekV3) without conversion."""
    install_peft_guard()
    _guard_disabled_for.add(id(peft_config))
    try:
        yield
    finally:
        _guard_disabled_for.discard(id(peft_config))


install_peft_guard()

_peft_trainable_tokens_forward = TrainableTokensLayer.forward_adapters


def _trainable_tokens_forward(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
    """peft's trainable tokens on a plain embedding, without its per-call copy of the whole [vocab, hidden] matrix.

    peft writes the trained rows into a copy of the embedding on every forward and back-propagates through a dense
    [vocab, hidden] gradient: 1.18-1.40x the demo's SFT step without trainable tokens, where this path is within noise
    of it (benchmarks/trainable_tokens.py). Here the frozen embedding is looked up as is and the positions
    holding a trained token take its row: the same outputs, and the same row gradients up to the order in which a
    token's positions are summed (bitwise on the test's batch; 6e-6 apart on a demo batch). Anything else (merged,
    disabled, scaled, padded or LM-head layers) takes peft's path.
    """
    base = self.base_layer
    plain = isinstance(base, nn.Embedding) and base.max_norm is None and base.padding_idx is None
    plain = plain and self._get_embed_scale() is None
    if not plain or self.disable_adapters or self.merged or not active_adapters:
        return _peft_trainable_tokens_forward(self, x, active_adapters, *args, **kwargs)
    self._check_overlapping_tokens(active_adapters)
    result = base(x)
    for name in active_adapters:
        indices = torch.as_tensor(self.token_indices[name], device=x.device)
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=x.device)
        slot[indices] = torch.arange(len(indices), device=x.device)
        where = slot[x]  # the row of the trained table, -1 for other tokens
        rows = self.trainable_tokens_delta[name].to(result.dtype)[where.clamp(min=0)]
        result = torch.where((where >= 0).unsqueeze(-1), rows, result)
    return result


TrainableTokensLayer.forward_adapters = _trainable_tokens_forward


def lora_module_names(
    model: nn.Module,
    preset: str = "both",
    dense_mlp: bool = False,
    include_mtp: bool = False,
) -> list[str]:
    """Full names of the nn.Linear modules a preset adapts (decoder layers; the MTP modules only on request)."""
    if preset not in ("attention", "shared_experts", "both"):
        raise ValueError(f"unknown LoRA preset {preset!r}; known: attention, shared_experts, both")
    patterns = []
    if preset in ("attention", "both"):
        patterns.append(rf"self_attn\.({'|'.join(ATTENTION)})")
    if preset in ("shared_experts", "both"):
        patterns.append(rf"mlp\.shared_experts\.({'|'.join(MLP)})")
    if dense_mlp:
        patterns.append(rf"mlp\.({'|'.join(MLP)})")
    scope = r"model\.(layers|mtp)\.\d+\." if include_mtp else r"model\.layers\.\d+\."
    wanted = re.compile(rf"(.*\.)?{scope}({'|'.join(patterns)})")
    names = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and wanted.fullmatch(name))
    if preset == "shared_experts" and not any(".shared_experts." in n for n in names) and not dense_mlp:
        raise ValueError(
            "lora_preset=shared_experts: this model has no shared experts (n_shared_experts=0); use lora_preset "
            "attention or both"
        )
    return names


def build_lora_config(
    model: nn.Module,
    preset: str = "both",
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    dense_mlp: bool = False,
    routed_experts: bool = False,
    include_mtp: bool = False,
    trainable_tokens: list[int] | None = None,
) -> LoraConfig:
    """A LoraConfig naming every adapted module in full; routed experts through target_parameters (opt-in).

    trainable_tokens: token ids whose rows of the input embedding train alongside the adapter (peft's
    trainable_token_indices: a [n, hidden] tensor replacing those rows), which the MTP modules share.
    """
    targets = lora_module_names(model, preset, dense_mlp, include_mtp)
    parameters = None
    if routed_experts:
        scope = re.compile(r"(.*\.)?model\.(layers|mtp)\.\d+\." if include_mtp else r"(.*\.)?model\.layers\.\d+\.")
        parameters = sorted(
            name
            for name, _ in model.named_parameters()
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) and scope.match(name)
        )
    token_rows = None
    if trainable_tokens:
        # The MTP modules use this same embedding (shared, as in the paper), so its rows train for them too.
        token_rows = {"model.embed_tokens": sorted(set(trainable_tokens))}
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        target_parameters=parameters,
        trainable_token_indices=token_rows,
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapted_module_names(model: nn.Module) -> set[str]:
    """Names (without peft's prefixes) of the modules and parameters that carry LoRA weights."""
    names = set()
    for name, _ in model.named_parameters():
        if ".lora_" not in name:
            continue
        base = name.split(".lora_")[0].removeprefix("base_model.model.")
        names.add(base)
    return names
