"""Short real runs of each stage on the tiny preset (small tokenizer), in-process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from finetune import cpt, dpo, sft
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
    command = [sys.executable, "-m", "finetune.cpt", *args({**common, "output_dir": str(killed)})]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "losses.jsonl").exists() or max(losses(killed), default=0) < 4:
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-3").is_dir() and not (killed / "checkpoint-6").exists()
    assert not list(killed.glob("checkpoint-*/*.tmp"))
    cpt.main(args({**common, "output_dir": str(killed), "resume_from_checkpoint": "last"}))
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(4, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
