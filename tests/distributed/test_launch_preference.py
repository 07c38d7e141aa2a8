"""DPO under `accelerate launch` on 2 CPU processes (gloo) equals one process on the same global batch (2 x 2 pairs
per step against 4), in three set-ups:
- LoRA under plain ZeRO-3 (recipes/accelerate/zero3.yaml): the reference is the adapter-disabled policy;
- full DPO under ZeRO-3 + expert parallelism (EP_SIZE=2, zero3_ep_cpu.yaml): the reference is a frozen copy of the
  initial model, which trl hands to its own deepspeed.initialize;
- LoRA with precompute_ref_log_probs under ZeRO-3 + EP: trl wraps the policy in a ZeRO-3 engine for the precompute.
The logged loss, trl's rewards and the policy's log-probs, and the saved adapter or HF checkpoint (every expert)
must agree. Router biases update every step (gamma 0.01, router_bias_update: always), so rank-local expert counts
would show too."""

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
from .launch import launch
from .test_launch import merged

STEPS = 3
# fp32; the ranks sum gradients in another order than one process. Measured over the three set-ups, 3 steps (in
# brackets: hand runs of the same set-ups against a 2-thread one-process run): losses 3.3e-7 (1.4e-6) relative,
# rewards/* 2.4e-7 (3.9e-6) absolute (beta times a difference of log-probs near -100, so an absolute bound), policy
# log-probs equal (8e-8 relative), adapter weights 5.1e-7 (2.0e-6) and full weights 3.1e-6 (3.3e-6) absolute.
# The bugs these tests guard were far larger: an unmarked expert-parallel reference moved the step-1 loss by 4.6e-3
# and the weights by 1.7e-2; an unmarked precompute engine moved the loss by 8.1e-3 and adapter weights by 1.8e-2.
LOSS_RTOL, REWARD_ATOL, LOGP_RTOL, ATOL, RTOL = 1e-5, 2e-5, 1e-5, 5e-5, 1e-4
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
LOGPS = ("logps/chosen", "logps/rejected")


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
        for key in LOGPS:
            assert got[step][key] == pytest.approx(record[key], rel=LOGP_RTOL), (step, key)


def check_same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=RTOL, msg=key)


def run_both(tmp_path: Path, inputs: dict[str, Path], config_file: str, ep_size: int | None, **values) -> None:
    """One process with 4 pairs a step, then 2 launched processes with 2 each; the logs must agree."""
    recipe = write_recipe(tmp_path, inputs, **values)
    run_single(recipe, tmp_path / "single")
    # trl caches precomputed reference log-probs in the datasets cache (keyed by the data and rank 0's weights)
    env = {"HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}
    stderr = launch(config_file, "dpo", recipe, tmp_path / "launched", ep_size=ep_size, env=env)
    # rank 0's message after the consolidated save (every expert gathered under EP)
    assert f"(2 ranks, ep_size={ep_size or 1})" in stderr
    check_same_log(tmp_path / "launched", tmp_path / "single")


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
