"""Continued pre-training (domain adaptation) on raw text: every token trained, full weights by default.

python -m finetune.cpt --config recipes/tiny/cpt/full.yaml [key=value ...]
accelerate launch --config_file recipes/accelerate/single.yaml -m finetune.cpt --config ...
"""

from __future__ import annotations

from .config import CPTStageConfig
from .stage import train_lm_stage


def main(argv: list[str] | None = None) -> None:
    train_lm_stage(CPTStageConfig, "cpt", argv, __doc__)


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
