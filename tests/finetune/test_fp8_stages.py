"""Stages on an FP8 checkpoint (#16 items 2 and 7): full fine-tuning trains every weight a BF16 checkpoint would
train (it used to freeze every quantized module in silence: 28 tensors trained, 76 frozen); LoRA keeps the frozen FP8
bytes as they were; fp8_training gives the trained experts an FP8 forward."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune.stage as stage
from finetune import sft
from finetune.config import RecipeError
from model import DeepseekV3ForCausalLM
from model.checkpoint import list_checkpoint_files

from ..distributed.common import write_fp8_checkpoint


def args(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture
def fp8_values(base_values, demo_data, tmp_path) -> dict:
    checkpoint = tmp_path / "fp8-base"
    write_fp8_checkpoint(checkpoint, num_hidden_layers=2)
    values = {**base_values, "model_name_or_path": str(checkpoint), "max_steps": 3, "learning_rate": 1e-3}
    values.pop("model_overrides", None)
    values["data"] = {"task": "sft", "sources": [str(demo_data["sft"])], "max_length": 64}
    return values


def stored(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in set(list_checkpoint_files(path).values()) for k, v in load_file(f).items()}


def changed(base: DeepseekV3ForCausalLM, run: str) -> set[str]:
    trained = dict(DeepseekV3ForCausalLM.from_pretrained(run, progress=False).named_parameters())
    return {name for name, p in base.named_parameters() if not torch.equal(p, trained[name])}


def test_full_fine_tuning_on_an_fp8_checkpoint_trains_every_weight(fp8_values, tmp_path, capsys):
    sft.main(args(fp8_values))
    assert (
        "its quantized weights are dequantized to float32 and trained (fp8_base: dequantize)" in capsys.readouterr().err
    )
    base = DeepseekV3ForCausalLM.from_pretrained(fp8_values["model_name_or_path"], fp8="dequantize", progress=False)
    # The reference: the same run on the same weights stored unquantized.
    base.save_pretrained(tmp_path / "fp32-base")
    sft.main(
        args({**fp8_values, "model_name_or_path": str(tmp_path / "fp32-base"), "output_dir": str(tmp_path / "ref")})
    )
    expected = changed(base, str(tmp_path / "ref"))
    assert len(expected) > 25 and any("experts" in name for name in expected)  # not just norms, embeddings, routers
    assert changed(base, fp8_values["output_dir"]) == expected


def test_lora_on_an_fp8_checkpoint_keeps_the_fp8_bytes(fp8_values, monkeypatch, capsys):
    models = []
    train_and_save = stage.train_and_save

    def keep_model(trainer, config):
        train_and_save(trainer, config)
        models.append(trainer.model)

    monkeypatch.setattr(stage, "train_and_save", keep_model)
    sft.main(args({**fp8_values, "use_lora": True}))
    assert "its quantized weights are kept FP8 and frozen (1 byte a weight) (fp8_base: keep)" in capsys.readouterr().err
    checkpoint = stored(Path(fp8_values["model_name_or_path"]))
    fp8 = {n: p for n, p in models[0].named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert len(fp8) > 20 and not any(p.requires_grad for p in fp8.values())
    codes = {k: v for k, v in checkpoint.items() if v.dtype == torch.float8_e4m3fn}
    # Every FP8 tensor of the checkpoint is held byte for byte (linear weights by name; experts are stacked).
    held = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in fp8.items()}
    for key, value in codes.items():
        if key in held:
            assert torch.equal(held[key].view(torch.uint8), value.view(torch.uint8)), key
    assert sum(key in held for key in codes) > 10


def test_fp8_training_gives_the_trained_experts_an_fp8_forward(fp8_values, capsys):
    sft.main(args({**fp8_values, "fp8_training": "experts", "max_steps": 2}))
    err = capsys.readouterr().err
    assert "fp8: FP8 forward for 2 trained modules (fp8_training: experts)" in err  # MoE layer 1 + the MTP layer
    trained = stored(Path(fp8_values["output_dir"]))
    assert all(v.dtype == torch.float32 for v in trained.values() if v.is_floating_point())  # master weights
    with pytest.raises(RecipeError, match="fp8_training applies to fully trained weights"):
        sft.main(args({**fp8_values, "fp8_training": "all", "use_lora": True}))
