"""Resident memory of an FP8 checkpoint loaded with FP8 kept vs dequantized to BF16, in one run.

    python benchmarks/fp8_memory.py                  # "debug" preset with a 32k vocabulary, ~0.2 GB of weights
    python benchmarks/fp8_memory.py --preset tiny

Writes an FP8 checkpoint (official format: e4m3 + 128x128 weight_scale_inv, per-expert keys) of a randomly
initialised model, then loads it twice, each load in a fresh process so resident-set sizes do not mix. Reports
bytes per weight of the quantized tensors (codes + scales, from the tensors themselves) and the process RSS
growth of each load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from model.checkpoint import iter_hf_state  # noqa: E402
from model.fp8 import is_official_fp8_weight, quantize_weight  # noqa: E402

QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def write_checkpoint(path: Path, preset: str, vocab: int) -> None:
    config = DeepseekV3Config.from_preset(preset, vocab_size=vocab)
    with torch.device("cpu"):
        model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    tensors = {}
    for key, tensor in iter_hf_state(model):
        if is_official_fp8_weight(key):
            tensors[key], tensors[key + "_scale_inv"] = quantize_weight(tensor)
        else:
            tensors[key] = tensor.contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config.to_dict(), "quantization_config": QUANT_CONFIG}))


def measure(path: str, mode: str) -> dict:
    """Load in this process and report bytes of the quantized tensors and the RSS growth."""
    before = rss_bytes()
    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, fp8=mode, progress=False)
    grown = rss_bytes() - before
    with open(Path(path) / "quantized.json") as f:
        quantized = set(json.load(f))  # model parameter names of the tensors the checkpoint stores in FP8
    params = dict(model.named_parameters())
    weights = sum(params[n].numel() for n in quantized)
    held = sum(params[n].numel() * params[n].element_size() for n in quantized)
    held += sum(p.numel() * p.element_size() for n, p in params.items() if n.endswith("_scale_inv"))
    total = sum(p.numel() * p.element_size() for p in params.values())
    return dict(weights=weights, quantized_bytes=held, all_bytes=total, rss_growth=grown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        write_checkpoint(path, args.preset, args.vocab)
        kept = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, progress=False)
        names = [n for n, p in kept.named_parameters() if p.dtype == torch.float8_e4m3fn]
        (path / "quantized.json").write_text(json.dumps(names))
        del kept
        results = {}
        for mode in ("keep", "dequantize"):
            command = [sys.executable, __file__, "--measure", str(path), mode]
            results[mode] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print(f"# preset {args.preset}, vocab {args.vocab}: {results['keep']['weights'] / 1e6:.1f}M quantized weights")
    print(
        f"{'load':12} {'bytes/weight (quantized)':>26} {'quantized MB':>13} {'all params MB':>14} {'RSS growth MB':>14}"
    )
    for mode, r in results.items():
        print(
            f"{mode:12} {r['quantized_bytes'] / r['weights']:26.3f} {r['quantized_bytes'] / 1e6:13.1f} "
            f"{r['all_bytes'] / 1e6:14.1f} {r['rss_growth'] / 1e6:14.1f}"
        )


if __name__ == "__main__":
    main()
