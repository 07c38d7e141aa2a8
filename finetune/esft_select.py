"""Score the routed experts on a domain's data and write ESFT's expert config.

python -m finetune.esft_select --config RECIPE [--score token|gate] [--top-p 0.2] [--tokens 131072] [--out FILE]
    [--shared-experts] [--non-expert-modules] [key=value ...]

RECIPE is the ESFT (or SFT) recipe: its model and its data section. The frozen model runs over the data until
--tokens tokens have been seen (the paper: 131,072), both scores are computed per MoE layer, and the experts whose
--score adds up to --top-p per layer are written as {"experts": ..., "shared_experts": ..., "non_expert_modules": ...}
with the scores beside it (FILE.scores.json). See finetune/esft.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.esft_select", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the ESFT/SFT recipe YAML (model and data)")
    parser.add_argument("--score", choices=["token", "gate"], default="token", help="token selection ratio or gate")
    parser.add_argument("--top-p", type=float, default=0.2, help="share of a layer's score to cover (0.1-0.2)")
    parser.add_argument("--tokens", type=int, default=131_072, help="tokens of the data to score on")
    parser.add_argument("--out", default="expert_cfg.json", help="where to write the expert config")
    parser.add_argument("--shared-experts", action="store_true", help="train the shared experts too")
    parser.add_argument("--non-expert-modules", action="store_true", help="train every non-expert module too")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args(argv)
    from data_tools import DataCollator

    from .config import ESFTStageConfig, RecipeError, fail, load_stage_config
    from .esft import expert_scores, select_experts, write_expert_config
    from .stage import build_data, build_model, build_tokenizer, cpu_backend_overrides

    try:
        config = load_stage_config(ESFTStageConfig, args.config, cpu_backend_overrides(args.overrides))
        tokenizer = build_tokenizer(config)
        model = build_model(config)
        train, _ = build_data(config, "sft", tokenizer, model.config.vocab_size)
        collate = DataCollator(pad_id=tokenizer.eos_token_id)
        size = max(1, config.per_device_train_batch_size)
        batches = (collate([train[i] for i in range(s, min(s + size, len(train)))]) for s in range(0, len(train), size))
        scores = expert_scores(model, batches, max_tokens=args.tokens)
        experts = select_experts(scores[args.score], args.top_p)
    except RecipeError as err:
        fail(str(err))
    out = Path(args.out)
    write_expert_config(out, experts, args.shared_experts, args.non_expert_modules)
    detail = {kind: {str(k): [round(float(x), 6) for x in v] for k, v in s.items()} for kind, s in scores.items()}
    out.with_suffix(".scores.json").write_text(json.dumps(detail) + "\n")
    chosen = sum(len(v) for v in experts.values())
    total = sum(len(v) for v in scores[args.score].values())
    print(f"esft_select: {chosen} of {total} routed experts ({args.score} score, top_p {args.top_p}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
