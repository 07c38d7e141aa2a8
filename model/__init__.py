"""The bundled DeepSeek-V3 model: plain single-device torch, HF-checkpoint compatible."""

import os

# Large CPU tensors (the 129K-row logits, embedding and head gradients) are freshly mmapped and page-faulted on every
# step; torch backs allocations of 2 MB and more with transparent huge pages when this is set before torch loads
# (a 66 MB tensor: 37 ms -> 7 ms to allocate and fill here; the demo's cpt step 1.26x faster). THP_MEM_ALLOC_ENABLE=0
# in the environment opts out. See docs/model.md.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .checkpoint import CheckpointError
from .config import PRESETS, ConfigError, DeepseekV3Config, load_config
from .modeling import DeepseekV3ForCausalLM, DeepseekV3Model, DeepseekV3Output

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
    "DeepseekV3Output",
    "load_config",
]
