"""Expert parallelism applied from outside the model: each rank keeps E / ep_size routed experts; tokens travel.

`apply_expert_parallel` slices every MoE layer's fused experts down to this rank's block and swaps the experts
module's class for a subclass whose forward dispatches (token, expert) pairs to the rank owning the expert with
one uneven all_to_all, runs the original class's `run_experts` (plain, FP8-frozen or FP8-training experts alike),
and sends the results back with a second all_to_all (both differentiable). Router, shared experts, bias and
balance loss are untouched: every rank routes its own tokens with the full router. Parameter names stay
`mlp.experts.gate_up_proj` / `down_proj` (shape [E / ep_size, ...]), so checkpoints map as before plus an offset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.fp8 import FP8_DTYPE
from model.moe import MoE, RoutedExperts

from .groups import ExpertParallelGroups, ParallelConfigError


@dataclass
class CommStats:
    """Wall time and calls spent in the expert all_to_alls (forward and backward); the benchmark reads it."""

    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


ALL_TO_ALL_STATS = CommStats()


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    start = time.perf_counter()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    # gloo fails on uneven list-form all_to_all but handles all_to_all_single with uneven splits.
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    ALL_TO_ALL_STATS.seconds += time.perf_counter() - start
    ALL_TO_ALL_STATS.calls += 1
    return out


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all of rows; its gradient is the reverse all_to_all."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send rows of x [sum(in_splits), ...] to the ranks of `group` (in_splits[r] rows to rank r); differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelMixin:
    """Forward of fused routed experts when this rank holds experts [expert_offset, expert_offset + num_experts)."""

    ep_group: dist.ProcessGroup | None
    ep_size: int
    num_global_experts: int
    expert_offset: int

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], global expert indices/weights [N, K] -> sum_k weights * expert_k(x) [N, H]."""
        num_tokens, top_k = indices.shape
        local = self.num_experts
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)  # [N*K], pairs grouped by global expert, hence by owning rank
        counts = torch.bincount(flat, minlength=self.num_global_experts)  # [E]
        send_counts = counts.view(self.ep_size, local)  # [ep, E_local]: pairs for each rank's experts
        recv_counts = torch.empty_like(send_counts)  # [ep, E_local]: from each rank, for my experts
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.ep_group)
        in_splits, out_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = all_to_all_rows(x[order // top_k], out_splits, in_splits, self.ep_group)  # [R, H] by (src, e)
        expert_of_row = torch.arange(local, device=x.device).repeat(self.ep_size)  # [ep * E_local]
        expert_of_row = expert_of_row.repeat_interleave(recv_counts.reshape(-1))  # [R]
        by_expert = expert_of_row.argsort(stable=True)  # (src, e) order -> (e, src) order
        out = self.run_experts(received[by_expert], recv_counts.sum(0))  # [R, H]
        back = torch.empty_like(out).index_copy(0, by_expert, out)  # (src, e) order again
        out = all_to_all_rows(back, in_splits, out_splits, self.ep_group)  # [N*K, H] in `order`
        out = out * weights.reshape(-1)[order].unsqueeze(-1)
        unsorted = torch.empty_like(out).index_copy(0, order, out)
        return unsorted.view(num_tokens, top_k, -1).sum(1).to(x.dtype)

    def extra_repr(self) -> str:
        first = self.expert_offset
        return f"experts [{first}, {first + self.num_experts}) of {self.num_global_experts}, ep_size={self.ep_size}"


_EP_CLASSES: dict[type, type] = {}


def _ep_class(cls: type) -> type:
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallelMixin, cls), {})
    return _EP_CLASSES[cls]


def _slice_experts(module: RoutedExperts, experts: range) -> None:
    """Keep only `experts` of every tensor whose first dimension is the expert index (weights and FP8 scales)."""
    for store in (module._parameters, module._buffers):
        for name, tensor in list(store.items()):
            if tensor is None or tensor.dim() == 0 or tensor.shape[0] != module.num_experts:
                continue
            if tensor.is_meta:
                piece = torch.empty((len(experts), *tensor.shape[1:]), dtype=tensor.dtype, device="meta")
            else:
                piece = tensor.detach()[experts.start : experts.stop].clone()  # frees the other ranks' experts
            if isinstance(tensor, nn.Parameter):
                piece = nn.Parameter(piece, requires_grad=tensor.requires_grad)
            store[name] = piece


def apply_expert_parallel(model: nn.Module, groups: ExpertParallelGroups) -> list[str]:
    """Keep this rank's routed experts in every MoE layer and make their forward expert parallel; returns names.

    Works on a meta-device model (before allocation, so the full experts never exist) or on a loaded one.
    """
    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        if isinstance(experts, ExpertParallelMixin):
            continue
        if not isinstance(experts, RoutedExperts):
            raise ParallelConfigError(
                f"{name}.experts is a {type(experts).__name__}: expert parallelism needs the fused routed experts "
                "(LoRA on routed experts is not supported with ep_size > 1)"
            )
        total = experts.num_experts
        if total % groups.ep_size:
            raise ParallelConfigError(f"ep_size={groups.ep_size} does not divide n_routed_experts={total}")
        mine = groups.local_experts(total)
        _slice_experts(experts, mine)
        experts.__class__ = _ep_class(type(experts))
        experts.num_experts = len(mine)
        experts.num_global_experts = total
        experts.expert_offset = mine.start
        experts.ep_size = groups.ep_size
        experts.ep_group = groups.ep_group
        changed.append(f"{name}.experts")
    return changed


def apply_global_expert_counts(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Name the process group over which the router-bias update sums expert counts (default: every rank).

    The aux-loss-free bias update (finetune.moe.ExpertLoadTracker) sums each optimizer step's counts over this
    group in one all_reduce: they are the global batch's counts, so every rank applies the same update and the
    biases never drift apart. (It used to all_reduce every MoE layer's counts after every forward: about 58
    collectives a micro-batch on the 671B model, and again in activation-checkpoint recompute.)
    """
    for module in model.modules():
        if isinstance(module, MoE) and not hasattr(module, "count_group"):
            module.count_group = group


# ---------------------------------------------------------------------------------------------------------------
# Frozen FP8 tensors stay local


class LocalFP8Mixin:
    """Keeps a module's frozen FP8 codes and scales as buffers, so ZeRO-3 neither partitions nor casts them.

    Device moves still apply; dtype casts never do (a cast would turn e4m3 codes into plain numbers).
    """

    local_fp8_names: tuple[str, ...]

    def _apply(self, fn, recurse=True):
        hidden = {}
        for name in self.local_fp8_names:
            tensor = self._buffers.pop(name)
            target = fn(torch.empty(0, device=tensor.device)).device
            if tensor.device != target:
                tensor = torch.empty_like(tensor, device=target) if tensor.is_meta else tensor.to(target)
            hidden[name] = tensor
        try:
            return nn.Module._apply(self, fn, recurse)  # the FP8 class's own _apply expects FP8 parameters
        finally:
            self._buffers.update(hidden)


_LOCAL_CLASSES: dict[type, type] = {}


def apply_local_fp8(model: nn.Module) -> list[str]:
    """Turn every frozen FP8 parameter (and its `_scale_inv`) into a buffer; returns the module names.

    For the sliced FP8 experts this keeps each rank's experts on that rank with no float8 collective; other FP8
    weights (attention, shared and dense MLPs) are replicated, 1 byte per weight.
    """
    changed = []
    for name, module in model.named_modules():
        fp8 = [n for n, p in module._parameters.items() if p is not None and p.dtype == FP8_DTYPE]
        if not fp8:
            continue
        if any(module._parameters[n].requires_grad for n in fp8):
            raise ParallelConfigError(f"{name}: FP8 weights must be frozen to stay local")
        names = tuple(fp8) + tuple(f"{n}_scale_inv" for n in fp8 if f"{n}_scale_inv" in module._parameters)
        for n in names:
            module.register_buffer(n, module._parameters.pop(n).detach())
        cls = type(module)
        if cls not in _LOCAL_CLASSES:
            _LOCAL_CLASSES[cls] = type(f"Local{cls.__name__}", (LocalFP8Mixin, cls), {})
        module.__class__ = _LOCAL_CLASSES[cls]
        module.local_fp8_names = names
        changed.append(name)
    return changed
