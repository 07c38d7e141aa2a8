"""ZeRO-3 + expert parallelism under DeepSpeed on CPU (gloo): full SFT (2 and 4 processes, EP 2) reaches the same
losses, weights and router biases as one process on the same global batch; save -> kill -> resume is exact; the
consolidated checkpoint equals the one-process model with every expert; LoRA on an FP8 base likewise, with the FP8
experts kept local and untouched."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.moe import ExpertLoadTracker
from finetune.parallel import (
    build_expert_parallel_groups,
    load_expert_parallel,
    prepare_zero3_expert_parallel,
    save_consolidated,
    zero3_config,
)
from model import DeepseekV3ForCausalLM
from model.checkpoint import iter_hf_state, list_checkpoint_files

from .common import batch, training_config, write_fp8_checkpoint, write_tiny_checkpoint
from .launch import check_ranks, run_ranks

# fp32 everywhere. ZeRO-3 runs AdamW on flat fp32 partitions and sums gradients in a different order than one
# process; after a few steps the weights agree to ~1e-6 relative.
ATOL, RTOL = 1e-5, 1e-4
LR, WEIGHT_DECAY, CLIP, GAMMA = 1e-3, 0.1, 1.0, 0.01
# Adam's first steps move every weight by about lr whatever the size of its gradient (m / sqrt(v) is +-1), so a
# gradient at rounding level (an expert that got almost no tokens) can flip sign between two summation orders and
# move its weight by up to 2 lr: one such element of 2048 was 1.4e-5 off after a change that only reordered the
# rounding of the head loss. eps 1e-6 (torch's default is 1e-8) makes the update linear in gradients below ~1e-6,
# so rounding-level gradients give rounding-level updates, and the tolerances stay tight for everything else.
EPS = 1e-6
STEPS = 4


def adamw(params) -> torch.optim.AdamW:
    """The optimizer of both sides of every comparison here."""
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)


def step_rows(step: int, world: int, rank: int | None = None) -> torch.Tensor:
    rows = batch(world, seed=100 + step)
    return rows if rank is None else rows.chunk(world)[rank]


def reference_run(model: DeepseekV3ForCausalLM, world: int, steps: int) -> dict:
    """One process on each step's global batch: loss = mean of the ranks' slice losses, clip 1.0, AdamW, bias update."""
    model.train()
    tracker = ExpertLoadTracker(model, gamma=GAMMA)
    opt = adamw(model.parameters())
    losses = []
    for step in range(steps):
        slices = [model(input_ids=r, labels=r).loss for r in step_rows(step, world).chunk(world)]
        loss = torch.stack(slices).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        tracker.update_bias()
        losses.append([s.item() for s in slices])
    return {"losses": torch.tensor(losses), "state": dict(iter_hf_state(model))}


def sft_worker(rank: int, world: int, path: Path, out: Path, first: int, last: int, save_at: int, kill_at: int) -> None:
    import deepspeed

    groups = build_expert_parallel_groups(2)
    model, _ = load_expert_parallel(
        DeepseekV3ForCausalLM, path, groups, dtype=torch.float32, config=training_config(path)
    )
    model.train()
    prepare_zero3_expert_parallel(model, groups)
    tracker = ExpertLoadTracker(model, gamma=GAMMA)
    opt = adamw(model.parameters())
    config = zero3_config(micro_batch_size=2, gradient_clipping=CLIP, world_size=world)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if first > 0:
        engine.load_checkpoint(str(out / "ds"), tag=f"step{first}")
    losses = {}
    for step in range(first, last):
        rows = step_rows(step, world, rank)
        loss = engine(input_ids=rows, labels=rows).loss
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-step, after the last checkpoint
        engine.backward(loss)
        engine.step()
        tracker.update_bias()
        losses[step] = loss.item()
        if step + 1 == save_at:
            engine.save_checkpoint(str(out / "ds"), tag=f"step{save_at}")
    torch.save(losses, out / f"losses-{first}-rank{rank}.pt")
    save_consolidated(engine.module, out / f"hf-{first}", groups, max_shard_size="100KB")


def merged(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in set(list_checkpoint_files(path).values()) for k, v in load_file(f).items()}


def check_run(out: Path, expected: dict, world: int, first: int) -> None:
    for rank in range(world):
        losses = torch.load(out / f"losses-{first}-rank{rank}.pt")
        for step, loss in losses.items():
            assert loss == pytest.approx(expected["losses"][step, rank].item(), rel=RTOL, abs=ATOL), (step, rank)
    state = merged(out / f"hf-{first}")
    assert state.keys() == expected["state"].keys()  # every expert of every MoE layer, MTP included
    for key, value in expected["state"].items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=RTOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_zero3_ep_full_sft_save_kill_resume(tmp_path: Path) -> None:
    world = 2
    path = tmp_path / "base"
    model = write_tiny_checkpoint(path)
    expected = reference_run(model, world, STEPS)
    biases = [k for k in expected["state"] if k.endswith("e_score_correction_bias")]
    assert all(expected["state"][k].abs().sum() > 0 for k in biases)  # the bias update ran

    check_ranks(sft_worker, world, path, tmp_path, 0, STEPS, 2, -1)  # uninterrupted, saves at step 2
    check_run(tmp_path, expected, world, 0)

    killed = tmp_path / "killed"
    killed.mkdir()
    codes = run_ranks(sft_worker, world, path, killed, 0, STEPS, 2, 2)  # saves after step 2, killed in step 3
    assert all(code == -signal.SIGKILL for code in codes), codes
    check_ranks(sft_worker, world, path, killed, 2, STEPS, -1, -1)  # resumes from step 2
    check_run(killed, expected, world, 2)


@pytest.mark.slow
def test_zero3_ep_full_sft_four_processes(tmp_path: Path) -> None:
    world = 4  # EP 2 x EDP 2: expert partitions and gradients reduced over the EDP group
    path = tmp_path / "base"
    expected = reference_run(write_tiny_checkpoint(path), world, STEPS)
    check_ranks(sft_worker, world, path, tmp_path, 0, STEPS, -1, -1)
    check_run(tmp_path, expected, world, 0)


LORA_R = 8


def lora_model(model: DeepseekV3ForCausalLM):
    from peft import get_peft_model

    from finetune.lora import build_lora_config

    torch.manual_seed(5)  # the same adapter init in every process
    return get_peft_model(model, build_lora_config(model, preset="both", r=LORA_R, alpha=16))


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def lora_reference(path: Path, world: int, steps: int) -> dict:
    base = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, progress=False, config=training_config(path)
    )
    model = lora_model(base)
    model.train()
    tracker = ExpertLoadTracker(base, gamma=GAMMA)
    opt = adamw(p for p in model.parameters() if p.requires_grad)
    losses = []
    for step in range(steps):
        slices = [model(input_ids=r, labels=r).loss for r in step_rows(step, world).chunk(world)]
        loss = torch.stack(slices).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        opt.step()
        tracker.update_bias()
        losses.append([s.item() for s in slices])
    biases = [m.gate.e_score_correction_bias.clone() for m in base.moe_layers()]
    return {"losses": torch.tensor(losses), "lora": lora_state(model), "biases": biases}


def lora_worker(rank: int, world: int, path: Path, out: Path, steps: int) -> None:
    import deepspeed

    from model.fp8 import FP8_DTYPE

    groups = build_expert_parallel_groups(2)
    base, _ = load_expert_parallel(
        DeepseekV3ForCausalLM, path, groups, dtype=torch.float32, config=training_config(path)
    )
    experts = base.model.layers[1].mlp.experts
    fp8_before = experts.gate_up_proj.clone()
    model = lora_model(base)
    model.train()
    prepare_zero3_expert_parallel(model, groups)
    tracker = ExpertLoadTracker(base, gamma=GAMMA)
    opt = adamw(p for p in model.parameters() if p.requires_grad)
    config = zero3_config(micro_batch_size=2, gradient_clipping=CLIP, world_size=world)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    losses = {}
    for step in range(steps):
        rows = step_rows(step, world, rank)
        loss = engine(input_ids=rows, labels=rows).loss
        engine.backward(loss)
        engine.step()
        tracker.update_bias()
        losses[step] = loss.item()
    # The frozen FP8 experts stayed this rank's, in FP8, bit for bit, and were never handed to ZeRO-3.
    assert experts.gate_up_proj.dtype == FP8_DTYPE and experts.gate_up_proj.shape[0] == 4
    assert torch.equal(experts.gate_up_proj.view(torch.uint8), fp8_before.view(torch.uint8))
    assert not any(p.dtype == FP8_DTYPE for p in engine.module.parameters())
    adapters = {}
    for name, param in engine.module.named_parameters():
        if "lora_" in name:
            with deepspeed.zero.GatheredParameters([param]):
                adapters[name] = param.detach().clone()
    biases = [m.gate.e_score_correction_bias.clone() for m in base.moe_layers()]
    torch.save({"losses": losses, "lora": adapters, "biases": biases}, out / f"lora-rank{rank}.pt")


@pytest.mark.slow
def test_zero3_ep_lora_on_fp8_base(tmp_path: Path) -> None:
    world = 2
    path = tmp_path / "fp8"
    write_fp8_checkpoint(path)
    expected = lora_reference(path, world, STEPS)
    check_ranks(lora_worker, world, path, tmp_path, STEPS)
    for rank in range(world):
        got = torch.load(tmp_path / f"lora-rank{rank}.pt")
        for step, loss in got["losses"].items():
            assert loss == pytest.approx(expected["losses"][step, rank].item(), rel=RTOL, abs=ATOL), (step, rank)
        assert got["lora"].keys() == expected["lora"].keys() and len(got["lora"]) > 0
        for name, value in expected["lora"].items():
            torch.testing.assert_close(got["lora"][name], value, atol=ATOL, rtol=RTOL, msg=name)
        for mine, want in zip(got["biases"], expected["biases"]):
            assert torch.equal(mine, want)  # the same bias update on every rank as in one process
