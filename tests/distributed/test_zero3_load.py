"""ZeRO-3 without expert parallelism loads per rank (#16 item 1): under deepspeed.zero.Init each rank allocates only its
partition, and the checkpoint streams in module by module (rank 0 reads, DeepSpeed broadcasts and re-partitions).
A 1 GB checkpoint on 2 and 4 gloo processes: the weights equal from_pretrained's, and each rank's peak resident
memory during the load stays within its share of the model plus twice the largest tensor (the module being filled is
whole on every rank, and zero.Init materialises each module whole once while building it; rank 0 also holds the
tensor it read) plus a fixed 200 MB: far below the whole model that every rank used to hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import DeepseekV3Config, DeepseekV3ForCausalLM

from .launch import check_ranks

# About 390M parameters (1.6 GB in fp32), most of them in 64 routed experts a layer; the largest tensors are the fused
# expert weights of one layer (134 MB).
# The debug preset's attention and routing shapes, wider and with 64 experts a layer.
CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=512,
    num_hidden_layers=7,
    n_routed_experts=64,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    rope_scaling=None,
)
OVERHEAD = 200 * 2**20
DS_CONFIG = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}


def status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmRSS now, VmHWM its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def load_worker(rank: int, world: int, path: Path, out: Path) -> None:
    import deepspeed

    from finetune.parallel.zero3 import load_zero3_partitioned
    from model import load_config

    deepspeed.init_distributed(dist_backend="gloo")
    config = load_config(path)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the forked rank's peak counts from here
    model = load_zero3_partitioned(DeepseekV3ForCausalLM, path, config, torch.float32, DS_CONFIG, progress=False)
    peak = status("VmHWM") - before
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    sums = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            sums[name] = param.detach().double().sum().item()
    torch.save({"peak": peak, "held": held, "sums": sums}, out / f"load{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_zero3_loads_each_rank_its_partition(tmp_path: Path, world: int) -> None:
    path = tmp_path / "ckpt"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("debug", **CONFIG)).float()
    model.save_pretrained(path, max_shard_size="200MB")
    del model
    reference = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, progress=False)
    total = sum(p.numel() * 4 for p in reference.parameters())
    largest = max(p.numel() * 4 for p in reference.parameters())
    expected = {n: p.detach().double().sum().item() for n, p in reference.named_parameters()}
    assert total > 1e9
    del reference
    check_ranks(load_worker, world, path, tmp_path, timeout=900)
    for rank in range(world):
        result = torch.load(tmp_path / f"load{rank}.pt")
        assert result["sums"].keys() == expected.keys()
        for name, value in expected.items():
            assert result["sums"][name] == pytest.approx(value, rel=1e-9, abs=1e-9), name
        assert result["held"] <= total / world * 1.01  # its partition only
        bound = total / world + (3 if rank == 0 else 2) * largest + OVERHEAD
        assert bound < total * (0.9 if world == 2 else 0.65)  # tells per-rank loading from holding the whole model
        assert result["peak"] <= bound, (rank, result["peak"] / 2**20, bound / 2**20)
        print(
            f"world {world} rank {rank}: peak {result['peak'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, "
            f"model {total / 2**20:.0f} MiB"
        )


def bf16_worker(rank: int, world: int, path: Path, out: Path) -> None:
    import deepspeed

    from finetune.parallel.zero3 import load_zero3_partitioned
    from model import load_config

    deepspeed.init_distributed(dist_backend="gloo")
    model = load_zero3_partitioned(DeepseekV3ForCausalLM, path, load_config(path), torch.bfloat16, DS_CONFIG, False)
    dtypes = {
        "params": {p.ds_tensor.dtype for p in model.parameters()},
        "biases": {m.gate.e_score_correction_bias.dtype for m in model.moe_layers()},
        "bias_values": torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()]),
    }
    torch.save(dtypes, out / f"dtypes{rank}.pt")


def test_zero3_loading_in_bf16_keeps_the_router_bias_fp32(tmp_path: Path) -> None:
    from .common import write_tiny_checkpoint

    path = tmp_path / "ckpt"
    model = write_tiny_checkpoint(path)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.7, 0.7)  # values bf16 cannot hold exactly
    model.save_pretrained(path)
    check_ranks(bf16_worker, 2, path, tmp_path)
    result = torch.load(tmp_path / "dtypes0.pt")
    assert result["params"] == {torch.bfloat16} and result["biases"] == {torch.float32}
    expected = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
    assert torch.equal(result["bias_values"], expected)  # read from the checkpoint without a bf16 round trip
