"""Expert load during training: counts per optimizer step, the aux-loss-free router bias update, load metrics.

The counts stay on the device: each MoE training forward adds its counts to an on-device [layers, experts] buffer (no
host sync, no collective); once per optimizer step the buffer is summed
over the data-parallel ranks in one all_reduce, the router biases move, and the step's global counts add to the
logging buffer, which is read on the host once per logging step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback


class ExpertLoadTracker:
    """Sums the tokens each expert receives in training forwards (grad enabled: not reference or eval passes)."""

    def __init__(self, model: nn.Module, gamma: float = 0.0):
        self.model = model
        self.layers = model.moe_layers()
        self.gamma = gamma
        num_experts = self.layers[0].gate.num_experts if self.layers else 0
        device = self.layers[0].gate.weight.device if self.layers else "cpu"
        if device.type == "meta":
            device = torch.device("cpu")
        self.step_counts = torch.zeros(len(self.layers), num_experts, dtype=torch.long, device=device)
        self.log_counts = torch.zeros_like(self.step_counts)  # global counts of the steps since the last log
        self.reductions = 0  # collectives issued (one per optimizer step with several processes)
        for index, layer in enumerate(self.layers):
            layer.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def record(module: nn.Module, args, output) -> None:
            # Grad enabled: training forwards only (not a reference model's or eval's). Under activation checkpointing
            # exactly one pass per micro-batch has grad enabled: the reentrant checkpoint's first pass runs without
            # grad and its recompute (in the backward) with it; the non-reentrant one recomputes without hooks.
            if module.training and torch.is_grad_enabled() and module.expert_counts is not None:
                counts = module.expert_counts.detach()
                if counts.device != self.step_counts.device:
                    self.step_counts = self.step_counts.to(counts.device)
                    self.log_counts = self.log_counts.to(counts.device)
                self.step_counts[index] += counts

        return record

    @torch.no_grad()
    def update_bias(self) -> None:
        """Sum the step's counts over the data-parallel ranks (one all_reduce), then bias_i += gamma * sign(mean load -
        load_i) for each MoE layer (paper 2.1.2): every rank applies the same update."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = getattr(self.layers[0], "count_group", None) if self.layers else None
            dist.all_reduce(self.step_counts, group=group)
            self.reductions += 1
        if self.gamma > 0:
            load = self.step_counts.float()
            ran = load.sum(-1, keepdim=True) > 0
            step = self.gamma * torch.sign(load.mean(-1, keepdim=True) - load) * ran
            for layer, delta in zip(self.layers, step):
                bias = layer.gate.e_score_correction_bias
                bias += delta.to(bias.device, bias.dtype)
        self.log_counts += self.step_counts
        self.step_counts.zero_()

    def metrics(self) -> dict[str, float]:
        """Max/mean load per layer, the worst layer's, and the fraction of experts that got no token since last log
        (the global batch's: counts summed over ranks)."""
        counts = self.log_counts.float().cpu()
        self.log_counts.zero_()
        ran = counts.sum(-1) > 0  # the MTP modules run only with the MTP loss
        if not ran.any():
            return {}
        ratio = counts.max(-1).values / counts.mean(-1).clamp(min=1e-9)  # [L]
        out = {f"moe/max_over_mean_load/layer_{i}": float(ratio[i]) for i in range(len(ratio)) if ran[i]}
        counts, ratio = counts[ran], ratio[ran]
        out["moe/max_over_mean_load"] = float(ratio.max())
        out["moe/dead_expert_fraction"] = float((counts == 0).float().mean())
        return out

    def callback(self) -> TrainerCallback:
        tracker = self

        class RouterBiasCallback(TrainerCallback):
            """Aux-loss-free balancing: update the router bias after every optimizer step."""

            def on_step_end(self, args, state, control, **kwargs):
                tracker.update_bias()

        return RouterBiasCallback()
