"""The preference stages under `accelerate launch` on 2 CPU processes (gloo) equal one process on the same global
batch (2 x 2 pairs per step against 4). DPO in three set-ups:
- LoRA under plain ZeRO-3 (recipes/accelerate/zero3.yaml): the reference is the adapter-disabled policy;
- full DPO under ZeRO-3 + expert parallelism (EP_SIZE=2, zero3_ep_cpu.yaml): the reference is a frozen copy of the
  initial model, which trl hands to its own deepspeed.initialize;
- LoRA with precompute_ref_log_probs under ZeRO-3 + EP: trl wraps the policy in a ZeRO-3 engine for the precompute.
The reference-free stages: ORPO with LoRA under ZeRO-3, CPO (sigmoid + NLL of the chosen answer) full under
ZeRO-3 + EP, SimPO with LoRA under ZeRO-3 + EP. KTO's trainer (loss apo_zero_unpaired) with LoRA under ZeRO-3.
The logged loss, gradient norm, trl's rewards and the policy's log-probs (and the NLL and log-odds terms where the
stage logs them), and the saved adapter or HF checkpoint (every expert) must agree. Router biases update every step
(gamma 0.01, router_bias_update: always), so rank-local expert counts would show too."""

from __future__ import annotations

import importlib
import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_tools.synthetic import save_demo_data

from ..finetune.conftest import write_small_tokenizer
from .launch import launch
from .test_launch import merged

STEPS = 3
# fp32; the ranks sum gradients in another order than one process. Measured over the three DPO set-ups, 3 steps (in
# brackets: hand runs of the same set-ups against a 2-thread one-process run): losses 3.3e-7 (1.4e-6) relative,
# rewards/* 2.4e-7 (3.9e-6) absolute (beta times a difference of log-probs near -100, so an absolute bound), policy
# log-probs equal (8e-8 relative), grad_norm 2.1e-6 relative, adapter weights 5.1e-7 (2.0e-6) and full weights
# 3.1e-6 (3.3e-6) absolute.
# ORPO, CPO and SimPO: losses and nll_loss 1.4e-7 relative, rewards/* and log-odds 2.4e-7 absolute, log-probs
# 7.3e-8 relative, grad_norm 6.2e-8 (LoRA) and 2.4e-6 (full, EP) relative, adapter weights 1.6e-6 and full weights
# 4.8e-6 absolute (a hand run on other pairs: 1.7e-5 in one element of a dense down_proj, where Adam's first steps
# divide a near-zero gradient by its own size).
# The bugs these tests guard were far larger: an unmarked expert-parallel reference moved the step-1 loss by 4.6e-3
# and the weights by 1.7e-2; an unmarked precompute engine moved the loss by 8.1e-3 and adapter weights by 1.8e-2;
# a rank-local token mean in the NLL term (ORPO, CPO) moved the step-1 loss by 1.4e-4 (ORPO) and 4.1e-5 (CPO)
# relative, CPO's grad_norm by 1.5e-3 and its step-3 loss by 1.9e-2.
LOSS_RTOL, REWARD_ATOL, LOGP_RTOL, GRAD_NORM_RTOL, ATOL, RTOL = 1e-5, 2e-5, 1e-5, 3e-5, 5e-5, 1e-4
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
LOGPS = ("logps/chosen", "logps/rejected")
# pytest.approx tolerances of each logged value, compared wherever the one-process run logged it
LOG_TOLERANCES = {
    "loss": {"rel": LOSS_RTOL},
    "nll_loss": {"rel": LOSS_RTOL},
    "grad_norm": {"rel": GRAD_NORM_RTOL},
    **{key: {"abs": REWARD_ATOL} for key in (*REWARDS, "log_odds_ratio", "log_odds_chosen")},
    **{key: {"rel": LOGP_RTOL} for key in LOGPS},
}
# the first step's loss where it is known: DPO's policy equals its reference on every rank
FIRST_LOSS = {"dpo": math.log(2)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("launch_preference")
    data = save_demo_data(root / "data", num_train=4, num_eval=2, num_preference=16)
    # Every demo pair's chosen answer is one number, so a token mean over chosen answers (CPO's NLL term) is the same
    # per rank and globally; with the longer answer chosen they are 2 or 24 tokens and the ranks' counts differ.
    longer = root / "data" / "preference_longer_chosen.jsonl"
    with open(longer, "w") as f:
        for line in data["preference"].read_text().splitlines():
            pair = json.loads(line)
            short, long = sorted((pair["chosen"], pair["rejected"]), key=lambda m: len(m[0]["content"]))
            f.write(json.dumps({**pair, "chosen": long, "rejected": short}) + "\n")
    return {"tokenizer": write_small_tokenizer(root / "tok"), "preference_longer_chosen": longer, **data}


def write_recipe(folder: Path, inputs: dict[str, Path], stage: str, **values) -> Path:
    recipe = {
        "model_name_or_path": "preset:tiny",
        "model_overrides": {"num_hidden_layers": 2},
        "tokenizer": str(inputs["tokenizer"]),
        "learning_rate": 5e-3,
        "beta": 0.5,
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "router_bias_gamma": 0.01,
        "router_bias_update": "always",
        "report_to": "none",
        "save_strategy": "no",
        "seed": 0,
        "data": {"sources": [str(inputs["preference"])], "max_length": 64},
        **values,
    }
    path = folder / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@contextmanager
def one_thread():
    """The reference run in this process with one thread, as each launched rank has: two OpenMP threads on two
    shared, busy cores made its 3 steps 60x slower (10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_single(stage: str, recipe: Path, out: Path) -> None:
    with one_thread():
        module = importlib.import_module(f"finetune.{stage}")
        module.main(["--config", str(recipe), f"output_dir={out}", "per_device_train_batch_size=4"])


def logged(folder: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def check_same_log(stage: str, launched: Path, single: Path) -> None:
    got, want = logged(launched), logged(single)
    assert sorted(got) == list(range(1, STEPS + 1)) and got.keys() == want.keys()
    if stage in FIRST_LOSS:
        assert got[1]["loss"] == pytest.approx(FIRST_LOSS[stage], abs=1e-6), "step 1"
    assert got[STEPS]["rewards/margins"] > got[1]["rewards/margins"]  # the preference trained
    for step, record in want.items():
        assert {"loss", "grad_norm", *REWARDS, *LOGPS} <= record.keys()
        for key, tolerance in LOG_TOLERANCES.items():
            if key in record:
                assert got[step][key] == pytest.approx(record[key], **tolerance), (step, key)


def check_same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=RTOL, msg=lambda m, key=key: f"{key}: {m}")


def run_both(
    tmp_path: Path, inputs: dict[str, Path], config_file: str, ep_size: int | None, stage: str = "dpo", **values
) -> None:
    """One process with 4 pairs a step, then 2 launched processes with 2 each; the logs must agree."""
    recipe = write_recipe(tmp_path, inputs, stage, **values)
    run_single(stage, recipe, tmp_path / "single")
    # trl caches precomputed reference log-probs in the datasets cache (keyed by the data and rank 0's weights)
    env = {"HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}
    stderr = launch(config_file, stage, recipe, tmp_path / "launched", ep_size=ep_size, env=env)
    # rank 0's message after the consolidated save (every expert gathered under EP)
    assert f"(2 ranks, ep_size={ep_size or 1})" in stderr
    check_same_log(stage, tmp_path / "launched", tmp_path / "single")


def check_same_adapter(launched: Path, single: Path) -> None:
    adapter = "adapter_model.safetensors"
    expected = load_file(single / adapter)
    assert any(".lora_A." in k for k in expected) and any(".lora_B." in k for k in expected)
    check_same_weights(load_file(launched / adapter), expected)


@pytest.mark.slow
def test_dpo_lora_zero3_launch_equals_one_process(inputs, tmp_path):
    """The recipe default: LoRA, the reference is the adapter-disabled policy, run at every step."""
    run_both(tmp_path, inputs, "recipes/accelerate/zero3.yaml", None, use_lora=True, lora_r=8)
    check_same_adapter(tmp_path / "launched", tmp_path / "single")


@pytest.mark.slow
def test_dpo_full_zero3_expert_parallel_launch_equals_one_process(inputs, tmp_path):
    """Full DPO: the reference is a frozen copy of the initial model, which trl hands to its own ZeRO-3 engine."""
    run_both(tmp_path, inputs, "recipes/accelerate/zero3_ep_cpu.yaml", 2, use_lora=False)
    state = merged(tmp_path / "launched")
    check_same_weights(state, merged(tmp_path / "single"))
    # the bias update ran in the MoE decoder layer (layer 2 is the MTP layer, which no preference stage runs)
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0


@pytest.mark.slow
def test_dpo_lora_precomputed_reference_expert_parallel_launch_equals_one_process(inputs, tmp_path):
    """precompute_ref_log_probs: trl wraps the policy itself in a ZeRO-3 engine inside the trainer's __init__."""
    values = {"use_lora": True, "lora_r": 8, "precompute_ref_log_probs": True}
    run_both(tmp_path, inputs, "recipes/accelerate/zero3_ep_cpu.yaml", 2, **values)
    check_same_adapter(tmp_path / "launched", tmp_path / "single")


@pytest.mark.slow
def test_orpo_lora_zero3_launch_equals_one_process(inputs, tmp_path):
    """ORPO: the NLL term is a token mean over prompt + chosen of the whole global batch, not of each rank's rows."""
    run_both(tmp_path, inputs, "recipes/accelerate/zero3.yaml", None, "orpo", use_lora=True, lora_r=8)
    check_same_adapter(tmp_path / "launched", tmp_path / "single")


@pytest.mark.slow
def test_cpo_full_zero3_expert_parallel_launch_equals_one_process(inputs, tmp_path):
    """CPO (sigmoid + cpo_alpha 1 times the NLL of the chosen answers, which differ in length), full weights, experts
    split over the ranks."""
    data = {"sources": [str(inputs["preference_longer_chosen"])], "max_length": 64}
    values = {"use_lora": False, "loss_type": "sigmoid", "cpo_alpha": 1.0, "data": data}
    run_both(tmp_path, inputs, "recipes/accelerate/zero3_ep_cpu.yaml", 2, "cpo", **values)
    state = merged(tmp_path / "launched")
    check_same_weights(state, merged(tmp_path / "single"))
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0


@pytest.mark.slow
def test_simpo_lora_expert_parallel_launch_equals_one_process(inputs, tmp_path):
    """SimPO (CPO with loss_type simpo, no NLL): length-normalised log-probs, LoRA on the expert-parallel model."""
    values = {"use_lora": True, "lora_r": 8, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 1.0}
    run_both(tmp_path, inputs, "recipes/accelerate/zero3_ep_cpu.yaml", 2, "cpo", **values)
    check_same_adapter(tmp_path / "launched", tmp_path / "single")


@pytest.mark.slow
def test_kto_lora_zero3_launch_equals_one_process(inputs, tmp_path):
    """KTO's trainer on the demo pairs unpaired, LoRA under ZeRO-3, with loss_type apo_zero_unpaired: loss kto's KL
    estimate pairs each prompt with a completion from its own rank's batch (trl's design), so 2 x 2 and 4 examples a
    step differ there by construction; everything else (rewards, log-probs, gradients) must agree."""
    values = {"use_lora": True, "lora_r": 8, "loss_type": "apo_zero_unpaired", "unpair_preferences": True}
    run_both(tmp_path, inputs, "recipes/accelerate/zero3.yaml", None, "kto", **values)
    check_same_adapter(tmp_path / "launched", tmp_path / "single")
