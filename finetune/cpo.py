"""Reference-free preference optimisation with trl's CPOTrainer: CPO (sigmoid, hinge, ipo + cpo_alpha * NLL of the
chosen answer) and SimPO (loss_type=simpo, cpo_alpha=0: length-normalised margin minus simpo_gamma / beta).

No reference model: one forward per pair (chosen and rejected rows together), LoRA or full.

    python -m finetune.cpo --config recipes/tiny/cpo/simpo.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/single.yaml -m finetune.cpo --config ...
"""

from __future__ import annotations

from .config import CPOStageConfig, RecipeError
from .stage import build_data, build_model, build_tokenizer, parse_stage_args, train_preference_stage
from .trainers import DeepseekCPOTrainer


def main(argv: list[str] | None = None) -> None:
    config = parse_stage_args(CPOStageConfig, argv, "cpo", __doc__)
    if config.mtp_loss_weight > 0:
        raise RecipeError("mtp_loss_weight: the preference stages do not train the MTP module; set it to 0")
    tokenizer = build_tokenizer(config)
    model = build_model(config)
    train, evaluation = build_data(config, "dpo", tokenizer, model.config.vocab_size)
    train_preference_stage(DeepseekCPOTrainer, config, model, tokenizer, train, evaluation)


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
