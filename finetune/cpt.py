"""Continued pre-training (domain adaptation) on raw text: every token trained, full weights by default.

python -m finetune.cpt --config recipes/tiny/cpt/full.yaml [key=value ...]
accelerate launch --config_file recipes/accelerate/single.yaml -m finetune.cpt --config ...
"""

from __future__ import annotations

from data_tools import DataCollator

from .config import CPTStageConfig
from .stage import (
    apply_lora,
    build_data,
    build_model,
    build_tokenizer,
    loss_callbacks,
    parse_stage_args,
    train_and_save,
)
from .trainers import DeepseekSFTTrainer, trainer_kwargs


def main(argv: list[str] | None = None) -> None:
    config = parse_stage_args(CPTStageConfig, argv, "cpt", __doc__)
    tokenizer = build_tokenizer(config)
    model = build_model(config)
    train, evaluation = build_data(config, "cpt", tokenizer, model.config.vocab_size)
    if config.use_lora:
        model = apply_lora(model, config)
    trainer = DeepseekSFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollator(pad_id=tokenizer.eos_token_id),
        processing_class=tokenizer,
        callbacks=loss_callbacks(config),
        **trainer_kwargs(config),
    )
    train_and_save(trainer, config)


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
