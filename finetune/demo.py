"""The demo: a Chat variant from a Base on a laptop-sized CPU (make demo).

    python -m finetune.demo --out outputs/demo [--seeds 0 1 2] [--scale 0.25] [--threads N] [--bf16]

1. data: arithmetic chats, held-out questions in four templates, preference pairs, and the Base's plain-text corpus:
   records of 1-4 facts "a + b = c", loss on each answer (data_tools.synthetic);
2. Base: a tiny DeepSeek-V3 (real 129K vocabulary), random init, `cpt` on the corpus only (never the chat format);
3. SFT: LoRA on attention, with plain-text replay of the corpus (recipes/demo/sft.yaml), merged (finetune.export); its
   chats answer one template with a period ("19."), a format flaw SFT copies;
4. DPO: LoRA on the SFT model on pairs that prefer the plain answer to the same sum with the period
   (recipes/demo/dpo.yaml), exported as the Chat model;
5. evaluation of Base, SFT and Chat on held-out questions and preference pairs; report.md + PNG plots.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from data_tools import ChatTokenizer, load_tokenizer
from data_tools.synthetic import save_demo_data, save_jsonl

from . import cpt, dpo, sft
from .evaluate import chat_accuracy, load_chat_model, operands, plain_text_accuracy, preference_accuracy, read_jsonl

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "demo"
# The demo's data (data_tools.synthetic): sums a, b < 30, 500 SFT chats, 200 held-out questions in the four templates
# (half of their facts in the corpus), and 200 more corpus facts, so the corpus holds every sum but the 100 never seen.
# The Base reads the corpus as 25,000 records of 1-4 facts each (facts at every position of a sample); the SFT chats
# answer "Add a and b." with a period ("19."), the format flaw the DPO pairs target (docs/demo.md).
CHATTY_TEMPLATE = 3
DATA = dict(
    num_train=500,
    num_eval=200,
    num_preference=0,
    max_operand=30,
    num_corpus_only=200,
    corpus_records=25000,
    max_facts=4,
    eval_templates="all",
    chatty_template=CHATTY_TEMPLATE,
)


def build_eval_preferences(eval_records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Held-out preference pairs on the held-out questions: the right sum against a neighbour (off by one), the
    hardest wrong answer: a rambling or far-off answer loses to the right one already after SFT."""
    rng = random.Random(seed)
    pairs = []
    for record in eval_records:
        answer = int(record["messages"][-1]["content"])
        rejected = str(answer + 1 if answer == 0 else answer + rng.choice([-1, 1]))
        pairs.append(
            {
                "prompt": record["messages"][:1],
                "chosen": [{"role": "assistant", "content": str(answer)}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return pairs


def build_train_preferences(facts: list[dict[str, Any]], eval_records: list[dict[str, Any]], seed: int) -> list:
    """DPO pairs on the corpus facts that are not held-out questions: the plain answer against the same right sum in
    the form the SFT data taught for one template (with a period). Half the prompts use that template, the rest the
    others (where SFT already answers plainly), so the pairs teach the form, not the template."""
    from data_tools.synthetic import CHATTY, QUESTION_TEMPLATES

    rng = random.Random(seed + 7)
    held_out = {operands(r["messages"][0]["content"]) for r in eval_records}
    others = [t for k, t in enumerate(QUESTION_TEMPLATES) if k != CHATTY_TEMPLATE]
    pairs = []
    for fact in facts:
        a, b = operands(fact["prompt"])
        if (a, b) in held_out:
            continue
        template = QUESTION_TEMPLATES[CHATTY_TEMPLATE] if rng.random() < 0.5 else rng.choice(others)
        pairs.append(
            {
                "prompt": [{"role": "user", "content": template.format(a=a, b=b)}],
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": CHATTY.format(c=a + b)}],
            }
        )
    return pairs


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def scaled(recipe: str, scale: float) -> dict[str, int]:
    """max_steps of a demo recipe times scale (at least 2), and a logging interval that still logs about ten times."""
    import yaml

    values = yaml.safe_load((RECIPES / recipe).read_text())
    steps = max(2, round(values["max_steps"] * scale))
    return {"max_steps": steps, "logging_steps": max(1, min(int(values.get("logging_steps", 1)), steps // 10))}


def run_seed(out: Path, seed: int, scale: float, report_to: str, bf16: bool = False) -> dict[str, Any]:
    """Every stage for one seed; returns the evaluation table and the stage times."""
    from .export import export_merged

    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.time()
    paths = save_demo_data(out / "data", **DATA, seed=seed)
    eval_records = read_jsonl(paths["eval"])
    save_jsonl(build_eval_preferences(eval_records, seed), out / "data" / "preference_eval.jsonl")
    dpo_pairs = out / "data" / "preference_near_miss.jsonl"
    save_jsonl(build_train_preferences(read_jsonl(paths["facts"]), eval_records, seed), dpo_pairs)
    tokenizer = load_tokenizer()
    times["data"] = time.time() - start
    common = {"seed": seed, "report_to": report_to, "overwrite_output_dir": True, "bf16": bf16}

    start = time.time()
    cpt.main(
        ["--config", str(RECIPES / "cpt.yaml")]
        + overrides(
            {
                **common,
                "output_dir": str(out / "base"),
                **scaled("cpt.yaml", scale),
                "data.sources": [str(paths["corpus_segments"])],
            }
        )
    )
    times["cpt (Base)"] = time.time() - start

    start = time.time()
    sft.main(
        ["--config", str(RECIPES / "sft.yaml")]
        + overrides(
            {
                **common,
                "model_name_or_path": str(out / "base"),
                "output_dir": str(out / "sft"),
                **scaled("sft.yaml", scale),
                "data.sources": [str(paths["sft"])],
                "data.replay_sources": [str(paths["corpus_segments"])],
            }
        )
    )
    export_merged(out / "base", out / "sft", out / "sft-merged", "bf16", overwrite=True, progress=False)
    times["sft (LoRA) + merge"] = time.time() - start

    start = time.time()
    dpo.main(
        ["--config", str(RECIPES / "dpo.yaml")]
        + overrides(
            {
                **common,
                "model_name_or_path": str(out / "sft-merged"),
                "output_dir": str(out / "dpo"),
                **scaled("dpo.yaml", scale),
                "data.sources": [str(dpo_pairs)],
            }
        )
    )
    export_merged(out / "sft-merged", out / "dpo", out / "chat", "bf16", overwrite=True, progress=False)
    times["dpo (LoRA) + export"] = time.time() - start

    start = time.time()
    chat = ChatTokenizer(tokenizer)
    preferences = read_jsonl(out / "data" / "preference_eval.jsonl")
    table = {}
    for name, folder in (("Base", "base"), ("SFT", "sft-merged"), ("Chat", "chat")):
        model = load_chat_model(out / folder)
        row = chat_accuracy(model, chat, eval_records)
        row.update(plain_text_accuracy(model, chat, eval_records))
        row["preference_accuracy"] = preference_accuracy(model, chat, preferences)
        table[name] = row
    times["evaluation"] = time.time() - start
    result = {"seed": seed, "table": table, "times": times}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def read_log(folder: Path) -> list[dict[str, Any]]:
    path = folder / "losses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot(out: Path, seed_dirs: list[Path]) -> list[str]:
    """loss_curves.png (cpt, sft, dpo) and expert_load.png (max/mean load, dead experts) of every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, stage in zip(axes, ("base", "sft", "dpo")):
        for folder in seed_dirs:
            log = [r for r in read_log(folder / stage) if "loss" in r]
            ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=folder.name)
        ax.set_title({"base": "cpt (Base)", "sft": "SFT LoRA", "dpo": "DPO LoRA"}[stage])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=90)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for folder in seed_dirs:
        for stage in ("base", "sft", "dpo"):
            log = [r for r in read_log(folder / stage) if "moe/max_over_mean_load" in r]
            axes[0].plot(
                [r["step"] for r in log], [r["moe/max_over_mean_load"] for r in log], label=f"{folder.name} {stage}"
            )
            axes[1].plot([r["step"] for r in log], [r["moe/dead_expert_fraction"] for r in log])
    axes[0].set_title("max / mean expert load (worst MoE layer)")
    axes[1].set_title("fraction of experts without tokens")
    for ax in axes:
        ax.set_xlabel("step (of each stage)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=90)
    plt.close("all")
    return ["loss_curves.png", "expert_load.png"]


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per model and seed."""
    lines = [
        "| seed | model | held-out chat accuracy | facts in the corpus | facts never seen | preference accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for name, row in result["table"].items():
            lines.append(
                f"| {result['seed']} | {name} | {row['accuracy']:.1%} | {row['accuracy_seen']:.1%} | "
                f"{row['accuracy_unseen']:.1%} | {row['preference_accuracy']:.1%} |"
            )
    return "\n".join(lines)


def format_times(results: list[dict[str, Any]]) -> str:
    stages = list(results[0]["times"])
    lines = ["| seed | " + " | ".join(stages) + " | total |", "| --- |" + " --- |" * (len(stages) + 1)]
    for result in results:
        times = result["times"]
        cells = " | ".join(f"{times[s]:.0f} s" for s in stages)
        lines.append(f"| {result['seed']} | {cells} | {sum(times.values()):.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full run per seed")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's max_steps (quick checks)")
    parser.add_argument("--report-to", default="tensorboard", help="logger of the stages (none to disable)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every stage (fp32 master weights)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the cores)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = [run_seed(out / f"seed{seed}", seed, args.scale, args.report_to, args.bf16) for seed in args.seeds]
    plots = plot(out, [out / f"seed{seed}" for seed in args.seeds])
    table, times = format_table(results), format_times(results)
    report = [
        "# Demo: Base -> SFT (LoRA) -> DPO (LoRA) -> Chat, on the CPU",
        "",
        "Held-out questions are sums whose chat form was never trained, asked in four templates; 'facts in the "
        "corpus' were stated in the Base's plain-text corpus, 'facts never seen' appear nowhere in training. Chat "
        "accuracy is an exact match of the answer; 'right sum, any form' counts answers that start with the right "
        "sum, 'right sum, other form' those of them that are not the plain answer (the SFT data's period, which DPO "
        "removes). Plain text: the same sums as 'a + b = ' without the chat template. Preference accuracy: the "
        "model gives the right answer a higher log-probability than the answer off by one, on held-out questions.",
        "",
        table,
        "",
        "Stage times:",
        "",
        times,
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    (out / "report.md").write_text("\n".join(report))
    print(table)
    print()
    print(times)
    print(f"\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
