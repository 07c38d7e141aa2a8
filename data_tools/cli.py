"""python -m data_tools validate|stats|prepare|demo: check, measure and build training data.

python -m data_tools demo data/demo
python -m data_tools validate data/demo/sft.jsonl --max-length 512
python -m data_tools stats recipe.yaml
python -m data_tools prepare recipe.yaml --output out/data
"""

import argparse
import json
import sys
from dataclasses import replace

from data_tools.errors import DataError
from data_tools.pipeline import DataRecipe, build_datasets, load_recipe, save_datasets
from data_tools.sources import SourceSpec
from data_tools.synthetic import save_demo_data


def build_recipe(args: argparse.Namespace) -> DataRecipe:
    """A recipe from a YAML path, or from data paths and flags; flags given override the YAML."""
    if len(args.inputs) == 1 and args.inputs[0].endswith((".yaml", ".yml")):
        recipe = load_recipe(args.inputs[0])
    else:
        recipe = DataRecipe(
            task=args.task or "sft", sources=[SourceSpec(path=p, format=args.format) for p in args.inputs]
        )
    overrides = {
        key: getattr(args, key)
        for key in ("task", "max_length", "num_proc", "tokenizer", "on_too_long")
        if getattr(args, key, None) is not None
    }
    if args.skip_invalid:
        overrides["skip_invalid"] = True
    return replace(recipe, **overrides)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("validate", "check every record; list the bad ones"),
        ("stats", "counts, token lengths, truncation, drops, fill ratio"),
        ("prepare", "build the tokenized (packed) datasets and save them"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("inputs", nargs="+", help="a recipe YAML, or data files/folders")
        command.add_argument("--task", choices=["sft", "dpo", "kto", "cpt"])
        command.add_argument("--format", help="declare the format instead of detecting it")
        command.add_argument("--max-length", type=int)
        command.add_argument("--on-too-long", choices=["error", "drop", "truncate"])
        command.add_argument("--num-proc", type=int)
        command.add_argument("--tokenizer", help="tokenizer folder (default: the packaged DeepSeek-V3 one)")
        command.add_argument("--skip-invalid", action="store_true", help="skip and count bad records")
        command.add_argument("--json", action="store_true", help="print the report as JSON")
        if name == "prepare":
            command.add_argument("--output", required=True, help="folder for train/, eval/ and stats.json")
    demo = commands.add_parser("demo", help="write the demo data (JSONL and a text corpus)")
    demo.add_argument("folder")
    demo.add_argument("--num-train", type=int, default=2000)
    demo.add_argument("--num-eval", type=int, default=200)
    demo.add_argument("--num-preference", type=int, default=500)
    demo.add_argument("--max-operand", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a DataError is printed as one line and exits 1."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            paths = save_demo_data(
                args.folder,
                num_train=args.num_train,
                num_eval=args.num_eval,
                num_preference=args.num_preference,
                max_operand=args.max_operand,
                seed=args.seed,
            )
            print("\n".join(f"{name}: {path}" for name, path in paths.items()))
            return 0
        recipe = build_recipe(args)
        if args.command == "validate":
            recipe = replace(recipe, skip_invalid=True)
        splits, report = build_datasets(recipe, allow_empty=args.command != "prepare")
        if args.command == "prepare":
            save_datasets(splits, report, args.output)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
        if args.command == "validate" and report.skipped:
            print(f"error: {sum(report.skipped.values())} bad records", file=sys.stderr)
            return 1
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
