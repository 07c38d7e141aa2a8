"""The real stages under `accelerate launch` on 2 CPU processes (gloo): ZeRO-3 + expert parallelism (EP_SIZE=2,
recipes/accelerate/zero3_ep_cpu.yaml) for SFT and plain ZeRO-3 (recipes/accelerate/zero3.yaml) for CPT log the same
losses and save the same HF checkpoint, every expert present, as one process on the same global batch (2 x 2 rows
per step against 4 rows). Router biases update (gamma 0.01) and the MTP loss is on, so a rank whose expert
counts or experts went astray would show in the saved weights. A launched SFT run killed (SIGKILL) in step 3 and
relaunched with resume_from_checkpoint=true ends as the uninterrupted launch does, for full SFT and for LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_tools.synthetic import save_demo_data
from finetune import cpt, sft
from model import DeepseekV3ForCausalLM
from model.checkpoint import list_checkpoint_files

from ..finetune.conftest import write_small_tokenizer
from .launch import launch, launch_module

STEPS = 4
# fp32; ZeRO-3 sums gradients in another order than one process: measured 1e-7 relative on the losses and 5e-6
# absolute on the weights after 4 steps. A rank-local router-bias update (the bug this guards) moved weights 3e-3.
LOSS_RTOL, ATOL, RTOL = 1e-5, 5e-5, 1e-4
EP_CONFIG = "recipes/accelerate/zero3_ep_cpu.yaml"
SAVING = ("save_strategy=steps", "save_steps=2")  # checkpoint-2 is where the resume test's killed run restarts


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("launch")
    data = save_demo_data(root / "data", num_train=120, num_eval=10, num_preference=8)
    return {"tokenizer": write_small_tokenizer(root / "tok"), **data}


@pytest.fixture(scope="module")
def sft_launched(inputs, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, output folder) of the SFT recipe launched under ZeRO-3 + EP 2, saving a checkpoint every 2 steps:
    the run that one process and a killed-and-resumed launch must both match."""
    folder = tmp_path_factory.mktemp("sft_launched")
    recipe = write_recipe(folder, inputs, "sft")
    stderr = launch(EP_CONFIG, "sft", recipe, folder / "ep", ep_size=2, overrides=SAVING)
    assert "(2 ranks, ep_size=2)" in stderr  # each rank held 4 of the 8 experts; the save gathered all of them
    return recipe, folder / "ep"


def write_recipe(folder: Path, inputs: dict[str, Path], task: str, **extra) -> Path:
    source = inputs["sft"] if task == "sft" else inputs["corpus"]
    recipe = {
        "model_name_or_path": "preset:tiny",
        "model_overrides": {"num_hidden_layers": 2},
        "tokenizer": str(inputs["tokenizer"]),
        "learning_rate": 3e-3,
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "mtp_loss_weight": 0.3,
        # balance_loss_alpha stays 0 here; test_split_invariance.py runs the balance loss across splits and ranks.
        "router_bias_gamma": 0.01,
        # AdamW's update g / (sqrt(v) + eps) turns summation-order noise in a gradient near eps (1e-8) into a
        # visible weight difference (one eh_proj element 5.6e-5 apart after 4 steps with eps 1e-8): a larger eps
        # keeps the comparison about the parallel layout, not about that amplification.
        "adam_epsilon": 1e-6,
        "report_to": "none",
        "save_strategy": "no",
        "seed": 0,
        "data": {"task": task, "sources": [str(source)], "max_length": 64},
        **extra,
    }
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(folder: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def merged(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in set(list_checkpoint_files(path).values()) for k, v in load_file(f).items()}


def check_same_run(launched: Path, single: Path) -> None:
    tokens = [
        {
            r["step"]: r["num_tokens"]
            for r in map(json.loads, (f / "losses.jsonl").read_text().splitlines())
            if "loss" in r
        }
        for f in (launched, single)
    ]
    assert tokens[0] == tokens[1], tokens  # counted over both ranks (and across a resume), as one process counts
    got, want = losses(launched), losses(single)
    assert sorted(got) == list(range(1, STEPS + 1)) and got.keys() == want.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values()) and got[STEPS] < got[1]
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    state, expected = merged(launched), merged(single)
    assert state.keys() == expected.keys()  # every expert of every MoE layer (MTP layer included), per-expert keys
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=RTOL, msg=lambda m, key=key: f"{key}: {m}")
    model = DeepseekV3ForCausalLM.from_pretrained(launched, progress=False)
    experts = model.config.n_routed_experts
    assert all(m.experts.gate_up_proj.shape[0] == experts for m in model.moe_layers())
    biases = [k for k in state if k.endswith("e_score_correction_bias")]
    assert biases and all(state[k].abs().sum() > 0 for k in biases)  # the bias update ran


def launch_killed_in_step_3(recipe: Path, killed: Path) -> None:
    """Launch the SFT `recipe` under ZeRO-3 + EP 2 with every rank SIGKILLed in step 3, after checkpoint-2."""
    module = ["tests.distributed.kill_at_step", "sft"]
    proc = launch_module(EP_CONFIG, module, recipe, killed, 2, env={"KILL_AT_STEP": "3"}, overrides=SAVING)
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-4000:]
    assert sorted(losses(killed)) == [1, 2]
    folders = [p.name for p in killed.iterdir() if p.is_dir() and p.name != "plots"]  # plots/: the run report's
    assert folders == ["checkpoint-2"]  # no staging folder left behind
    assert (killed / "report.md").is_file()  # written at the checkpoint, before the kill
    # kill_at_step makes rank 1 a second late with its RNG state: the rename must wait for it
    rng_files = sorted(p.name for p in (killed / "checkpoint-2").glob("rng_state_*.pth"))
    assert rng_files == ["rng_state_0.pth", "rng_state_1.pth"]


def relaunch_resuming(recipe: Path, killed: Path) -> None:
    """Relaunch the killed run with resume_from_checkpoint=true: it logs steps 3-4 after the killed run's 1-2."""
    launch(EP_CONFIG, "sft", recipe, killed, ep_size=2, overrides=(*SAVING, "resume_from_checkpoint=true"))
    records = [json.loads(line) for line in (killed / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # resumed at step 3, not restarted at 1


@pytest.mark.slow
def test_sft_zero3_expert_parallel_launch_equals_one_process(sft_launched, tmp_path):
    recipe, launched = sft_launched
    sft.main(["--config", str(recipe), f"output_dir={tmp_path / 'single'}", "per_device_train_batch_size=4"])
    check_same_run(launched, tmp_path / "single")


@pytest.mark.slow
def test_cpt_zero3_launch_equals_one_process(inputs, tmp_path):
    recipe = write_recipe(tmp_path, inputs, "cpt")
    cpt.main(["--config", str(recipe), f"output_dir={tmp_path / 'single'}", "per_device_train_batch_size=4"])
    stderr = launch("recipes/accelerate/zero3.yaml", "cpt", recipe, tmp_path / "zero3", ep_size=None)
    assert "(2 ranks, ep_size=1)" in stderr
    check_same_run(tmp_path / "zero3", tmp_path / "single")


@pytest.mark.slow
def test_cpt_zero3_launch_from_a_checkpoint_loads_per_rank_and_equals_one_process(inputs, tmp_path):
    """#16 item 1: from a checkpoint under ZeRO-3 each rank builds only its partition (deepspeed.zero.Init) and the
    weights stream in; the run equals one process from the same checkpoint."""
    from .common import write_tiny_checkpoint

    checkpoint = tmp_path / "base"
    write_tiny_checkpoint(checkpoint, num_hidden_layers=2)
    recipe = write_recipe(tmp_path, inputs, "cpt", model_name_or_path=str(checkpoint), model_overrides={})
    cpt.main(["--config", str(recipe), f"output_dir={tmp_path / 'single'}", "per_device_train_batch_size=4"])
    stderr = launch("recipes/accelerate/zero3.yaml", "cpt", recipe, tmp_path / "zero3", ep_size=None)
    assert "zero3: each rank loads its partition of" in stderr
    check_same_run(tmp_path / "zero3", tmp_path / "single")


@pytest.mark.slow
def test_esft_expert_parallel_launch_equals_one_process(inputs, tmp_path):
    """#22: ESFT under ZeRO-3 + EP 2 (each rank trains only the selected experts it holds) logs the same losses and
    saves the same weights as one process; the unselected experts and the router keep their initial values."""
    from finetune import esft

    experts = tmp_path / "expert_cfg.json"
    esft.write_expert_config(experts, {1: [0, 5], 2: [3, 6]})  # MoE layer 1 and the MTP layer (2)
    recipe = write_recipe(tmp_path, inputs, "sft", esft_config=str(experts), router_bias_gamma=0.0)
    esft.main(["--config", str(recipe), f"output_dir={tmp_path / 'single'}", "per_device_train_batch_size=4"])
    stderr = launch(EP_CONFIG, "esft", recipe, tmp_path / "ep", ep_size=2)
    assert "(2 ranks, ep_size=2)" in stderr and "esft: training 4 routed experts in 2 layers" in stderr
    got, want = losses(tmp_path / "ep"), losses(tmp_path / "single")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    state, expected = merged(tmp_path / "ep"), merged(tmp_path / "single")
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=RTOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_esft_under_plain_zero3_is_one_sentence(inputs, tmp_path):
    """Plain ZeRO-3 partitions the fused expert weights across ranks: ESFT asks for expert parallelism instead."""
    from finetune import esft

    from .common import write_tiny_checkpoint

    checkpoint = tmp_path / "base"
    write_tiny_checkpoint(checkpoint, num_hidden_layers=2)
    experts = tmp_path / "expert_cfg.json"
    esft.write_expert_config(experts, {1: [0]})
    recipe = write_recipe(
        tmp_path, inputs, "sft", model_name_or_path=str(checkpoint), model_overrides={}, esft_config=str(experts)
    )
    proc = launch_module("recipes/accelerate/zero3.yaml", ["finetune.esft"], recipe, tmp_path / "out", None)
    # One sentence from each rank (the launcher then reports the failed process in its own words).
    assert proc.returncode != 0 and "error: ESFT under ZeRO-3 runs with expert parallelism" in proc.stderr


@pytest.mark.slow
def test_sft_zero3_expert_parallel_launch_resumes_after_sigkill(sft_launched, tmp_path):
    """Every rank killed (SIGKILL) in step 3, after checkpoint-2 (DeepSpeed's ZeRO-3 + EP states, the HF folder, each
    rank's RNG state) was saved; the relaunch resumes from it and logs steps 3-4 and saves the final checkpoint exactly
    as the uninterrupted launch (measured bitwise equal: the same ranks redo the same sums)."""
    recipe, straight = sft_launched
    killed = tmp_path / "killed"
    launch_killed_in_step_3(recipe, killed)
    relaunch_resuming(recipe, killed)
    assert losses(killed) == losses(straight)
    state, expected = merged(killed), merged(straight)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], value) for key, value in expected.items())


@pytest.mark.slow
def test_sft_lora_zero3_expert_parallel_launch_resumes_after_sigkill(inputs, tmp_path):
    """LoRA SFT (attention + shared experts, dropout 0.1: the resumed ranks must restore their RNG streams) under
    ZeRO-3 + EP 2, killed in step 3 and relaunched: the same losses and a bitwise-equal adapter as the uninterrupted
    launch, and an adapter with LoRA weights only."""
    recipe = write_recipe(tmp_path, inputs, "sft", use_lora=True, lora_dropout=0.1, learning_rate=1e-2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch(EP_CONFIG, "sft", recipe, straight, ep_size=2, overrides=SAVING)
    launch_killed_in_step_3(recipe, killed)
    assert (killed / "checkpoint-2" / "adapter_model.safetensors").is_file()
    relaunch_resuming(recipe, killed)
    assert losses(killed) == losses(straight) and losses(straight)[STEPS] < losses(straight)[1]
    state = load_file(killed / "adapter_model.safetensors")
    expected = load_file(straight / "adapter_model.safetensors")
    assert state.keys() == expected.keys() and all("lora_" in key for key in state)
    assert all(torch.equal(state[key], value) for key, value in expected.items())
    # the adapter trained: lora_B starts at zero
    assert any(value.abs().sum() > 0 for key, value in state.items() if "lora_B" in key)


class _Payload:
    """Unpickling this runs a shell command: what an attacker plants in a checkpoint folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_zero3_resume_refuses_a_planted_pickle(sft_launched, tmp_path):
    """DeepSpeed 0.19.8 unpickles its states with weights_only=False; our resume loads them weights-only: a
    payload planted in the newest checkpoint is refused in one sentence under a real 2-process launch, and never
    runs."""
    import shutil

    recipe, launched = sft_launched
    run = tmp_path / "run"
    shutil.copytree(launched, run)
    marker = tmp_path / "payload-ran"
    states = sorted((run / "checkpoint-4").glob("global_step4/*model_states.pt"))
    assert states, sorted(p.name for p in (run / "checkpoint-4").rglob("*"))
    torch.save({"module": _Payload(marker)}, states[0])
    proc = launch_module(
        EP_CONFIG, ["finetune.sft"], recipe, run, 2, overrides=(*SAVING, "resume_from_checkpoint=last", "max_steps=6")
    )
    assert proc.returncode != 0
    assert not marker.exists(), "the planted pickle ran"
    # Every rank stops with the same sentence (each checks every rank's file before any collective), no rank
    # prints a traceback; accelerate's launcher then reports the failed child with its own.
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("error: ") and "refused to load" in line]
    assert len(refusals) == 2 and all("posix.system" in line for line in refusals), proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]
