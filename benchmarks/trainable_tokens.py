"""Cost of LoRA trainable tokens on the demo's SFT step: none, finetune.lora's lookup, and peft's own forward.

    python benchmarks/trainable_tokens.py [--steps 30] [--rows 8] [--seq 64]

The demo's model (hidden 128, 3 layers, 8 routed experts, the real 129,280-token vocabulary, random init), LoRA
r=64 on the attention, the 10 chat-token rows of recipes' `lora_trainable_tokens` example in docs/demo.md, fp32,
AdamW(fused): one forward + backward + optimizer step on random token rows (a tenth of them trained tokens), loss
on a fifth of the positions (the demo's SFT rows carry a loss on the answers only). Prints the median step time of each variant and the ratios to the run without trainable tokens
(docs/finetune.md quotes a demo SFT run: 0.24 / 0.26 / 0.32 s a step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune.lora as lora
from finetune.lora import build_lora_config
from model import DeepseekV3Config, DeepseekV3ForCausalLM

TOKENS = [16, 33, 305, 344, 3085, 4054, 6340, 109268, 128803, 128804]  # the demo's 10 chat-only tokens
DEMO = dict(vocab_size=129280, hidden_size=128, moe_intermediate_size=64, intermediate_size=256, num_hidden_layers=3)


def median_step(variant: str, steps: int, rows: int, seq: int) -> float:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("tiny", **DEMO))
    tokens = None if variant == "none" else TOKENS
    peft_model = get_peft_model(model, build_lora_config(model, "attention", r=64, alpha=128, trainable_tokens=tokens))
    lora.TrainableTokensLayer.forward_adapters = (
        lora._peft_trainable_tokens_forward if variant == "peft" else lora._trainable_tokens_forward
    )
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, 1000, (rows, seq), generator=generator)
        trained = torch.rand(rows, seq, generator=generator) < 0.1
        ids[trained] = torch.tensor(TOKENS)[torch.randint(0, len(TOKENS), (int(trained.sum()),), generator=generator)]
        labels = ids.masked_fill(torch.rand(rows, seq, generator=generator) >= 0.2, -100)
        start = time.perf_counter()
        peft_model(input_ids=ids, labels=labels, return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    lora.TrainableTokensLayer.forward_adapters = lora._trainable_tokens_forward
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    results = {v: median_step(v, args.steps, args.rows, args.seq) for v in ("none", "ours", "peft")}
    for variant, seconds in results.items():
        ratio = seconds / results["none"]
        print(f"{variant:5s} {seconds * 1000:7.1f} ms/step  {ratio:.2f}x the step without trainable tokens")
    print(f"peft's forward / ours: {results['peft'] / results['ours']:.2f}x")


if __name__ == "__main__":
    main()
