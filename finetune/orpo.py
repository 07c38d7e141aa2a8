"""ORPO with trl's ORPOTrainer: SFT and preference in one stage, no reference model.

loss = NLL of prompt + chosen (token mean, as trl and the ORPO authors' code) - beta * mean log-sigmoid(log odds
ratio of the length-normalised chosen and rejected log-probs).

    python -m finetune.orpo --config recipes/tiny/orpo/lora.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/single.yaml -m finetune.orpo --config ...
"""

from __future__ import annotations

from .config import ORPOStageConfig, RecipeError
from .stage import build_data, build_model, build_tokenizer, parse_stage_args, train_preference_stage
from .trainers import DeepseekORPOTrainer


def main(argv: list[str] | None = None) -> None:
    config = parse_stage_args(ORPOStageConfig, argv, "orpo", __doc__)
    if config.mtp_loss_weight > 0:
        raise RecipeError("mtp_loss_weight: the preference stages do not train the MTP module; set it to 0")
    tokenizer = build_tokenizer(config)
    model = build_model(config)
    train, evaluation = build_data(config, "dpo", tokenizer, model.config.vocab_size)
    train_preference_stage(DeepseekORPOTrainer, config, model, tokenizer, train, evaluation)


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
