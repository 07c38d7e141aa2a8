"""Expert-parallel scaling on CPU: tokens/s of forward+backward for 1, 2 and 4 processes (EP = processes, gloo),
and the share of step time spent in the expert all_to_alls.

    python benchmarks/ep_scaling.py [--steps 4] [--seq 256] [--batch 2]

Each process gets the same micro-batch (weak scaling), so ideal scaling is N x the one-process tokens/s; on a
machine with fewer cores than processes the ratio shows contention, not the method.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package holds the local launcher

from finetune.parallel import (
    ALL_TO_ALL_STATS,
    apply_global_expert_counts,
    build_expert_parallel_groups,
    load_expert_parallel,
)
from model import DeepseekV3Config, DeepseekV3ForCausalLM
from tests.distributed.launch import check_ranks

CONFIG = dict(vocab_size=8192, hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4)


def worker(rank: int, world: int, path: Path, out: Path, steps: int, batch: int, seq: int) -> None:
    groups = build_expert_parallel_groups(world)
    model, _ = load_expert_parallel(DeepseekV3ForCausalLM, path, groups, dtype=torch.float32)
    model.train()
    apply_global_expert_counts(model)
    generator = torch.Generator().manual_seed(rank)
    times, comm = [], []
    for step in range(steps + 1):  # the first step warms up
        rows = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=generator)
        ALL_TO_ALL_STATS.reset()
        torch.distributed.barrier()
        start = time.perf_counter()
        model(input_ids=rows, labels=rows, return_logits=False).loss.backward()
        torch.distributed.barrier()
        if step:
            times.append(time.perf_counter() - start)
            comm.append(ALL_TO_ALL_STATS.seconds)
    torch.save({"time": sum(times) / steps, "comm": sum(comm) / steps}, out / f"rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--procs", default="1,2,4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        torch.manual_seed(0)
        DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("tiny", **CONFIG)).save_pretrained(path)
        base = None
        print(f"{'procs':>5} {'tokens/s':>10} {'vs 1':>6} {'step s':>7} {'all_to_all share':>17}")
        for world in [int(p) for p in args.procs.split(",")]:
            out = Path(tmp) / f"run{world}"
            out.mkdir()
            check_ranks(worker, world, path, out, args.steps, args.batch, args.seq)
            results = [torch.load(out / f"rank{r}.pt") for r in range(world)]
            step = max(r["time"] for r in results)
            share = sum(r["comm"] for r in results) / sum(r["time"] for r in results)
            tokens = world * args.batch * args.seq / step
            base = base or tokens
            print(f"{world:>5} {tokens:>10.0f} {tokens / base:>5.2f}x {step:>7.3f} {share:>16.1%}")


if __name__ == "__main__":
    main()
