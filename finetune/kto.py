"""KTO: preference optimisation from unpaired examples (a completion and whether it is desirable), trl's KTOTrainer.

Data: kto records (prompt, completion, label), or preference pairs with unpair_preferences=true. With LoRA the
reference model is the adapter-disabled policy; full fine-tuning keeps a frozen copy of the initial model.

    python -m finetune.kto --config recipes/tiny/kto/lora.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/single.yaml -m finetune.kto --config ...
"""

from __future__ import annotations

from datasets import Dataset, concatenate_datasets

from .config import KTOStageConfig, RecipeError
from .stage import build_data, build_model, build_tokenizer, parse_stage_args, train_preference_stage
from .trainers import DeepseekKTOTrainer


def unpair(pairs: Dataset, seed: int) -> Dataset:
    """prompt_ids/chosen_ids/rejected_ids -> prompt_ids/completion_ids/label, shuffled so batches mix both labels."""
    rows = [
        pairs.rename_column(name, "completion_ids").remove_columns(other).add_column("label", [label] * len(pairs))
        for name, other, label in (("chosen_ids", "rejected_ids", True), ("rejected_ids", "chosen_ids", False))
    ]
    return concatenate_datasets(rows).shuffle(seed=seed).flatten_indices()


def main(argv: list[str] | None = None) -> None:
    config = parse_stage_args(KTOStageConfig, argv, "kto", __doc__)
    if config.mtp_loss_weight > 0:
        raise RecipeError("mtp_loss_weight: the preference stages do not train the MTP module; set it to 0")
    tokenizer = build_tokenizer(config)
    model = build_model(config)
    if config.unpair_preferences:
        train, evaluation = build_data(config, "dpo", tokenizer, model.config.vocab_size)
        train = unpair(train, config.seed)
        evaluation = None if evaluation is None else unpair(evaluation, config.seed)
    else:
        train, evaluation = build_data(config, "kto", tokenizer, model.config.vocab_size)
    train_preference_stage(DeepseekKTOTrainer, config, model, tokenizer, train, evaluation)


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
