"""bf16: auto — the CPU's bf16 support found out, not assumed — and the model under bf16 autocast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.config import RecipeError, SFTStageConfig, build_stage_config
from finetune.hardware import AVX2_IMITATION, NATIVE_BF16_FLAGS, cpu_bf16_native, cpu_flags
from model import DeepseekV3Config, DeepseekV3ForCausalLM

ROOT = Path(__file__).resolve().parents[2]


def detected(extra_env: dict[str, str]) -> bool:
    env = {**os.environ, **extra_env}
    code = "from finetune.hardware import cpu_bf16_native; print(cpu_bf16_native())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_detection_follows_the_kernels_torch_uses() -> None:
    # With oneDNN capped to AVX2 (what an AVX2-only host runs) bf16 is emulated: auto must choose fp32.
    assert detected(AVX2_IMITATION) is False
    has_flags = any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)
    if has_flags:
        assert detected({}) is True  # the same CPU with its own kernels: native
    else:
        assert detected({}) is False  # no AVX512-BF16 / AMX: answered from the flags alone


def test_bf16_auto_resolves_per_recipe(monkeypatch) -> None:
    monkeypatch.delenv("DSV3_AUTO_BF16", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    common = {"output_dir": "/tmp/unused", "report_to": "none"}
    assert build_stage_config(SFTStageConfig, common).bf16 is cpu_bf16_native()
    assert build_stage_config(SFTStageConfig, {**common, "bf16": "auto"}).bf16 is cpu_bf16_native()
    assert build_stage_config(SFTStageConfig, {**common, "bf16": False}).bf16 is False
    # fp8_training sets its own precision; DeepSpeed's bf16 is bf16 weights, asked for by name.
    assert build_stage_config(SFTStageConfig, {**common, "fp8_training": "experts"}).bf16 is False
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert build_stage_config(SFTStageConfig, common).bf16 is False
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("DSV3_AUTO_BF16", "1")
    assert build_stage_config(SFTStageConfig, common).bf16 is True
    monkeypatch.setenv("DSV3_AUTO_BF16", "yes")
    with pytest.raises(RecipeError, match="DSV3_AUTO_BF16='yes' in the environment must be 0 or 1"):
        build_stage_config(SFTStageConfig, common)
    monkeypatch.setenv("DSV3_AUTO_BF16", "1")
    with pytest.raises(RecipeError, match="bf16='sometimes' must be true, false or auto"):
        build_stage_config(SFTStageConfig, {**common, "bf16": "sometimes"})


@pytest.mark.skipif(not cpu_bf16_native(), reason="bf16 is emulated on this CPU (minutes per step)")
def test_model_under_bf16_autocast_matches_fp32() -> None:
    """Under autocast the GEMMs run in bf16 (the routed experts' grouped GEMMs too, which autocast does not
    cover), the router and the losses stay fp32, and every gradient reaches the fp32 master weights."""
    torch.manual_seed(0)
    config = DeepseekV3Config.from_preset(
        "tiny", num_nextn_predict_layers=1, mtp_loss_enabled=True, balance_loss_alpha=0.01
    )
    model = DeepseekV3ForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    reference = model(ids, labels=ids)
    ref_grads = torch.autograd.grad(reference.loss, list(model.parameters()), allow_unused=True)
    seen: dict[str, torch.dtype] = {}
    experts = model.model.layers[-1].mlp.experts
    run_experts = experts.run_experts

    def recording(tokens, counts):
        result = run_experts(tokens, counts)
        seen["experts"] = result.dtype
        return result

    experts.run_experts = recording
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
        indices, weights, scores = model.model.layers[-1].mlp.gate(torch.randn(3, config.hidden_size))
    del experts.run_experts
    assert seen["experts"] == torch.bfloat16
    assert scores.dtype == torch.float32 and weights.dtype == torch.float32
    assert out.loss.dtype == torch.float32 and out.mtp_loss.dtype == torch.float32
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    # bf16 rounding of activations: the losses agree to about 1%, the gradients point the same way.
    torch.testing.assert_close(out.lm_loss, reference.lm_loss, rtol=1e-2, atol=0)
    torch.testing.assert_close(out.mtp_loss, reference.mtp_loss, rtol=1e-2, atol=0)
    for (name, param), grad, ref in zip(model.named_parameters(), grads, ref_grads):
        if ref is None:
            continue
        assert grad is not None and grad.dtype == param.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten().double(), ref.flatten().double(), dim=0)
        assert cosine > 0.98, (name, cosine.item())
    expert_grad = grads[[n for n, _ in model.named_parameters()].index("model.layers.1.mlp.experts.gate_up_proj")]
    assert expert_grad.abs().sum() > 0
