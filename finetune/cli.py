"""`python -m finetune <stage> ...`: the stage list, and one-sentence errors instead of tracebacks."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable

STAGES = {
    "sft": "supervised fine-tuning, full or LoRA (recipes/*/sft/)",
    "dpo": "preference optimisation: DPO loss family of trl (sigmoid, ipo, hinge, robust, ...)",
    "kto": "preference optimisation from unpaired examples (desirable or not): KTO, apo_zero_unpaired",
    "cpo": "reference-free preference optimisation: CPO and SimPO (loss_type=simpo)",
    "orpo": "ORPO: SFT and preference in one stage, no reference model",
    "cpt": "continued pre-training on a domain corpus (domain adaptation)",
    "esft_select": "score the routed experts on a domain's data and write ESFT's expert config",
    "esft": "expert-specialised fine-tuning: train only the experts an expert config selects",
    "esft_export": "an ESFT run as a full checkpoint in the base's format (untouched tensors byte for byte) or its experts",
    "chat": "talk to a checkpoint (base, merged, or base + adapter) in the terminal",
    "evaluate": "held-out loss and perplexity, generation on a prompts file, exact match, preference accuracy",
    "demo": "the Base -> SFT -> DPO -> Chat demo on the CPU (make demo)",
    "export": "merge a LoRA adapter into its base checkpoint (bf16, fp8) or save the adapter",
    "plan": "memory and hardware plan for a recipe",
}


# Training stages whose --help is the key table (finetune/keys.py).
STAGE_KEYS = ("sft", "cpt", "dpo", "kto", "cpo", "orpo", "esft")


def available_stages() -> dict[str, str]:
    """The stages whose module exists in this checkout."""
    return {name: text for name, text in STAGES.items() if importlib.util.find_spec(f"finetune.{name}") is not None}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user as it is."""
    from data_tools import DataError
    from model import CheckpointError, ConfigError

    from .config import RecipeError
    from .parallel import UnsafeCheckpointError
    from .trainers import CheckpointWriteError, TrainingDiverged

    return (
        RecipeError,
        DataError,
        ConfigError,
        CheckpointError,
        TrainingDiverged,
        CheckpointWriteError,
        UnsafeCheckpointError,
        FileNotFoundError,
    )


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main; a user error is printed as one line and exits 1."""
    errors = user_errors()
    try:
        main(argv)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    stages = available_stages()
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: dsv3-finetune <stage> --config FILE [key=value ...]  (or python -m finetune <stage> ...)"]
        lines += ["", "stages:"]
        lines += [f"  {name:<9} {text}" for name, text in stages.items()]
        lines += ["", "dsv3-finetune <stage> --help lists a stage's keys with their defaults."]
        print("\n".join(lines))
        return
    if argv[0] in STAGE_KEYS and any(a in ("-h", "--help") for a in argv[1:]):
        from .keys import stage_help

        print(stage_help(argv[0]))  # from the shipped key table: no trl import (10 s)
        return
    if argv[0] not in stages:
        print(f"error: unknown stage {argv[0]!r}; stages: {', '.join(stages)}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(f"finetune.{argv[0]}")
    sys.argv = [f"python -m finetune {argv[0]}", *argv[1:]]
    run_stage(module.main, argv[1:])
