"""Every training run's picture of itself: output_dir/plots/*.png and output_dir/report.md, written at each save and
at the end from the run's loss log (losses.jsonl), and a console line without the per-layer MoE metrics.

plots/loss.png           train loss (and its LM / MTP parts), eval loss when the run evaluates
plots/learning_rate.png  the schedule as it ran
plots/aux_losses.png     MTP loss and balance loss (when the run has them)
plots/preference.png     reward accuracy and margin (DPO / KTO / CPO / ORPO, as trl logs them)
plots/expert_load.png    heatmap: max / mean expert load per MoE layer (rows) over the logged steps (columns)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

LAYER_KEY = re.compile(r"^moe/max_over_mean_load/layer_(\d+)$")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log records (lines cut by a kill are skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [s for s, _ in rows], [float(v) for _, v in rows]


def write_plots(records: list[dict[str, Any]], folder: Path) -> list[str]:
    """The PNGs for the records that exist; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def panel(name: str, title: str, keys: list[tuple[str, str]], ylabel: str) -> None:
        lines = [(label, *series(records, key)) for key, label in keys]
        lines = [line for line in lines if line[1]]
        if not lines:
            return
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, steps, values in lines:
            ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        written.append(name)

    panel(
        "loss.png",
        "loss",
        [("loss", "train loss"), ("lm_loss", "LM loss"), ("mtp_loss", "MTP loss"), ("eval_loss", "eval loss")],
        "nats per token",
    )
    panel("learning_rate.png", "learning rate", [("learning_rate", "learning rate")], "learning rate")
    panel(
        "aux_losses.png", "MTP and balance loss", [("mtp_loss", "MTP loss"), ("balance_loss", "balance loss")], "loss"
    )
    panel(
        "preference.png",
        "preference",
        [("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"), ("kl", "KL")],
        "value",
    )
    layers = sorted({int(m.group(1)) for r in records for k in r if (m := LAYER_KEY.match(k))})
    logged = [r for r in records if any(f"moe/max_over_mean_load/layer_{i}" in r for i in layers)]
    if layers and logged:
        grid = [[r.get(f"moe/max_over_mean_load/layer_{i}", float("nan")) for r in logged] for i in layers]
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(layers)))
        steps = [r["step"] for r in logged]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 8))})
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("MoE block (MTP last)")
        ax.set_title("expert load: max / mean tokens per expert (1 = balanced)")
        fig.colorbar(image, ax=ax, label="max / mean")
        fig.tight_layout()
        fig.savefig(folder / "expert_load.png", dpi=90)
        plt.close(fig)
        written.append("expert_load.png")
    return written


def write_report(output_dir: str | Path, log_file: str = "losses.jsonl", stage: str = "", model: str = "") -> Path:
    """plots/ and report.md for a run folder, from its loss log."""
    out = Path(output_dir)
    records = read_log(out / log_file)
    plots = write_plots(records, out / "plots")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    final = next((r for r in reversed(records) if "train_runtime" in r), None)
    lines = [f"# Run report: {stage or 'training'} ({out.name})", ""]
    if model:
        lines.append(f"- model: `{model}`")
    if train:
        first, last = train[0], train[-1]
        lines.append(f"- steps logged: {len(train)}, last at step {last['step']}")
        lines.append(
            f"- train loss: {first['loss']:.4g} at step {first['step']} -> {last['loss']:.4g} at step {last['step']}"
        )
        for key in ("lm_loss", "mtp_loss", "balance_loss", "rewards/accuracies", "rewards/margins"):
            if isinstance(last.get(key), (int, float)):
                lines.append(f"- {key}: {last[key]:.4g} (last)")
        if "moe/max_over_mean_load" in last:
            lines.append(
                f"- expert load: max / mean {last['moe/max_over_mean_load']:.3g} in the worst MoE layer, "
                f"{last.get('moe/dead_expert_fraction', 0):.1%} of experts without tokens (last logged step)"
            )
        if "num_tokens" in last:
            lines.append(f"- tokens trained on: {int(last['num_tokens']):,}")
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        lines.append(
            f"- eval loss: {evals[-1]['eval_loss']:.4g} (last), best {best['eval_loss']:.4g} at step {best['step']}"
        )
    if final:
        lines.append(f"- train time: {final['train_runtime']:.1f} s")
    if not train:
        lines.append("- nothing logged yet")
    lines += ["", *[f"![{name}](plots/{name})" for name in plots], ""]
    lines.append(
        f"Every logged value is in `{log_file}` (per-layer expert load too); TensorBoard logs, when enabled, "
        "are under `runs/`."
    )
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class RunReportCallback(TrainerCallback):
    """Writes plots/ and report.md at every save and at the end (the main process only)."""

    def __init__(self, output_dir: str, log_file: str, stage: str = "", model: str = ""):
        self.output_dir, self.log_file, self.stage, self.model = output_dir, log_file, stage, model

    def _write(self, state) -> None:
        if state.is_world_process_zero:
            write_report(self.output_dir, self.log_file, self.stage, self.model)

    def on_save(self, args, state, control, **kwargs):
        self._write(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state)


class ConsoleProgressCallback(ProgressCallback):
    """transformers' progress bar and log line, without the per-layer MoE metrics (about 60 on the 671B model):
    the console keeps the worst layer's load and the dead-expert fraction; the per-layer values go to the loss log
    and TensorBoard."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if not LAYER_KEY.match(k)}
        super().on_log(args, state, control, logs=logs, **kwargs)


def quiet_console(trainer: Any) -> None:
    """Swap the trainer's progress callback for ConsoleProgressCallback (when it has one: not with tqdm disabled)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ConsoleProgressCallback)
