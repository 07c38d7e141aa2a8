"""Supervised fine-tuning, full or LoRA, on packed chat data.

python -m finetune.sft --config recipes/tiny/sft/lora.yaml [key=value ...]
accelerate launch --config_file recipes/accelerate/single.yaml -m finetune.sft --config ...
"""

from __future__ import annotations

from .config import SFTStageConfig
from .stage import train_lm_stage


def main(argv: list[str] | None = None) -> None:
    train_lm_stage(SFTStageConfig, "sft", argv, __doc__)


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
