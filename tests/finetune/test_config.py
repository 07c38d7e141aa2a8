import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_tools import load_tokenizer
from finetune.cli import available_stages
from finetune.config import (
    CPOStageConfig,
    CPTStageConfig,
    DPOStageConfig,
    ESFTStageConfig,
    KTOStageConfig,
    ORPOStageConfig,
    RecipeError,
    SFTStageConfig,
    build_stage_config,
    load_stage_config,
    parse_overrides,
)
from finetune.stage import trainable_token_ids

ROOT = Path(__file__).resolve().parents[2]
STAGE_CLASSES = {
    "sft": SFTStageConfig,
    "dpo": DPOStageConfig,
    "cpt": CPTStageConfig,
    "kto": KTOStageConfig,
    "cpo": CPOStageConfig,
    "orpo": ORPOStageConfig,
    "esft": ESFTStageConfig,
}


def recipe_stage(path: Path) -> str | None:
    """recipes/<model>/<stage>/<variant>.yaml, or recipes/demo/<stage>.yaml."""
    if path.parent.name in STAGE_CLASSES:
        return path.parent.name
    return path.stem if path.parent.name == "demo" and path.stem in STAGE_CLASSES else None


def all_recipes() -> list[Path]:
    return sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if recipe_stage(p))


def test_recipes_exist():
    stages = {recipe_stage(p) for p in all_recipes()}
    assert stages == set(STAGE_CLASSES)
    assert any("deepseek-v3-671b" in str(p) for p in all_recipes())


@pytest.mark.parametrize("path", all_recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads(path):
    first = path.read_text().splitlines()[0]
    command = "finetune." in first or "dsv3-finetune " in first
    assert first.startswith("# ") and command, "the first line is the command that runs the recipe"
    config = load_stage_config(STAGE_CLASSES[recipe_stage(path)], path)
    assert config.data.get("sources"), "every recipe names its data"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_unknown_key_suggests():
    with pytest.raises(RecipeError, match="did you mean 'learning_rate'"):
        build_stage_config(SFTStageConfig, {"learning_rat": 1e-4})


def test_bad_values():
    with pytest.raises(RecipeError, match="lora_preset"):
        build_stage_config(SFTStageConfig, {"lora_preset": "experts"})
    with pytest.raises(RecipeError, match="torch_dtype"):
        build_stage_config(SFTStageConfig, {"torch_dtype": "fp16"})
    with pytest.raises(RecipeError, match="no such recipe"):
        load_stage_config(SFTStageConfig, "nope.yaml")
    with pytest.raises(RecipeError, match="lora_trainable_tokens needs use_lora"):
        build_stage_config(SFTStageConfig, {"lora_trainable_tokens": ["<｜User｜>"]})


def test_trainable_tokens_resolve_to_single_token_ids():
    tokenizer = load_tokenizer()  # the packaged DeepSeek-V3 tokenizer
    tokens = ["<｜User｜>", "<｜Assistant｜>", "What", " is", "?"]
    ids = trainable_token_ids(tokenizer, tokens, 129280)
    assert [tokenizer.decode([i]) for i in ids] == tokens and ids[:2] == [128803, 128804]
    with pytest.raises(RecipeError, match=r"'What is' is 2 tokens \(\['What', 'Ġis'\]\), not one"):
        trainable_token_ids(tokenizer, ["What is"], 129280)
    with pytest.raises(RecipeError, match="3 is not a token string"):
        trainable_token_ids(tokenizer, [3], 129280)
    with pytest.raises(RecipeError, match="past the model's 1000"):
        trainable_token_ids(tokenizer, ["<｜User｜>"], 1000)


def test_overrides(tmp_path):
    assert parse_overrides(["learning_rate=3e-4", "use_lora=true", "data.max_length=128", "loss_type=[ipo]"]) == {
        "learning_rate": 3e-4,
        "use_lora": True,
        "data": {"max_length": 128},
        "loss_type": ["ipo"],
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1.0e-4\ndata: {sources: [a.jsonl], max_length: 64}\n")
    config = load_stage_config(DPOStageConfig, recipe, ["data.max_length=32", "loss_type=ipo"])
    assert config.data == {"sources": ["a.jsonl"], "max_length": 32}
    assert config.loss_type == ["ipo"] and config.learning_rate == 1e-4
    assert config.report_to == ["tensorboard"] and not config.activation_checkpointing


def test_cli_lists_stages_and_fails_in_one_line(tmp_path):
    assert {"sft", "dpo", "cpt", "chat"} <= set(available_stages())
    out = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "sft" in out.stdout and "dpo" in out.stdout and "cpt" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "finetune.sft", "--config", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in out.stderr
    assert "did you mean 'learning_rate'" in out.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EP_SIZE": "two"}, "EP_SIZE='two' must be a positive integer"),
        ({"EP_SIZE": "2"}, "EP_SIZE=2 needs several processes"),
        ({"EP_SIZE": "2", "WORLD_SIZE": "2"}, "EP_SIZE=2 needs DeepSpeed ZeRO-3"),
    ],
)
def test_bad_ep_size_is_one_sentence(monkeypatch, env, message):
    from finetune.parallel.launch import ParallelConfigError, expert_parallel_size

    for key in ("EP_SIZE", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ParallelConfigError, match=message):
        expert_parallel_size()


@pytest.mark.parametrize("stage", ["dpo", "kto", "cpo", "orpo"])
def test_preference_stages_refuse_the_mtp_loss(stage):
    import importlib

    path = {"dpo": "dpo/lora.yaml", "kto": "kto/lora.yaml", "cpo": "cpo/simpo.yaml", "orpo": "orpo/lora.yaml"}[stage]
    main = importlib.import_module(f"finetune.{stage}").main
    with pytest.raises(RecipeError, match="mtp_loss_weight: the preference stages do not train the MTP module"):
        main(["--config", str(ROOT / "recipes/tiny" / path), "mtp_loss_weight=0.3"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": "fast"}, "learning_rate='fast' must be a number"),
        ({"per_device_train_batch_size": "eight"}, "per_device_train_batch_size='eight' must be an integer"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0 must be an integer >= 1"),
        ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size=2.5 must be an integer"),
        ({"lora_r": 0}, "lora_r=0 must be an integer >= 1"),
        ({"lora_alpha": "sixteen"}, "lora_alpha='sixteen' must be a number"),
        ({"lora_dropout": 1.5}, r"lora_dropout=1.5 must be in \[0, 1\)"),
        ({"max_steps": -5}, r"max_steps=-5 must be an integer >= 1 \(or -1"),
        ({"learning_rate": float("nan")}, "learning_rate=nan must be a finite number"),
        ({"use_lora": 3}, "use_lora=3 must be true or false"),
        ({"seed": True}, "seed=True must be an integer, not true/false"),
        ({"max_length": 16}, "'max_length' is trl's key, which the toolkit does not read .*use data.max_length"),
        ({"packing": False}, "'packing' is trl's key.*use data.pack"),
        ({"lora_rank": 8}, "unknown key 'lora_rank' for SFTStageConfig; did you mean 'lora_r'"),
        ({"data": {"max_len": 64}}, "unknown key 'data.max_len'; did you mean 'data.max_length'"),
        ({"data": {"sourcs": []}}, "unknown key 'data.sourcs'; did you mean 'data.sources'"),
        ({"output_dir": True}, "output_dir=True: YAML read a boolean; quote the text you meant"),
    ],
)
def test_values_are_typed_and_range_checked_before_anything_loads(values, message):
    with pytest.raises(RecipeError, match=message):
        build_stage_config(SFTStageConfig, values)


def test_yaml_booleans_and_numbers_the_user_meant_are_taken():
    config = build_stage_config(SFTStageConfig, {"save_strategy": False, "learning_rate": "3e-4", "max_steps": 10.0})
    assert config.save_strategy == "no" and config.learning_rate == 3e-4 and config.max_steps == 10
    assert build_stage_config(SFTStageConfig, {"resume_from_checkpoint": True}).resume_from_checkpoint == "true"
    loose = {"run_name": 123, "save_total_limit": 0, "logging_steps": 0, "logging_strategy": "no"}
    loose = build_stage_config(SFTStageConfig, loose)
    assert loose.run_name == "123" and loose.save_total_limit == 0
    dpo = build_stage_config(DPOStageConfig, {"loss_type": "ipo"})
    assert dpo.loss_type == ["ipo"]


def test_kto_needs_two_examples_a_batch():
    with pytest.raises(RecipeError, match="per_device_train_batch_size must be >= 2 for KTO"):
        build_stage_config(KTOStageConfig, {"per_device_train_batch_size": 1})


def test_yaml_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-4\nlora_r: [8\nseed: 1\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: invalid YAML at line \d+, column \d+"):
        load_stage_config(SFTStageConfig, bad)


def test_command_line_no_is_a_save_strategy(tmp_path):
    config = load_stage_config(SFTStageConfig, None, ["save_strategy=no", "data.max_length=64"])
    assert config.save_strategy == "no" and config.data == {"max_length": 64}


@pytest.mark.parametrize("cls", [DPOStageConfig, KTOStageConfig, CPOStageConfig, ORPOStageConfig])
def test_preference_truncation_follows_data_max_length(cls):
    """trl's preference collators cut to their own max_length (DPO/KTO 1024, CPO/ORPO 512 by default): the stage
    sets it from data.max_length, so a 4096-token recipe is not cut to 1024 behind the user's back."""
    assert build_stage_config(cls, {"data": {"max_length": 4096}}).max_length == 4096
    assert build_stage_config(cls, {}).max_length == 2048  # data_tools' default
