"""The README's quickstart, run as written in a fresh copy of the repository, and every tiny recipe as it is.

A fresh copy is the repository's files as git lists them (tracked and new, not ignored: no outputs/, no data made
by an earlier run), with the venv's bin/ on PATH as `source .venv/bin/activate` puts it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- quickstart[^>]*-->\s*```bash\n(.*?)```\s*<!-- /quickstart -->", re.S)


def fresh_copy(dest: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def env() -> dict[str, str]:
    values = dict(os.environ)
    values["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{values.get('PATH', '')}"
    values["PYTHONWARNINGS"] = "ignore"
    return values


def run(command: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def quickstart_commands() -> list[str]:
    match = BLOCK.search((ROOT / "README.md").read_text())
    assert match, "README.md has no quickstart block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    repo = fresh_copy(tmp_path_factory.mktemp("clone"))
    assert not (repo / "outputs").exists()
    return repo, [(command, run(command, repo)) for command in quickstart_commands()]


def test_the_readme_quickstart_is_five_commands_or_fewer():
    commands = quickstart_commands()
    assert 1 <= len(commands) <= 5
    assert all(c.startswith("dsv3-finetune ") for c in commands)


def test_quickstart_sft_writes_the_model_its_report_and_plots(quickstart):
    repo, _ = quickstart
    out = repo / "outputs/quickstart/sft"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    log = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses  # it learned something from the example chats
    assert "mtp_loss" in log[0] and "moe/max_over_mean_load/layer_1" in log[0]
    for name in ("loss", "learning_rate", "aux_losses", "expert_load"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000, name
    report = (out / "report.md").read_text()
    assert f"-> {losses[-1]:.4g} at step 60" in report and "![expert_load.png](plots/expert_load.png)" in report


def test_quickstart_dpo_writes_an_adapter_with_a_real_card_and_preference_plot(quickstart):
    repo, _ = quickstart
    out = repo / "outputs/quickstart/dpo"
    assert (out / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card and "outputs/quickstart/sft" in card
    assert (out / "plots/preference.png").is_file()


def test_quickstart_export_is_a_checkpoint_transformers_loads(quickstart):
    repo, _ = quickstart
    out = repo / "outputs/quickstart/chat"
    assert not (out / "losses.jsonl").exists() and not (out / "report.md").exists()  # the base run's, not the export's
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__module__.startswith("transformers.models.deepseek_v3")


def test_quickstart_chat_and_evaluate_answer(quickstart):
    _, results = quickstart
    by_stage = {command.split()[1]: proc for command, proc in results}
    assert "model> " in by_stage["chat"].stdout
    result = json.loads(by_stage["evaluate"].stdout)  # valid JSON, nothing else on stdout
    assert math.isfinite(result["heldout"]["loss"]) and result["heldout"]["tokens"] > 100
    assert result["heldout"]["perplexity"] == pytest.approx(math.exp(result["heldout"]["loss"]))
    assert [len(g["response"]) > 0 for g in result["generations"]] == [True, True]


TINY = sorted((ROOT / "recipes/tiny").rglob("*.yaml"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return fresh_copy(tmp_path_factory.mktemp("recipes"))


@pytest.mark.parametrize("recipe", TINY, ids=lambda p: str(p.relative_to(ROOT / "recipes/tiny")))
def test_every_tiny_recipe_runs_from_a_fresh_clone(recipe, clone):
    stage = recipe.parent.name
    relative = recipe.relative_to(ROOT)
    out = f"outputs/check/{relative.with_suffix('')}"
    run(f"dsv3-finetune {stage} --config {relative} max_steps=2 save_steps=2 logging_steps=1 output_dir={out}", clone)
    assert (clone / out / "report.md").is_file()
    assert (clone / out / "config.json").is_file() or (clone / out / "adapter_config.json").is_file()
