"""Expert-specialised fine-tuning (ESFT, arXiv 2407.01906; deepseek-ai/ESFT): train only the routed experts a
domain routes to; router, attention and (unless the config says so) shared experts and other modules stay frozen.

python -m finetune.esft_select --config RECIPE --top-p 0.2 --score token --out expert_cfg.json
python -m finetune.esft --config RECIPE esft_config=expert_cfg.json [key=value ...]

The expert config is ESFT's own JSON, read and written as DeepSeek's scripts do:
{"experts": {"<decoder layer index>": [expert ids]}, "shared_experts": bool, "non_expert_modules": bool}.
The MTP module's MoE counts as layer num_hidden_layers (its index in the checkpoint).

Scores (the paper's, section 3.2): for layer l and expert i over N_s sequences of L_j tokens,
  gate  g_i = 1/N_s sum_j 1/L_j sum_k g_{i,k}   (g: the token's normalised routing weight, 0 when not chosen)
  token r_i = 1/N_s sum_j 1/L_j sum_k 1[i chosen for k] / K
Both sum to 1 over a layer's experts. Per layer the smallest set of experts, by decreasing score, whose scores add up
to top_p is selected (ESFT's loop: stop once the running sum reaches top_p). DeepSeek's generate_expert_config.py
divides the summed scores by their sum over layers (axis 0) instead (ESFT issue #17); we follow the paper.

Training: the fused expert weights [E, ...] keep requires_grad, and a gradient hook zeroes the slices of unselected
experts; AdamW then leaves them bitwise unchanged (zero moments give a zero update), and weight decay is not applied
to the routed experts (it would move the frozen slices).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.moe import MoE

from .config import ESFTStageConfig, RecipeError


def moe_layers_by_index(model: nn.Module) -> dict[int, MoE]:
    """Decoder layer index -> its MoE block (the MTP modules after the decoder layers)."""
    base = model
    while not hasattr(base, "moe_layers") and hasattr(base, "base_model"):
        base = base.base_model
    layers = {}
    inner = base.model if hasattr(base, "model") else base
    for index, layer in enumerate(list(inner.layers) + list(getattr(inner, "mtp", []))):
        if isinstance(getattr(layer, "mlp", None), MoE):
            layers[index] = layer.mlp
    return layers


@torch.no_grad()
def expert_scores(model: nn.Module, batches, max_tokens: int | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """The paper's gate and token scores per MoE layer ({"gate": {layer: [E]}, "token": {layer: [E]}}) over
    `batches` (dicts with input_ids and optionally attention_mask; each row is a sequence)."""
    layers = moe_layers_by_index(model)
    gate = {i: torch.zeros(m.gate.num_experts, dtype=torch.float64) for i, m in layers.items()}
    token = {i: torch.zeros_like(v) for i, v in gate.items()}
    sequences = 0
    current: dict[str, Any] = {}
    handles = []
    for index, moe in layers.items():

        def record(module, args, output, index=index, moe=moe):
            indices, weights, _ = output
            rows, seq = current["shape"]
            mask = current["mask"]  # [B, S] bool
            num_experts, top_k = moe.gate.num_experts, indices.shape[-1]
            weights = (weights / moe.gate.scaling).double().view(rows, seq, top_k)
            chosen = torch.zeros(rows, seq, num_experts, dtype=torch.float64)
            chosen.scatter_add_(-1, indices.view(rows, seq, top_k), weights)
            picked = torch.zeros(rows, seq, num_experts, dtype=torch.float64)
            picked.scatter_add_(-1, indices.view(rows, seq, top_k), torch.ones_like(weights))
            keep = mask.double().unsqueeze(-1)
            lengths = mask.sum(-1).clamp(min=1).double().unsqueeze(-1)  # [B, 1]
            gate[index] += ((chosen * keep).sum(1) / lengths).sum(0)
            token[index] += ((picked * keep).sum(1) / lengths / top_k).sum(0)

        handles.append(moe.gate.register_forward_hook(record))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            current["mask"] = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            current["shape"] = tuple(ids.shape)
            kwargs = {"attention_mask": mask} if mask is not None else {}
            if "position_ids" in batch:
                kwargs["position_ids"] = batch["position_ids"]
            model(input_ids=ids, use_cache=False, return_logits=False, **kwargs)
            sequences += ids.shape[0]
            seen += int(current["mask"].sum())
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sequences:
        raise RecipeError("no data to score the experts on")
    ran = [i for i in token if float(token[i].sum()) > 0]  # the MTP modules run only with the MTP loss
    return {
        "gate": {i: gate[i] / sequences for i in ran},
        "token": {i: token[i] / sequences for i in ran},
    }


def select_experts(scores: dict[int, torch.Tensor], top_p: float) -> dict[int, list[int]]:
    """Per layer, experts by decreasing score until their scores add up to top_p (ESFT's selection loop)."""
    if not 0 < top_p <= 1:
        raise RecipeError(f"top_p must be in (0, 1], got {top_p}")
    selected = {}
    for layer, values in scores.items():
        values = values / values.sum().clamp(min=1e-12)  # 1 already with normalised top-k weights
        total, chosen = 0.0, []
        for expert in torch.argsort(values, descending=True, stable=True).tolist():
            if total >= top_p:
                break
            chosen.append(expert)
            total += float(values[expert])
        selected[layer] = chosen
    return selected


def write_expert_config(
    path: str | Path, experts: dict[int, list[int]], shared_experts: bool = False, non_expert_modules: bool = False
) -> dict:
    """ESFT's expert config JSON (layer keys as strings, as DeepSeek's scripts write them)."""
    config = {
        "experts": {str(layer): [int(e) for e in ids] for layer, ids in sorted(experts.items())},
        "shared_experts": bool(shared_experts),
        "non_expert_modules": bool(non_expert_modules),
    }
    Path(path).write_text(json.dumps(config) + "\n")
    return config


def read_expert_config(path: str | Path, model: nn.Module | None = None) -> dict:
    """An ESFT expert config, checked (against `model`'s MoE layers and expert count when given)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"esft_config: no such file {path}") from None
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(config, dict) or not isinstance(config.get("experts"), dict):
        raise RecipeError(f"{path}: an ESFT expert config has an 'experts' mapping of layer -> expert ids")
    unknown = sorted(set(config) - {"experts", "shared_experts", "non_expert_modules"})
    if unknown:
        raise RecipeError(f"{path}: unknown keys {unknown}")
    experts = {}
    for layer, ids in config["experts"].items():
        if not (str(layer).isdigit() and isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
            raise RecipeError(f"{path}: experts[{layer!r}] must be a list of expert ids under a layer index")
        experts[int(layer)] = sorted(set(ids))
    if model is not None:
        layers = moe_layers_by_index(model)
        for layer, ids in experts.items():
            if layer not in layers:
                raise RecipeError(f"{path}: layer {layer} has no MoE block (MoE layers: {sorted(layers)})")
            bad = [i for i in ids if not 0 <= i < layers[layer].gate.num_experts]
            if bad:
                raise RecipeError(f"{path}: layer {layer} has no experts {bad} ({layers[layer].gate.num_experts})")
    return {
        "experts": experts,
        "shared_experts": bool(config.get("shared_experts", False)),
        "non_expert_modules": bool(config.get("non_expert_modules", False)),
    }


def apply_esft(model: nn.Module, config: dict) -> int:
    """Freeze all but the config's experts (and shared experts / other modules when it says so); returns the number
    of trained elements. Unselected expert slices get zero gradients through a hook on the fused weights."""
    layers = moe_layers_by_index(model)
    for param in model.parameters():
        param.requires_grad_(config["non_expert_modules"])
    trained = sum(p.numel() for p in model.parameters()) if config["non_expert_modules"] else 0
    for index, moe in layers.items():
        moe.gate.weight.requires_grad_(False)  # the router stays frozen
        if config["non_expert_modules"]:
            trained -= moe.gate.weight.numel()
        if moe.shared_experts is not None:
            for param in moe.shared_experts.parameters():
                param.requires_grad_(config["shared_experts"])
        experts = moe.experts
        chosen = config["experts"].get(index, [])
        fused = [experts.gate_up_proj, experts.down_proj]
        if config["non_expert_modules"]:
            trained -= sum(p.numel() for p in fused)
        if not chosen:
            for param in fused:
                param.requires_grad_(False)
            continue
        # Expert parallelism: this rank holds experts [expert_offset, expert_offset + num_experts) of the layer.
        offset = getattr(experts, "expert_offset", 0)
        local = [e - offset for e in chosen if offset <= e < offset + experts.num_experts]
        keep = torch.zeros(experts.num_experts, dtype=torch.bool)
        keep[local] = True
        for param in fused:
            param.requires_grad_(True)
            mask = keep.to(param.device).view(-1, *([1] * (param.dim() - 1)))
            param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))
            trained += param[0].numel() * len(local)
    if config["shared_experts"] and not config["non_expert_modules"]:
        trained += sum(
            p.numel() for m in layers.values() if m.shared_experts is not None for p in m.shared_experts.parameters()
        )
    model.esft_trained_elements = trained
    return trained


def prepare(model: nn.Module, config: ESFTStageConfig) -> None:
    """The ESFT stage's model step: read the expert config and freeze accordingly (one line says what trains)."""
    import sys

    from .stage import is_main_process

    if config.use_lora:
        raise RecipeError("ESFT trains experts, not LoRA adapters: set use_lora: false")
    if not config.esft_config:
        raise RecipeError("esft_config: name the expert config (python -m finetune.esft_select writes one)")
    expert_config = read_expert_config(config.esft_config, model)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise RecipeError(
            "ESFT under ZeRO-3 runs with expert parallelism (EP_SIZE=N with recipes/accelerate/zero3_ep*.yaml), where "
            "each rank holds whole experts; plain ZeRO-3 partitions the fused expert weights across ranks"
        )
    trained = apply_esft(model, expert_config)
    if is_main_process():  # beside the run's checkpoint, as ESFT's adapters keep it (finetune.esft_export reads it)
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        write_expert_config(
            Path(config.output_dir) / "expert_cfg.json",
            expert_config["experts"],
            expert_config["shared_experts"],
            expert_config["non_expert_modules"],
        )
    total = sum(p.numel() for p in model.parameters())
    chosen = sum(len(v) for v in expert_config["experts"].values())
    if is_main_process():
        print(
            f"esft: training {chosen} routed experts in {len(expert_config['experts'])} layers"
            f"{', the shared experts' if expert_config['shared_experts'] else ''}"
            f"{', the non-expert modules' if expert_config['non_expert_modules'] else ''}: "
            f"{trained:,} of {total:,} parameters ({trained / total:.2%})",
            file=sys.stderr,
        )


def trainer_class():
    """DeepseekSFTTrainer without weight decay on the routed experts (it would move the frozen slices)."""
    from .trainers import DeepseekSFTTrainer

    class ESFTTrainer(DeepseekSFTTrainer):
        def get_decay_parameter_names(self, model) -> list[str]:
            names = super().get_decay_parameter_names(model)
            return [n for n in names if ".mlp.experts." not in n]

    return ESFTTrainer


def main(argv: list[str] | None = None) -> None:
    from .stage import train_lm_stage

    train_lm_stage(ESFTStageConfig, "sft", argv, __doc__, prepare_model=prepare, trainer_cls=trainer_class())


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
