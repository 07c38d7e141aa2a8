"""Tokens/s of one SFT LoRA step: our stack vs trl + transformers' DeepseekV3ForCausalLM, same config/data/settings.

    python benchmarks/train_step.py [--preset debug] [--batch 4] [--seq 256] [--steps 5]

Both sides: the same config and weights, LoRA rank 16 on attention + shared experts (exactly the same modules: the
peft deepseek_v3 conversion is disabled for both), fused AdamW, the loss only on the answer half of each row, the
step as each trainer runs it (compute_loss, backward, optimizer step). In fp32, and in bf16 (bf16 base weights,
fp32 adapters, bf16 autocast) where the CPU runs bf16 natively. CPU MFU: the step's model FLOPs (benchmarks/flops.py,
a LoRA step: no weight gradients for the frozen base) over the measured GEMM peak in the compute dtype.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from datasets import Dataset
from flops import cpu_peaks, step_flops  # noqa: E402  (benchmarks/flops.py)
from peft import get_peft_model
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3ForCausalLM
from trl import SFTConfig, SFTTrainer

from data_tools import load_tokenizer
from finetune.config import SFTStageConfig, build_stage_config
from finetune.hardware import cpu_bf16_native, cpu_description
from finetune.lora import build_lora_config, exact_targets
from finetune.trainers import DeepseekSFTTrainer
from model import DeepseekV3Config, DeepseekV3ForCausalLM


def build_batch(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # prompt half not trained
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def time_steps(trainer, model, batch, steps: int, bf16: bool = False) -> float:
    """Seconds per step (after one warm-up step), under bf16 autocast when asked (as Trainer's training_step)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    model.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


def measure(args, dtype_name: str) -> tuple[float, float, DeepseekV3Config]:
    """(ours s/step, trl s/step, config) for one precision: float32, or bfloat16 (bf16 base weights, fp32 LoRA
    adapters as peft makes them, bf16 autocast: the mixed precision `bf16: auto` picks on a native-bf16 CPU)."""
    torch.manual_seed(0)
    config = DeepseekV3Config.from_preset(args.preset)
    ours = DeepseekV3ForCausalLM(config)
    hf = HFDeepseekV3ForCausalLM(config)
    state = {k: v for k, v in ours.state_dict().items() if k in hf.state_dict()}
    hf.load_state_dict(state, strict=False)  # same weights where the layouts agree (not the MTP layer)
    if dtype_name == "bfloat16":
        ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
        for moe in ours.moe_layers():
            moe.gate.float()  # as the stages keep it
    lora = build_lora_config(ours, "both", r=16, alpha=32)
    hf_lora = build_lora_config(ours, "both", r=16, alpha=32)
    ours = get_peft_model(ours, lora)
    with exact_targets(hf_lora):
        hf = get_peft_model(hf, hf_lora)
    tokenizer = load_tokenizer()
    batch = build_batch(args.batch, args.seq, config.vocab_size)
    rows = Dataset.from_dict({"input_ids": batch["input_ids"].tolist()})
    bf16 = dtype_name == "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(output_dir=tmp, report_to="none", bf16=bf16, use_cpu=True)
        our_trainer = DeepseekSFTTrainer(
            model=ours,
            args=build_stage_config(SFTStageConfig, common),
            train_dataset=rows,
            processing_class=tokenizer,
        )
        trl_args = SFTConfig(**common, gradient_checkpointing=False, dataset_kwargs={"skip_prepare_dataset": True})
        trl_trainer = SFTTrainer(model=hf, args=trl_args, train_dataset=rows, processing_class=tokenizer)
        ours_s = time_steps(our_trainer, our_trainer.model, batch, args.steps, bf16)
        trl_s = time_steps(trl_trainer, trl_trainer.model, batch, args.steps, bf16)
    return ours_s, trl_s, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}")
    peaks = cpu_peaks()
    print(f"GEMM peak (2048^3): fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    dtypes = args.dtypes.split(",")
    if not cpu_bf16_native() and "bfloat16" in dtypes:
        print("bf16 is emulated on this CPU: the bfloat16 step is skipped")
        dtypes.remove("bfloat16")
    tokens = args.batch * args.seq
    for dtype_name in dtypes:
        ours_s, trl_s, config = measure(args, dtype_name)
        targets = args.batch * (args.seq - args.seq // 2)  # labels on the answer half (the last one has no next)
        flops = step_flops(
            config, args.batch, args.seq, targets, body_trained=False, head_trained=False, mtp=config.mtp_loss_enabled
        )
        peak = peaks[dtype_name] * 1e9
        precision = "fp32" if dtype_name == "float32" else "bf16 autocast, bf16 base weights, fp32 adapters"
        print(
            f"config {args.preset}, batch {args.batch} x {args.seq}, LoRA r16 attention + shared experts, {precision}"
        )
        print(f"  model FLOPs per step {flops / 1e9:.0f} G (benchmarks/flops.py)")
        print(
            f"  ours (DeepseekSFTTrainer + model/):     {tokens / ours_s:8.0f} tokens/s ({ours_s:.2f} s/step, "
            f"CPU MFU {flops / ours_s / peak:.0%})"
        )
        print(
            f"  trl SFTTrainer + transformers' model:  {tokens / trl_s:8.0f} tokens/s ({trl_s:.2f} s/step, "
            f"CPU MFU {flops / trl_s / peak:.0%})"
        )
        print(f"  ratio: {trl_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
