"""Expert load during training: counts per optimizer step, the aux-loss-free router bias update, load metrics."""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback


class ExpertLoadTracker:
    """Sums the tokens each expert receives in training forwards (grad enabled: not reference or eval passes)."""

    def __init__(self, model: nn.Module, gamma: float = 0.0):
        self.layers = model.moe_layers()
        self.gamma = gamma
        num_experts = self.layers[0].gate.num_experts if self.layers else 0
        self.step_counts = torch.zeros(len(self.layers), num_experts, dtype=torch.long)  # since the last update
        self.log_counts = torch.zeros_like(self.step_counts)  # since the last log
        for index, layer in enumerate(self.layers):
            layer.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def record(module: nn.Module, args, output) -> None:
            if module.training and torch.is_grad_enabled() and module.expert_counts is not None:
                counts = module.expert_counts.detach().to("cpu", torch.long)
                self.step_counts[index] += counts
                self.log_counts[index] += counts

        return record

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias_i += gamma * sign(mean load - load_i) for each MoE layer (paper 2.1.2), then reset the step counts."""
        if self.gamma > 0 and self.step_counts.sum() > 0:
            for layer, counts in zip(self.layers, self.step_counts):
                load = counts.float()
                bias = layer.gate.e_score_correction_bias
                bias += (self.gamma * torch.sign(load.mean() - load)).to(bias.device, bias.dtype)
        self.step_counts.zero_()

    def metrics(self) -> dict[str, float]:
        """Max/mean load per layer, the worst layer's, and the fraction of experts that got no token since last log."""
        counts = self.log_counts.float()
        self.log_counts = torch.zeros_like(self.log_counts)
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
