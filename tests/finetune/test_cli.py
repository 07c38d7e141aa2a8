"""The console command: `dsv3-finetune <stage> --help` lists every key from a table that matches the config classes."""

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from finetune import config as config_module
from finetune.keys import STAGE_CLASSES, TABLE, build_table, stage_help

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_key_table_is_what_the_config_classes_say():
    """A changed field, or another trl / transformers, must regenerate finetune/stage_keys.json
    (python -m finetune.keys --write)."""
    shipped = json.loads(TABLE.read_text(encoding="utf-8"))
    assert shipped == json.loads(json.dumps(build_table())), "run: python -m finetune.keys --write"


@pytest.mark.parametrize("stage", sorted(STAGE_CLASSES))
def test_stage_help_lists_every_key_ours_first(stage):
    cls = getattr(config_module, STAGE_CLASSES[stage])
    text = stage_help(stage)
    keys = [f.name for f in fields(cls) if f.init and not f.name.startswith("_")]
    listed = [line.split(" (")[0].strip() for line in text.splitlines() if line.startswith("  ") and " (" in line]
    assert set(keys) <= set(listed), sorted(set(keys) - set(listed))
    # our keys come before trl's, with their help and default
    assert listed.index("model_name_or_path") < listed.index("learning_rate")
    assert "  lora_r (int; default 16)" in text and "LoRA rank." in text
    assert "  data.max_length (int; default 2048)" in text


def test_help_is_served_without_importing_trl_or_torch():
    """The help path stays light (measured 0.04 s against 10 s for importing the stage)."""
    code = (
        "import sys, runpy; sys.argv = ['dsv3-finetune', 'dpo', '--help'];"
        "from finetune.cli import main; main();"
        "heavy = [m for m in ('torch', 'trl', 'transformers') if m in sys.modules];"
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: dsv3-finetune dpo --config RECIPE.yaml" in proc.stdout
    assert "  beta (float; default 0.1)" in proc.stdout  # a trl key, with trl's default
    assert proc.stdout.strip().endswith("HEAVY []")


def test_the_console_script_is_installed_and_lists_the_stages():
    script = Path(sys.executable).with_name("dsv3-finetune")
    assert script.is_file(), "pip install -e . installs the dsv3-finetune command"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for stage in ("sft", "dpo", "export", "chat", "evaluate", "plan"):
        assert f"  {stage} " in proc.stdout


def test_an_accelerate_config_launched_elsewhere_finds_its_deepspeed_file(tmp_path, monkeypatch):
    """accelerate hands deepspeed_config_file to the ranks as it is written (relative to the toolkit); from another
    working directory the stage finds it in the toolkit's folder, and a path in neither is one sentence."""
    from finetune.parallel import ParallelConfigError
    from finetune.parallel.launch import resolve_deepspeed_config_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "recipes/deepspeed/zero3.json")
    resolve_deepspeed_config_path()
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(ROOT / "recipes/deepspeed/zero3.json")
    (tmp_path / "mine.json").write_text("{}")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "mine.json")  # the user's own, in the working directory
    resolve_deepspeed_config_path()
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "mine.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "recipes/deepspeed/nope.json")
    with pytest.raises(ParallelConfigError, match="deepspeed_config_file 'recipes/deepspeed/nope.json' is not a file"):
        resolve_deepspeed_config_path()


def test_a_preset_with_a_toy_vocabulary_says_which_preset_fits_the_packaged_tokenizer():
    from data_tools import load_tokenizer
    from finetune.config import RecipeError, SFTStageConfig, build_stage_config
    from finetune.stage import build_data

    config = build_stage_config(SFTStageConfig, {"model_name_or_path": "preset:tiny", "data": {"sources": ["x.jsonl"]}})
    with pytest.raises(RecipeError, match=r"has \d+ tokens but the model's vocab_size is 1024; .*preset:mini"):
        build_data(config, "sft", load_tokenizer(), 1024)
