"""Short real runs of each stage on the tiny preset (small tokenizer), in-process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from finetune import cpt, dpo, sft
from finetune.config import RecipeError
from finetune.export import export_merged
from finetune.trainers import TrainingDiverged
from model import DeepseekV3ForCausalLM

ROOT = Path(__file__).resolve().parents[2]


def args(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def losses(folder: Path, key: str = "loss") -> dict[int, float]:
    """The last logged value of `key` per step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for line in (folder / "losses.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


def test_cpt_full_loss_falls(base_values, demo_data, tmp_path):
    values = {**base_values, "data": {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}}
    cpt.main(args({**values, "max_steps": 12, "learning_rate": 3e-3, "router_bias_gamma": 0.01}))
    run = Path(values["output_dir"])
    curve = losses(run)
    assert curve[12] < curve[1] - 0.5
    model = DeepseekV3ForCausalLM.from_pretrained(run, progress=False)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0, "full training updates the router bias"
    assert "moe/max_over_mean_load" in json.loads((run / "losses.jsonl").read_text().splitlines()[0])


def test_sft_lora_loss_falls_and_adapter_is_exact(base_values, demo_data):
    values = {**base_values, "use_lora": True, "lora_r": 8, "learning_rate": 3e-3}
    values["data"] = {"sources": [str(demo_data["sft"])], "max_length": 128}
    sft.main(args({**values, "max_steps": 10}))
    run = Path(values["output_dir"])
    curve = losses(run)
    assert curve[10] < curve[1]
    keys = load_file(run / "adapter_model.safetensors").keys()
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}
    assert all(("self_attn." in m or "mlp.shared_experts." in m) and m.startswith("model.layers.") for m in modules)
    assert any("shared_experts" in m for m in modules) and any("kv_b_proj" in m for m in modules)
    assert not any(k.split(".lora_")[0].endswith("experts") for k in keys)


def test_sft_lora_trainable_tokens_train_and_merge_their_rows(base_values, demo_data, tmp_path):
    """lora_trainable_tokens: the adapter holds the LoRA factors and the trained rows, and the merged export differs
    from the Base's embedding in exactly those rows."""
    base = tmp_path / "base"
    cpt_data = {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}
    cpt.main(args({**base_values, "output_dir": str(base), "max_steps": 1, "data": cpt_data}))
    tokens = ["<｜User｜>", "<｜Assistant｜>", "What"]
    values = {**base_values, "model_name_or_path": str(base), "use_lora": True, "lora_preset": "attention"}
    values |= {"lora_r": 8, "learning_rate": 3e-3, "lora_trainable_tokens": tokens}
    values["data"] = {"sources": [str(demo_data["sft"])], "max_length": 128}
    sft.main(args({**values, "max_steps": 4}))
    run = Path(values["output_dir"])
    adapter = load_file(run / "adapter_model.safetensors")
    rows = adapter.pop("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta")
    assert rows.shape == (3, 64) and all(".self_attn." in k and ".lora_" in k for k in adapter)
    tokenizer = AutoTokenizer.from_pretrained(base_values["tokenizer"])
    ids = sorted(tokenizer.convert_tokens_to_ids(tokens))

    export_merged(base, run, tmp_path / "merged", "bf16", progress=False)
    key = "model.embed_tokens.weight"
    before, after = (
        next(t[key] for t in map(load_file, sorted(folder.glob("*.safetensors"))) if key in t)
        for folder in (base, tmp_path / "merged")
    )
    assert (after != before).any(dim=1).nonzero().flatten().tolist() == ids
    torch.testing.assert_close(after[ids], rows, rtol=0, atol=0)


def test_dpo_lora_runs_with_adapter_disabled_reference(base_values, demo_data, tmp_path):
    base = tmp_path / "base"
    cpt.main(
        args(
            {
                **base_values,
                "output_dir": str(base),
                "max_steps": 2,
                "data": {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32},
            }
        )
    )
    values = {**base_values, "model_name_or_path": str(base), "use_lora": True, "lora_r": 8, "learning_rate": 5e-3}
    values["data"] = {"sources": [str(demo_data["preference"])], "max_length": 64}
    dpo.main(args({**values, "max_steps": 8, "beta": 0.5}))
    run = Path(values["output_dir"])
    curve = losses(run)
    assert curve[1] == pytest.approx(0.6931, abs=1e-3), "first step: policy == reference"
    assert curve[8] < curve[1]
    assert losses(run, "rewards/margins")[8] > 0


def test_nan_loss_stops_and_keeps_checkpoint(base_values, demo_data, monkeypatch):
    import model.modeling as modeling

    calls = {"n": 0}
    original = modeling.head_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = original(*a, **k)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(modeling, "head_loss", poisoned)
    values = {**base_values, "save_strategy": "steps", "save_steps": 2, "max_steps": 6}
    values["data"] = {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}
    with pytest.raises(TrainingDiverged, match="step 4"):
        cpt.main(args(values))
    run = Path(values["output_dir"])
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    model = DeepseekV3ForCausalLM.from_pretrained(run / "checkpoint-2", progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_sets_aside_the_checkpoint_it_came_from(base_values, demo_data):
    """lr 1e30: step 1's update is finite but ruins the weights, checkpoint-1 is saved, step 2 diverges. That
    checkpoint is not called intact: it is set aside, nothing is named good, and `last` finds nothing to resume."""
    values = {**base_values, "save_strategy": "steps", "save_steps": 1, "max_steps": 4, "learning_rate": 1e30}
    values["data"] = {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}
    with pytest.raises(TrainingDiverged) as err:
        cpt.main(args(values))
    message = str(err.value)
    assert "at step 2; stopped before the optimizer step" in message
    assert "checkpoint-1 was saved just before that step, so it is set aside as unverified-checkpoint-1" in message
    assert "No earlier checkpoint is known good" in message
    run = Path(values["output_dir"])
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["unverified-checkpoint-1"]
    with pytest.raises(RecipeError, match="no checkpoint"):
        cpt.main(args({**values, "learning_rate": 1e-3, "resume_from_checkpoint": "last"}))


def test_kill_and_resume_reaches_the_same_losses(base_values, demo_data, tmp_path):
    common = {
        **base_values,
        "save_strategy": "steps",
        "save_steps": 3,
        "max_steps": 8,
        "learning_rate": 3e-3,
        "save_total_limit": 2,
        "data": {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32},
    }
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cpt.main(args({**common, "output_dir": str(straight)}))
    # The child kills itself (SIGKILL) in the middle of step 5: checkpoint-3 is on disk, checkpoint-6 never is. A
    # kill timed from outside raced a fast host past step 6.
    command = [
        sys.executable,
        "-m",
        "tests.distributed.kill_at_step",
        "cpt",
        *args({**common, "output_dir": str(killed)}),
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "KILL_AT_STEP": "5"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert max(losses(killed)) == 4
    assert (killed / "checkpoint-3").is_dir() and not (killed / "checkpoint-6").exists()
    assert not list(killed.glob("checkpoint-*/*.tmp"))
    cpt.main(args({**common, "output_dir": str(killed), "resume_from_checkpoint": "last"}))
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    # The token count carries across the resume (restored from trainer_state.json, not restarted at 0).
    assert losses(killed, "num_tokens") == losses(straight, "num_tokens")
    for step in range(4, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten(base_values, demo_data):
    values = {**base_values, "save_strategy": "steps", "save_steps": 2, "max_steps": 2}
    values["data"] = {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}
    cpt.main(args(values))
    run = Path(values["output_dir"])
    with pytest.raises(RecipeError, match="already holds a run .*resume_from_checkpoint=last or start over with"):
        cpt.main(args(values))
    (run / "stray.txt").write_text("the user's own file")
    cpt.main(args({**values, "overwrite_output_dir": True, "max_steps": 1, "save_steps": 1}))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]  # the old run's are gone
    assert max(json.loads(line)["step"] for line in (run / "losses.jsonl").read_text().splitlines()) == 1
    assert (run / "stray.txt").is_file()  # only the run's own files are removed


def test_resume_last_skips_checkpoints_that_do_not_verify_and_trims_the_log(base_values, demo_data, capsys):
    values = {**base_values, "save_strategy": "steps", "save_steps": 2, "max_steps": 6, "save_total_limit": None}
    values["data"] = {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}
    cpt.main(args(values))
    run = Path(values["output_dir"])
    # The newest is truncated, the one before has a malformed state: `last` must take checkpoint-2.
    optimizer = run / "checkpoint-6" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    (run / "checkpoint-4" / "trainer_state.json").write_text("{not json")
    with pytest.raises(RecipeError, match="cannot resume from it: trainer_state.json is not valid JSON"):
        cpt.main(args({**values, "resume_from_checkpoint": str(run / "checkpoint-4")}))
    capsys.readouterr()
    cpt.main(args({**values, "max_steps": 6, "resume_from_checkpoint": "last"}))
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-6: optimizer.pt is truncated" in err
    assert "checkpoint-4: trainer_state.json is not valid JSON" in err
    assert f"resuming from {run / 'checkpoint-2'}" in err
    records = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == list(range(1, 7))  # steps 3-6 once, not twice


def test_a_full_disk_during_a_checkpoint_is_one_sentence(base_values, demo_data, monkeypatch):
    import errno

    import transformers.trainer as hf_trainer

    from finetune.trainers import CheckpointWriteError

    values = {**base_values, "save_strategy": "steps", "save_steps": 2, "max_steps": 4}
    values["data"] = {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}
    original, calls = hf_trainer.Trainer._save_optimizer_and_scheduler, {"n": 0}

    def full(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(hf_trainer.Trainer, "_save_optimizer_and_scheduler", full)
    with pytest.raises(CheckpointWriteError, match="writing checkpoint-4 into .* failed: the disk is full"):
        cpt.main(args(values))
    run = Path(values["output_dir"])
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".staging"))) == ["checkpoint-2"]


def test_two_lora_runs_with_one_seed_are_bitwise_equal(base_values, demo_data, tmp_path):
    values = {**base_values, "use_lora": True, "lora_r": 4, "learning_rate": 0.0, "max_steps": 1}
    values["data"] = {"sources": [str(demo_data["sft"])], "max_length": 64}
    adapters = []
    for name in ("a", "b"):
        sft.main(args({**values, "output_dir": str(tmp_path / name)}))
        adapters.append(load_file(tmp_path / name / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    norms = [losses(tmp_path / name, "grad_norm")[1] for name in ("a", "b")]
    assert norms[0] == norms[1]


def test_output_dir_that_holds_the_inputs_is_refused(base_values, demo_data, tmp_path):
    values = {**base_values, "max_steps": 1, "save_steps": 1}
    values["data"] = {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}
    cpt.main(args(values))
    base = values["output_dir"]
    for output_dir in (base, str(Path(base).parent)):
        with pytest.raises(RecipeError, match="is or contains model_name_or_path"):
            cpt.main(
                args({**values, "model_name_or_path": base, "output_dir": output_dir, "overwrite_output_dir": True})
            )
    assert (Path(base) / "model.safetensors").is_file()


def test_lora_with_the_mtp_loss_on_a_base_without_an_mtp_layer_is_refused(base_values, demo_data, tmp_path):
    """A transformers-saved Base has no MTP tensors: LoRA would train adapters around a random, frozen MTP block."""
    values = {**base_values, "max_steps": 1, "output_dir": str(tmp_path / "base")}
    values["data"] = {"task": "cpt", "sources": [str(demo_data["corpus"])], "max_length": 32}
    cpt.main(args(values))
    base = tmp_path / "base"
    index_free = load_file(base / "model.safetensors")
    from safetensors.torch import save_file

    layer = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    kept = {k: v for k, v in index_free.items() if not k.startswith(f"model.layers.{layer}.")}
    save_file(kept, str(base / "model.safetensors"), metadata={"format": "pt"})
    lora = {**base_values, "model_name_or_path": str(base), "use_lora": True, "output_dir": str(tmp_path / "sft")}
    lora["data"] = {"sources": [str(demo_data["sft"])], "max_length": 64}
    with pytest.raises(RecipeError, match="has no MTP layer .* LoRA cannot train a fresh one"):
        sft.main(args({**lora, "mtp_loss_weight": 0.3, "max_steps": 1}))
    sft.main(args({**lora, "max_steps": 1}))  # without the MTP loss it loads (one warning) and trains


def test_a_bf16_preset_keeps_the_router_and_its_bias_fp32(base_values):
    from finetune.config import SFTStageConfig, build_stage_config
    from finetune.stage import build_model

    config = build_stage_config(SFTStageConfig, {**base_values, "torch_dtype": "bfloat16"})
    model = build_model(config)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    for moe in model.moe_layers():
        assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    bias.fill_(0.6)
    bias += 1e-3
    assert bias[0].item() == pytest.approx(0.601, abs=1e-6)  # in bf16 this step would vanish
