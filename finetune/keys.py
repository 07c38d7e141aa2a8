"""Every recipe key of every training stage, for `dsv3-finetune <stage> --help` without importing trl (10 s).

The table (finetune/stage_keys.json) is generated from the stage config classes:

    python -m finetune.keys --write      # after changing a config field or upgrading trl / transformers

and tests/finetune/test_cli.py fails when the shipped table differs from the classes.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("stage_keys.json")
# stage -> (config class name, the module whose docstring is the stage's description)
STAGE_CLASSES = {
    "sft": "SFTStageConfig",
    "cpt": "CPTStageConfig",
    "dpo": "DPOStageConfig",
    "kto": "KTOStageConfig",
    "cpo": "CPOStageConfig",
    "orpo": "ORPOStageConfig",
    "esft": "ESFTStageConfig",
}


def _default(f: Any) -> Any:
    from dataclasses import MISSING

    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if value is MISSING:
        return None
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(getattr(value, "value", value))


def _type_name(hint: Any) -> str:
    text = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
    return str(text).replace("typing.", "")


def build_table() -> dict[str, Any]:
    """{stage: {"doc", "ours": [...], "inherited": [...], "inherited_from"}, "data": [...]} from the classes."""
    import importlib
    from dataclasses import fields

    from data_tools.pipeline import DataRecipe

    from . import config as config_module

    table: dict[str, Any] = {}
    for stage, class_name in STAGE_CLASSES.items():
        cls = getattr(config_module, class_name)
        # Ours first: the model and LoRA fields, the stage's own, then the trl defaults we changed.
        order = [*config_module.ModelFields.__annotations__, *vars(cls).get("__annotations__", {})]
        order += list(config_module.StageDefaults.__annotations__)
        rows = {}
        for f in fields(cls):
            if f.init and not f.name.startswith("_"):
                rows[f.name] = {
                    "key": f.name,
                    "type": _type_name(f.type),
                    "default": _default(f),
                    "help": " ".join(str(f.metadata.get("help", "")).split()),
                }
        ours = [rows[name] for name in dict.fromkeys(order) if name in rows]
        inherited = [row for name, row in rows.items() if name not in set(order)]
        trl_bases = [b.__name__ for b in cls.__mro__ if b.__module__.startswith(("trl", "transformers"))]
        doc = importlib.import_module(f"finetune.{stage}").__doc__ or ""
        table[stage] = {"doc": doc.strip(), "ours": ours, "inherited": inherited, "inherited_from": trl_bases}
    table["data"] = [
        {"key": f.name, "type": _type_name(f.type), "default": _default(f), "help": ""} for f in fields(DataRecipe)
    ]
    return table


def _rows(rows: list[dict[str, Any]], prefix: str = "") -> list[str]:
    lines = []
    for row in rows:
        default = json.dumps(row["default"], ensure_ascii=False)
        lines.append(f"  {prefix}{row['key']} ({row['type']}; default {default})")
        if row["help"]:
            lines += textwrap.wrap(row["help"], 110, initial_indent="      ", subsequent_indent="      ")
    return lines


def stage_help(stage: str, table: dict[str, Any] | None = None) -> str:
    """The --help text of a training stage: usage, the stage's docstring as written, then every key."""
    table = table or json.loads(TABLE.read_text(encoding="utf-8"))
    entry = table[stage]
    lines = [
        f"usage: dsv3-finetune {stage} --config RECIPE.yaml [key=value ...]",
        f"       (also: python -m finetune.{stage} ..., accelerate launch -m finetune.{stage} ...)",
        "",
        entry["doc"],
        "",
        "A recipe is flat YAML of the keys below; key=value arguments override it (values read as YAML: 3e-4, true,",
        "[a, b]; data.KEY=value sets the data section).",
        "",
        "keys of this toolkit:",
        *_rows(entry["ours"]),
        "",
        "data section (data_tools.pipeline.DataRecipe; docs/data_tools.md):",
        *_rows(table["data"], "data."),
        "",
        f"keys from trl / transformers ({', '.join(entry['inherited_from'])}):",
        *_rows(entry["inherited"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--write"]:
        TABLE.write_text(json.dumps(build_table(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {TABLE}")
    else:
        print("usage: python -m finetune.keys --write", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
