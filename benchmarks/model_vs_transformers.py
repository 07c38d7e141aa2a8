"""Forward+backward tokens/s and peak memory: our DeepSeek-V3 vs transformers' DeepseekV3ForCausalLM.

    .venv/bin/python benchmarks/model_vs_transformers.py [--steps 6] [--dtypes float32,bfloat16,autocast]

Both models get the same ~135M-parameter config and the same weights (written once to a temporary checkpoint).
Modes: float32 and bfloat16 weights, and autocast (fp32 weights, bf16 autocast: mixed precision, only where the
CPU runs bf16 natively). MFU is the step's model FLOPs (benchmarks/flops.py) over the CPU's measured GEMM peak in
the compute dtype, both measured in this run.
transformers runs with sdpa attention and its grouped_mm experts. Speed: one process holds both models and
alternates their steps, so machine noise hits both alike; the median step of each is reported. Memory: each
model runs alone in its own subprocess (peak RSS sampled every 2 ms during the steps). Prints ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,
    max_position_embeddings=4096,
    rope_scaling={
        "type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 1024,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    rope_theta=10000.0,
)
BATCH, SEQ = 4, 256


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(kind: str, checkpoint: str, dtype_name: str):
    import torch

    dtype = torch.float32 if dtype_name == "autocast" else getattr(torch, dtype_name)
    if kind == "ours":
        from model import DeepseekV3ForCausalLM

        model = DeepseekV3ForCausalLM.from_pretrained(checkpoint, torch_dtype=dtype, progress=False)
    else:
        from transformers import DeepseekV3ForCausalLM

        model = DeepseekV3ForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, attn_implementation="sdpa", experts_implementation="grouped_mm"
        )
    return model.train()


def make_step(model, ids, return_logits: bool = False, autocast: bool = False):
    """One training step's forward+backward. Ours skips returning full logits unless asked (trainers only need
    the loss, whose logits it still computes); transformers always returns them."""
    import torch

    from model import DeepseekV3ForCausalLM

    kwargs = {"return_logits": return_logits} if isinstance(model, DeepseekV3ForCausalLM) else {}

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        model.zero_grad(set_to_none=False)
        return time.perf_counter() - start

    return step


def speed(checkpoint: str, dtype_name: str, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ))
    ours = load("ours", checkpoint, dtype_name)
    autocast = dtype_name == "autocast"
    runs = {
        "transformers": make_step(load("transformers", checkpoint, dtype_name), ids, autocast=autocast),
        "ours": make_step(ours, ids, autocast=autocast),
        "ours+logits": make_step(ours, ids, return_logits=True, autocast=autocast),
    }
    times = {kind: [] for kind in runs}
    for step in runs.values():
        step()  # warm-up
    for _ in range(steps):
        for kind, step in runs.items():
            times[kind].append(step())
    return {kind: statistics.median(t) for kind, t in times.items()}


def worker(kind: str, checkpoint: str, dtype_name: str, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    model = load(kind, checkpoint, dtype_name)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ))
    step = make_step(model, ids, autocast=dtype_name == "autocast")
    step()  # warm-up; also allocates the gradients
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    times = [step() for _ in range(steps)]
    done.set()
    thread.join()
    params = sum(p.numel() for p in model.parameters())
    return dict(
        step_s=statistics.median(times), peak_rss=peak[0], peak_over_weights_and_grads=peak[0] - base, params=params
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtypes", default="float32,bfloat16,autocast")
    parser.add_argument("--worker", choices=["ours", "transformers", "speed"])
    parser.add_argument("--checkpoint")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.worker == "speed":
        print(json.dumps(speed(args.checkpoint, args.dtype, args.steps)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.dtype, args.steps)))
        return

    import torch
    from flops import cpu_peaks, step_flops

    from finetune.hardware import cpu_bf16_native, cpu_description
    from model import DeepseekV3Config, DeepseekV3ForCausalLM

    print(f"CPU: {cpu_description()}")
    peaks = cpu_peaks()
    print(f"GEMM peak (2048^3): fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    dtypes = args.dtypes.split(",")
    if not cpu_bf16_native():
        print("bf16 is emulated on this CPU: the bfloat16 and autocast modes are skipped (minutes per step)")
        dtypes = [d for d in dtypes if d == "float32"]
    flops = step_flops(DeepseekV3Config(**CONFIG), BATCH, SEQ, targets=BATCH * (SEQ - 1))

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**CONFIG))
        model.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        del model
        print(f"config: {params / 1e6:.0f}M parameters, batch {BATCH} x {SEQ} tokens, {args.steps} timed steps")
        print(f"model FLOPs per step {flops / 1e9:.0f} G (benchmarks/flops.py)")
        print(f"{'dtype':>9} {'model':>13} {'step s':>8} {'tokens/s':>9} {'MFU':>5} {'peak RSS MB':>12} {'act. MB':>8}")

        def run(*extra: str) -> dict:
            cmd = [sys.executable, __file__, "--checkpoint", tmp, "--steps", str(args.steps), *extra]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            return json.loads(out.strip().splitlines()[-1])

        for dtype in dtypes:
            peak = peaks["float32" if dtype == "float32" else "bfloat16"] * 1e9
            step_s = run("--worker", "speed", "--dtype", dtype)
            results = {}
            for kind in ("transformers", "ours"):
                results[kind] = r = run("--worker", kind, "--dtype", dtype)
                tps = BATCH * SEQ / step_s[kind]
                mfu = flops / step_s[kind] / peak
                print(
                    f"{dtype:>9} {kind:>13} {step_s[kind]:8.3f} {tps:9.0f} {mfu:5.0%} {r['peak_rss'] / 1e6:12.0f} "
                    f"{r['peak_over_weights_and_grads'] / 1e6:8.0f}"
                )
            ratio = step_s["transformers"] / step_s["ours"]
            print(
                f"{dtype:>9} {'ours+logits':>13} {step_s['ours+logits']:8.3f} {BATCH * SEQ / step_s['ours+logits']:9.0f}"
                f"   (ours also returning the full logits, as transformers does: x"
                f"{step_s['transformers'] / step_s['ours+logits']:.2f})"
            )
            memory = results["ours"]["peak_rss"] / results["transformers"]["peak_rss"]
            print(f"{dtype:>9} ratio ours/transformers: tokens/s x{ratio:.2f}, peak RSS x{memory:.2f}")


if __name__ == "__main__":
    main()
