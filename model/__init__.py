"""The bundled DeepSeek-V3 model: plain single-device torch, HF-checkpoint compatible."""

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
