"""Export an ESFT run: a full checkpoint in the base's format, or the trained experts alone.

python -m finetune.esft_export --base BASE --run RUN --out OUT [--format full|delta] [--overwrite]

full:  the base's shards rewritten with the trained experts (and shared experts / other modules when the expert
       config trained them) in the base's dtype; an FP8 base gets them re-quantized in the official block format
       with fresh scales. Every other tensor is copied from the base byte for byte, and the index and config are the
       base's, so a serving engine loads it as it loads the base.
delta: ESFT's adapter layout: expert_cfg.json and one safetensors file with just the trained tensors under the
       checkpoint's per-expert keys (model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight).

RUN is the ESFT stage's output folder (it holds expert_cfg.json and the trained checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from .esft import read_expert_config
from .export import (
    DTYPES,
    INDEX_NAME,
    ExportError,
    ShardWriter,
    _check_out,
    _publish,
    _remove_stale,
    _staging,
    check_base,
    copy_side_files,
    read_header,
    read_tensor,
    side_file_bytes,
)


def trained_keys(base_keys: list[str], config: dict) -> set[str]:
    """The checkpoint keys an ESFT run trained: its experts' weights, and shared experts / everything else if told."""
    selected = {(layer, expert) for layer, ids in config["experts"].items() for expert in ids}
    keys = set()
    for key in base_keys:
        if key.endswith("_scale_inv"):
            continue
        parts = key.split(".")
        if ".mlp.experts." in key and len(parts) > 5 and parts[5].isdigit():
            if (int(parts[2]), int(parts[5])) in selected:
                keys.add(key)
        elif config["non_expert_modules"] and not key.endswith(".mlp.gate.weight") and "e_score_correction" not in key:
            keys.add(key)
        elif config["shared_experts"] and ".mlp.shared_experts." in key:
            keys.add(key)
    return keys


def export_esft(base: str | Path, run: str | Path, out: str | Path, fmt: str = "full", overwrite: bool = False) -> dict:
    """Write the export; returns {"format", "trained": [keys], "copied": n}."""
    from model.fp8 import quantize_weight

    base, run, out = Path(base), Path(run), Path(out).absolute()
    if fmt not in ("full", "delta"):
        raise ExportError(f"--format must be full or delta, got {fmt!r}")
    config, _, files, base_info = check_base(base)
    if not (run / "expert_cfg.json").is_file():
        raise ExportError(f"{run}: no expert_cfg.json (the ESFT stage writes it into its output folder)")
    expert_config = read_expert_config(run / "expert_cfg.json")
    _, _, run_files, run_info = check_base(run)
    keys = trained_keys(list(base_info), expert_config)
    missing = sorted(k for k in keys if k not in run_info)
    if missing:
        raise ExportError(f"{run}: the run's checkpoint lacks {len(missing)} trained tensors, e.g. {missing[:2]}")
    needed = sum(i.nbytes for i in base_info.values()) if fmt == "full" else sum(run_info[k].nbytes for k in keys)
    _check_out(out, overwrite, needed + side_file_bytes(base), base, run)
    _remove_stale(out)
    staging = _staging(out)
    staging.mkdir(parents=True)
    try:
        if fmt == "delta":
            entries = [(k, run_info[k].dtype, run_info[k].shape, run_info[k].nbytes) for k in sorted(keys)]
            writer = ShardWriter(staging / "model.safetensors", entries)
            for key in sorted(keys):
                writer.copy(run_info[key])
            writer.close()
            shutil.copy2(run / "expert_cfg.json", staging / "expert_cfg.json")
            shutil.copy2(base / "config.json", staging / "config.json")
        else:
            copied = 0
            for file in dict.fromkeys(files.values()):
                names = [k for k, f in files.items() if f == file]
                header = read_header(file)
                order = sorted(names, key=lambda k: header[k].start)
                entries = [(k, header[k].dtype, header[k].shape, header[k].nbytes) for k in order]
                writer = ShardWriter(staging / file.name, entries)
                requantized: dict[str, torch.Tensor] = {}  # codes or scales computed, not yet written

                for key in order:
                    info = header[key]
                    owner = key.removesuffix("_scale_inv")
                    if owner in keys and header[owner].dtype == "F8_E4M3":
                        if key not in requantized:
                            if files.get(owner + "_scale_inv") != file:
                                raise ExportError(f"{file}: {owner}_scale_inv lies in another shard; not supported yet")
                            codes, scale = quantize_weight(read_tensor(run_info[owner]).float())
                            requantized[owner], requantized[owner + "_scale_inv"] = codes, scale.float()
                        writer.write(key, requantized.pop(key))
                    elif key in keys:
                        writer.write(key, read_tensor(run_info[key]).float().to(DTYPES[info.dtype]))
                    else:
                        writer.copy(info)
                        copied += 1
                writer.close()
            index = base / INDEX_NAME
            if index.is_file():
                shutil.copy2(index, staging / INDEX_NAME)
            shutil.copy2(base / "config.json", staging / "config.json")
            copy_side_files(base, staging, None, SimpleNamespace(warnings=[]))
            shutil.copy2(run / "expert_cfg.json", staging / "expert_cfg.json")
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"format": fmt, "trained": sorted(keys)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.esft_export", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base checkpoint the ESFT run started from")
    parser.add_argument("--run", required=True, help="the ESFT stage's output folder")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--format", choices=["full", "delta"], default="full")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = export_esft(args.base, args.run, args.out, args.format, args.overwrite)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"format": result["format"], "trained_tensors": len(result["trained"]), "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
