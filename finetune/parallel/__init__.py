"""Scale-out applied from outside the model: expert parallelism, ZeRO-3 placement, sharded checkpoints."""

from .checkpoint import ReadStats, load_expert_parallel, load_local_state, save_consolidated
from .expert_parallel import (
    ALL_TO_ALL_STATS,
    all_to_all_rows,
    apply_expert_parallel,
    apply_global_expert_counts,
    apply_local_fp8,
)
from .groups import (
    ExpertParallelGroups,
    ParallelConfigError,
    build_expert_parallel_groups,
    check_ep_size,
    register_with_deepspeed,
)
from .zero3 import (
    UnsafeCheckpointError,
    check_deepspeed_checkpoint,
    init_distributed_cpu_aware,
    mark_expert_parameters,
    prepare_zero3_expert_parallel,
    prepare_zero3_reference,
    weights_only_checkpoint_engine,
    zero3_config,
)

__all__ = [
    "ALL_TO_ALL_STATS",
    "ExpertParallelGroups",
    "ParallelConfigError",
    "ReadStats",
    "UnsafeCheckpointError",
    "all_to_all_rows",
    "apply_expert_parallel",
    "apply_global_expert_counts",
    "apply_local_fp8",
    "build_expert_parallel_groups",
    "check_deepspeed_checkpoint",
    "check_ep_size",
    "init_distributed_cpu_aware",
    "mark_expert_parameters",
    "prepare_zero3_expert_parallel",
    "prepare_zero3_reference",
    "weights_only_checkpoint_engine",
    "zero3_config",
    "load_expert_parallel",
    "load_local_state",
    "register_with_deepspeed",
    "save_consolidated",
]
