"""Expert parallelism with plain torch.distributed (gloo): same outputs, gradients and expert counts as one process
on the same global batch, uneven and empty all_to_all splits, each rank reading only its experts' bytes, and a
consolidated checkpoint holding every expert."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from finetune.parallel import (
    ParallelConfigError,
    build_expert_parallel_groups,
    check_ep_size,
    load_expert_parallel,
    save_consolidated,
)
from finetune.parallel.expert_parallel import ExpertParallelMixin
from model import DeepseekV3ForCausalLM
from model.checkpoint import list_checkpoint_files, mtp_shared_copy

from .common import batch, tensor_bytes, training_config, write_tiny_checkpoint
from .launch import check_ranks

EXPERT_KEY = re.compile(r"\.mlp\.experts\.(\d+)\.")
# fp32 throughout; the EP run differs from one process only in summation order (grouped vs padded GEMMs, the
# all-reduce of gradients), so values agree to a few ulps of fp32.
ATOL, RTOL = 2e-6, 1e-4


def skew_router(model: torch.nn.Module) -> None:
    """Bias every router towards experts 0 and 1 (rank 0's with ep_size 2): the other ranks receive no token."""
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias[:2] = 10.0


def reference(model: DeepseekV3ForCausalLM, ids: torch.Tensor, world: int) -> dict:
    """One process: loss = mean over ranks' slices of each slice's loss; logits, grads and global counts."""
    model.zero_grad()
    logits, counts = [], 0
    loss = 0.0
    for rows in ids.chunk(world):
        out = model(input_ids=rows, labels=rows)
        loss = loss + out.loss / world
        logits.append(out.logits.detach())
        counts = counts + model.expert_counts()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"logits": torch.cat(logits), "grads": grads, "counts": counts}


def ep_worker(rank: int, world: int, path: Path, out: Path, ep_size: int) -> None:
    groups = build_expert_parallel_groups(ep_size)
    model, stats = load_expert_parallel(
        DeepseekV3ForCausalLM, path, groups, dtype=torch.float32, config=training_config(path)
    )
    rows = batch(world).chunk(world)[rank]
    results = {"stats": stats}
    for case in ("plain", "skewed"):
        if case == "skewed":
            skew_router(model)
        model.zero_grad()
        output = model(input_ids=rows, labels=rows)
        (output.loss / world).backward()
        grads = {}
        for name, param in model.named_parameters():
            expert = ".mlp.experts." in name
            # Non-expert gradients: data parallel over the world. Expert gradients already hold every rank's
            # tokens routed to them (all_to_all backward): sum over the ranks holding the same experts only.
            dist.all_reduce(param.grad, group=groups.edp_group if expert else None)
            grads[name] = param.grad.clone()
        counts = model.expert_counts()  # this rank's tokens; the trainers sum them once per optimizer step
        dist.all_reduce(counts)
        results[case] = {"logits": output.logits.detach(), "grads": grads, "counts": counts}
    results["offsets"] = {n: m.expert_offset for n, m in model.named_modules() if isinstance(m, ExpertParallelMixin)}
    torch.save(results, out / f"rank{rank}.pt")
    save_consolidated(model, out / "consolidated", groups, max_shard_size="100KB")


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_one_process(tmp_path: Path, world: int) -> None:
    path = tmp_path / "ckpt"
    model = write_tiny_checkpoint(path)
    ids = batch(world)
    expected = {"plain": reference(model, ids, world)}
    skew_router(model)
    expected["skewed"] = reference(model, ids, world)
    assert (expected["skewed"]["counts"][:, 4:] == 0).all()  # rank 1 of each EP group gets nothing

    check_ranks(ep_worker, world, path, tmp_path, 2)

    sizes = tensor_bytes(path)
    expert_bytes = {}
    for key, size in sizes.items():
        match = EXPERT_KEY.search(key)
        if match:
            expert_bytes[int(match.group(1))] = expert_bytes.get(int(match.group(1)), 0) + size
    # The MTP layer's copies of the embedding and head are not read: the model shares the main ones.
    copies = {k for k in sizes if mtp_shared_copy(k, model.config) is not None}
    assert len(copies) == 2
    shared = sum(s for k, s in sizes.items() if not EXPERT_KEY.search(k) and k not in copies)
    per_rank = len(expert_bytes) // 2
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        mine = range((rank % 2) * per_rank, (rank % 2 + 1) * per_rank)
        stats = got["stats"]
        assert stats.experts_read == set(mine)
        assert stats.bytes == shared + sum(expert_bytes[e] for e in mine)  # counted, every tensor read once
        assert stats.expert_bytes == sum(expert_bytes.values()) // 2
        rows = slice(rank * 2, (rank + 1) * 2)
        for case in ("plain", "skewed"):
            ref, ep = expected[case], got[case]
            torch.testing.assert_close(ep["logits"], ref["logits"][rows], atol=ATOL, rtol=RTOL)
            assert torch.equal(ep["counts"], ref["counts"])  # summed over ranks: the global batch's counts
            for name, grad in ep["grads"].items():
                want = ref["grads"][name]
                if ".mlp.experts." in name:
                    want = want[mine.start : mine.stop]
                torch.testing.assert_close(grad, want, atol=ATOL, rtol=RTOL, msg=f"{case} {name}")

    consolidated = tmp_path / "consolidated"
    files = list_checkpoint_files(consolidated)
    original = {k: v for f in set(list_checkpoint_files(path).values()) for k, v in load_file(f).items()}
    merged = {k: v for f in set(files.values()) for k, v in load_file(f).items()}
    assert merged.keys() == original.keys()
    assert len(set(files.values())) > world  # several shards, written by several ranks
    skewed_bias = {k for k in original if k.endswith("e_score_correction_bias")}
    for key in original:
        if key not in skewed_bias:
            assert torch.equal(merged[key], original[key]), key
    reloaded = DeepseekV3ForCausalLM.from_pretrained(consolidated, dtype=torch.float32, progress=False)
    assert reloaded.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8


def test_ep_size_errors_are_one_sentence() -> None:
    with pytest.raises(ParallelConfigError, match="ep_size=3 does not divide the world size 4"):
        check_ep_size(3, 4)
    with pytest.raises(ParallelConfigError, match="ep_size=4 does not divide n_routed_experts=6"):
        check_ep_size(4, 8, 6)
    with pytest.raises(ParallelConfigError, match="launch with torchrun"):
        build_expert_parallel_groups(2)


def collectives_worker(rank: int, world: int, path: Path, out: Path) -> None:
    from finetune.moe import ExpertLoadTracker

    groups = build_expert_parallel_groups(2)
    model, _ = load_expert_parallel(
        DeepseekV3ForCausalLM, path, groups, dtype=torch.float32, config=training_config(path)
    )
    model.train()
    tracker = ExpertLoadTracker(model, gamma=0.01)
    calls = {"forward": 0, "step": 0}
    phase = ["forward"]
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls[phase[0]] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        for step in range(2):
            rows = batch(world, seed=10 + step).chunk(world)[rank]
            for micro in rows.chunk(2):  # two micro-batches a step
                phase[0] = "forward"
                model(input_ids=micro, labels=micro).loss.backward()
            phase[0] = "step"
            tracker.update_bias()
    finally:
        dist.all_reduce = all_reduce
    biases = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
    torch.save({"calls": calls, "biases": biases, "reductions": tracker.reductions}, out / f"calls{rank}.pt")


def test_expert_counts_take_one_collective_per_optimizer_step(tmp_path: Path) -> None:
    """#16 item 5: no all_reduce inside the forward passes (the count hook issued one per MoE layer per forward);
    one per optimizer step, after which every rank holds the same router biases."""
    path = tmp_path / "ckpt"
    write_tiny_checkpoint(path)
    check_ranks(collectives_worker, 2, path, tmp_path)
    results = [torch.load(tmp_path / f"calls{rank}.pt") for rank in range(2)]
    for result in results:
        assert result["calls"] == {"forward": 0, "step": 2} and result["reductions"] == 2
    assert results[0]["biases"].abs().sum() > 0
    torch.testing.assert_close(results[0]["biases"], results[1]["biases"], rtol=0, atol=0)
