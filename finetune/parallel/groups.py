"""Process groups for expert parallelism: EP groups (ranks that split the experts) and expert-data-parallel groups.

Layout as DeepSpeed's default (`deepspeed.utils.groups._create_expert_and_data_parallel`): EP groups are runs of
consecutive ranks ([0, 1], [2, 3] for ep_size 2 on 4 ranks), so an EP group stays inside a node when ep_size
divides the GPUs per node; expert-data-parallel (EDP) groups hold the ranks with the same EP rank ([0, 2], [1, 3]).
Every other parameter is data parallel over the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work (e.g. ep_size not dividing the world or the experts)."""


@dataclass
class ExpertParallelGroups:
    """This rank's place in the EP x EDP layout."""

    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup | None
    edp_size: int
    edp_rank: int
    edp_group: dist.ProcessGroup | None
    world_size: int
    rank: int

    @property
    def name(self) -> str:
        """The name DeepSpeed's group registry knows these groups by."""
        return f"ep_size_{self.ep_size}"

    def local_experts(self, num_experts: int) -> range:
        """The global indices of the routed experts this rank holds (a contiguous block)."""
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


def check_ep_size(ep_size: int, world_size: int, num_experts: int | None = None) -> None:
    """Raise ParallelConfigError when ep_size does not divide the world size or the number of routed experts."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ParallelConfigError(f"ep_size={ep_size!r} must be a positive integer")
    if world_size % ep_size:
        raise ParallelConfigError(f"ep_size={ep_size} does not divide the world size {world_size}")
    if num_experts is not None and num_experts % ep_size:
        raise ParallelConfigError(f"ep_size={ep_size} does not divide n_routed_experts={num_experts}")


def build_expert_parallel_groups(ep_size: int, num_experts: int | None = None) -> ExpertParallelGroups:
    """Create the EP and EDP groups on the initialized default process group (collective: every rank calls it)."""
    if not dist.is_initialized():
        raise ParallelConfigError("expert parallelism needs torch.distributed initialized (launch with torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    check_ep_size(ep_size, world, num_experts)
    ep_group = edp_group = None
    # new_group is collective over the world: every rank creates every group, in the same order.
    for start in range(0, world, ep_size):
        ranks = list(range(start, start + ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for offset in range(ep_size):
        ranks = list(range(offset, world, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return ExpertParallelGroups(
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        ep_group=ep_group,
        edp_size=world // ep_size,
        edp_rank=rank // ep_size,
        edp_group=edp_group,
        world_size=world,
        rank=rank,
    )


def register_with_deepspeed(groups: ExpertParallelGroups) -> None:
    """Put our groups into DeepSpeed's registry under `ep_size_{n}`: its ZeRO-3 partitioning, gradient averaging
    and model broadcast look expert parameters' groups up there by their group_name."""
    from deepspeed.utils import groups as ds_groups

    ep_ranks = list(range(groups.rank - groups.ep_rank, groups.rank - groups.ep_rank + groups.ep_size))
    edp_ranks = list(range(groups.ep_rank, groups.world_size, groups.ep_size))
    ds_groups._EXPERT_PARALLEL_GROUP[groups.name] = groups.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[groups.name] = ep_ranks
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[groups.name] = groups.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[groups.name] = edp_ranks
