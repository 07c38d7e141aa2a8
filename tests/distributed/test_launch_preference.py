"""DPO under `accelerate launch` on 2 CPU processes (gloo) equals one process on the same global batch (2 x 2 pairs
per step against 4): LoRA DPO under plain ZeRO-3 (recipes/accelerate/zero3.yaml; the reference is the
adapter-disabled policy), and full DPO under ZeRO-3 + expert parallelism (EP_SIZE=2, zero3_ep_cpu.yaml) with its
separate frozen reference model, which trl hands to its own deepspeed.initialize. The logged loss and trl's rewards,
and the saved adapter or HF checkpoint (every expert), must agree. Router biases update every step (gamma 0.01,
router_bias_update: always), so rank-local expert counts would show too."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_tools.synthetic import save_demo_data
from finetune import dpo

from ..finetune.conftest import write_small_tokenizer
from .test_launch import launch, merged

STEPS = 3
# fp32. Measured (2 processes vs one, 3 steps): losses 8.3e-7 relative, rewards/* 2.0e-6 absolute (a difference of
# log-probs around -100 times beta, so an absolute bound), adapter weights 9.7e-7 and full weights 3.3e-6 absolute.
# An unmarked expert-parallel reference (the bug this guards) moved the step-1 loss by 4.6e-3 and weights by 1.7e-2.
LOSS_RTOL, REWARD_ATOL, ATOL, RTOL = 1e-5, 2e-5, 5e-5, 1e-4
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("launch_preference")
    data = save_demo_data(root / "data", num_train=4, num_eval=2, num_preference=16)
    return {"tokenizer": write_small_tokenizer(root / "tok"), **data}


def write_recipe(folder: Path, inputs: dict[str, Path], **values) -> Path:
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
    path = folder / "dpo.yaml"
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


def run_single(recipe: Path, out: Path) -> None:
    with one_thread():
        dpo.main(["--config", str(recipe), f"output_dir={out}", "per_device_train_batch_size=4"])


def logged(folder: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def check_same_log(launched: Path, single: Path) -> None:
    got, want = logged(launched), logged(single)
    assert sorted(got) == list(range(1, STEPS + 1)) and got.keys() == want.keys()
    assert got[1]["loss"] == pytest.approx(math.log(2), abs=1e-6), "step 1: policy == reference on every rank"
    assert got[STEPS]["rewards/margins"] > 0
    for step, record in want.items():
        assert got[step]["loss"] == pytest.approx(record["loss"], rel=LOSS_RTOL), step
        for key in REWARDS:
            assert got[step][key] == pytest.approx(record[key], abs=REWARD_ATOL), (step, key)


def check_same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=RTOL, msg=key)


@pytest.mark.slow
def test_dpo_lora_zero3_launch_equals_one_process(inputs, tmp_path):
    recipe = write_recipe(tmp_path, inputs, use_lora=True, lora_r=8)
    run_single(recipe, tmp_path / "single")
    stderr = launch("recipes/accelerate/zero3.yaml", "dpo", recipe, tmp_path / "zero3", ep_size=None)
    assert "(2 ranks, ep_size=1)" in stderr
    check_same_log(tmp_path / "zero3", tmp_path / "single")
    adapter = "adapter_model.safetensors"
    state, expected = load_file(tmp_path / "zero3" / adapter), load_file(tmp_path / "single" / adapter)
    assert any(".lora_A." in k for k in expected) and any(".lora_B." in k for k in expected)
    check_same_weights(state, expected)


@pytest.mark.slow
def test_dpo_full_zero3_expert_parallel_launch_equals_one_process(inputs, tmp_path):
    recipe = write_recipe(tmp_path, inputs, use_lora=False)
    run_single(recipe, tmp_path / "single")
    stderr = launch("recipes/accelerate/zero3_ep_cpu.yaml", "dpo", recipe, tmp_path / "ep", ep_size=2)
    assert "(2 ranks, ep_size=2)" in stderr  # the policy's save gathered all 8 experts of each MoE layer
    check_same_log(tmp_path / "ep", tmp_path / "single")
    state = merged(tmp_path / "ep")
    check_same_weights(state, merged(tmp_path / "single"))
    # the bias update ran in the MoE decoder layer (layer 2 is the MTP layer, which no preference stage runs)
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0
