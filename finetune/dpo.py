"""Preference optimisation with trl's DPO losses (sigmoid, ipo, hinge, robust, SimPO-style apo/... via loss_type).

With LoRA the reference model is the adapter-disabled policy: no second copy of the weights.

    python -m finetune.dpo --config recipes/tiny/dpo/lora.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/single.yaml -m finetune.dpo --config ...
"""

from __future__ import annotations

from .config import DPOStageConfig
from .stage import build_data, build_model, build_tokenizer, parse_stage_args, train_preference_stage
from .trainers import DeepseekDPOTrainer


def main(argv: list[str] | None = None) -> None:
    config = parse_stage_args(DPOStageConfig, argv, "dpo", __doc__)
    tokenizer = build_tokenizer(config)
    model = build_model(config)
    train, evaluation = build_data(config, "dpo", tokenizer, model.config.vocab_size)
    train_preference_stage(DeepseekDPOTrainer, config, model, tokenizer, train, evaluation)


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
