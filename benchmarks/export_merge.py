"""Streamed LoRA merge (finetune.export) against peft's load-all-then-merge_and_unload, peak RSS and MB/s.

    .venv/bin/python benchmarks/export_merge.py [--gb 3] [--shard-mb 500] [--fp8] [--keep DIR]

Writes a multi-shard BF16 DeepSeek-V3-architecture checkpoint of about --gb GB (random weights, real key layout,
MTP layer included) and a rank-16 LoRA adapter on attention, shared experts and the dense MLP, then runs each
approach in its own subprocess so each peak RSS (ru_maxrss) is its own:
- streamed: export_merged(base, adapter, out, "bf16"); with --fp8 also the BF16 -> FP8 converter (quantizes every
  weight) and an FP8 merge from that FP8 base (re-quantizes only the touched weights), with delta survival;
- naive: DeepseekV3ForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained.
Target for the streamed merge: peak RSS <= 2 x the largest shard + the adapter.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import DeepseekV3Config, DeepseekV3ForCausalLM
from model.checkpoint import INDEX_NAME, iter_hf_state

REPO = Path(__file__).resolve().parents[1]


def bench_config(gb: float) -> DeepseekV3Config:
    """A V3-shaped config whose BF16 checkpoint is about `gb` GB (the number of MoE layers scales with it)."""
    hidden, inter, experts = 1024, 512, 64
    per_moe_layer = 2 * (3 * experts * inter * hidden + 3 * inter * hidden + 4 * hidden * hidden)
    fixed = 2 * 4 * 32000 * hidden  # embeddings and heads of the model and of the MTP layer
    layers = max(2, round((gb * 1e9 - fixed) / per_moe_layer) - 1)  # one more MoE block is the MTP layer
    return DeepseekV3Config(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=2816,
        moe_intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
        rope_scaling=None,
        dtype="bfloat16",
    )


def write_base(path: Path, config: DeepseekV3Config, shard_bytes: int) -> tuple[int, int]:
    """Random BF16 checkpoint in the HF layout, one shard in memory at a time; returns (total, largest shard) bytes."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    weight_map, largest, total = {}, 0, 0

    def flush() -> None:
        nonlocal current, size, largest
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in current})
        shards.append(name)
        largest = max(largest, size)
        current, size = {}, 0

    for key, meta in iter_hf_state(model):
        # The router and its bias stay fp32, as in the official checkpoint; everything else is BF16.
        dtype = torch.float32 if key.endswith(("mlp.gate.weight", "e_score_correction_bias")) else torch.bfloat16
        tensor = (torch.randn(meta.shape, generator=generator) * 0.02).to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[key] = tensor
        size += nbytes
        total += nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)
    return total, largest


def write_adapter(path: Path, config: DeepseekV3Config, rank: int = 16) -> int:
    """A peft LoRA adapter (attention, shared experts, dense MLP of every decoder layer) as PeftModel saves it."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    wanted = ("self_attn.", "shared_experts.", "layers.0.mlp.")
    tensors, targets = {}, []
    generator = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(w in name for w in wanted) and ".mtp." not in name:
            targets.append(name)
            out_features, in_features = module.weight.shape
            a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16)
            b = torch.randn(out_features, rank, generator=generator) * 1e-3
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    adapter_config.update({"task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return (path / "adapter_model.safetensors").stat().st_size


# VmHWM, not ru_maxrss: Linux carries ru_maxrss of the forking parent across exec, VmHWM belongs to this process.
PEAK = """
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

STREAMED = (
    PEAK
    + """
import json, sys, time
from finetune.export import export_merged
baseline = peak()
start = time.perf_counter()
result = export_merged(sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4], progress=False)
kept = sorted(s.kept for s in result.fp8.values())
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": result.bytes_written, "baseline": baseline,
                  "kept": [kept[0], kept[len(kept) // 2]] if kept else None,
                  "peak_rss": peak()}))
"""
)

NAIVE = (
    PEAK
    + """
import json, sys, time
import peft.utils.transformers_weight_conversion as conversion
import torch
from peft import PeftModel
from model import DeepseekV3ForCausalLM
# peft would otherwise move the shared experts' LoRA onto the routed experts (REFERENCE.md, known traps).
conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
baseline = peak()
start = time.perf_counter()
model = DeepseekV3ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, progress=False)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="500MB")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "baseline": baseline,
                  "peak_rss": peak()}))
"""
)


def run(script: str, *args: str) -> dict:
    """Run one approach in a fresh interpreter; its last stdout line is a JSON summary."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="checkpoint size in GB (default 3)")
    parser.add_argument("--shard-mb", type=int, default=500, help="shard size in MB (default 500)")
    parser.add_argument("--fp8", action="store_true", help="also time the BF16 -> FP8 converter and an FP8 merge")
    parser.add_argument("--no-naive", action="store_true", help="skip the load-all baseline (it needs the RAM)")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="export-bench-"))
    try:
        config = bench_config(args.gb)
        start = time.perf_counter()
        total, largest = write_base(work / "base", config, args.shard_mb * 10**6)
        adapter = write_adapter(work / "adapter", config)
        shards = len(list((work / "base").glob("*.safetensors")))
        print(
            f"base: {total / 1e9:.2f} GB in {shards} shards (largest {largest / 1e6:.0f} MB), "
            f"{config.num_hidden_layers} layers + MTP; adapter {adapter / 1e6:.1f} MB; "
            f"written in {time.perf_counter() - start:.0f} s"
        )
        target = 2 * largest + adapter
        results = {}
        results["streamed bf16 merge"] = run(
            STREAMED, str(work / "base"), str(work / "adapter"), str(work / "o"), "bf16"
        )
        shutil.rmtree(work / "o")
        if args.fp8:
            results["converter bf16 -> fp8"] = run(STREAMED, str(work / "base"), "", str(work / "base-fp8"), "fp8")
            results["streamed fp8 merge (fp8 base)"] = run(
                STREAMED, str(work / "base-fp8"), str(work / "adapter"), str(work / "o"), "fp8"
            )
            shutil.rmtree(work / "o")
        if not args.no_naive:
            results["naive peft merge_and_unload"] = run(
                NAIVE, str(work / "base"), str(work / "adapter"), str(work / "n")
            )
            shutil.rmtree(work / "n")
        # Peak RSS counts the interpreter with torch/transformers/peft imported (~0.5 GB); the work's own memory is
        # the peak above that baseline, which is what the target is about.
        print(f"{'approach':<30} {'peak RSS':>9} {'above imports':>14} {'x largest shard':>16} {'s':>7} {'MB/s':>6}")
        for label, r in results.items():
            r["work"] = r["peak_rss"] - r["baseline"]
            mb_s = (r.get("bytes") or total) / 1e6 / r["seconds"]
            print(
                f"{label:<30} {r['peak_rss'] / 1e9:>7.2f}GB {r['work'] / 1e9:>12.2f}GB "
                f"{r['work'] / largest:>16.2f} {r['seconds']:>7.1f} {mb_s:>6.0f}"
            )
        for label, r in results.items():
            if r.get("kept"):
                print(
                    f"{label}: LoRA delta kept by FP8 re-quantization: min {r['kept'][0]:.3f}, median {r['kept'][1]:.3f}"
                )
        streamed = results["streamed bf16 merge"]
        verdict = "meets" if streamed["work"] <= target else "MISSES"
        print(f"target 2 x largest shard + adapter = {target / 1e9:.2f} GB above imports: streamed bf16 {verdict} it")
        if "naive peft merge_and_unload" in results:
            naive = results["naive peft merge_and_unload"]
            print(
                f"streamed / naive: memory above imports {streamed['work'] / naive['work']:.2f}x, "
                f"time {streamed['seconds'] / naive['seconds']:.2f}x"
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
