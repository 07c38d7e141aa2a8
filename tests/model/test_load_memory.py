"""Loading streams tensors into a meta-built model: peak memory is the model plus about one shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import DeepseekV3Config, DeepseekV3ForCausalLM

ROOT = Path(__file__).resolve().parents[2]

# VmHWM is this process's own peak RSS; ru_maxrss would carry the parent's peak across fork + exec.
LOAD = """
import json, sys
import torch
from model import DeepseekV3ForCausalLM
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
assert status("VmHWM") - before < 64e6  # the imports did not already peak far above the baseline
model = DeepseekV3ForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16, progress=False)
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


@pytest.mark.slow
def test_peak_memory_while_loading_is_model_plus_one_shard(tmp_path: Path) -> None:
    config = DeepseekV3Config.from_preset("debug")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    for module in model.moe_layers():  # the router stays fp32, as it loads
        module.gate.float()
    model.save_pretrained(tmp_path, max_shard_size="40MB")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    largest_shard = max(f.stat().st_size for f in shards)
    largest_tensor = max(t.numel() * t.element_size() for t in model.state_dict().values())
    del model
    assert len(shards) >= 4 and model_bytes > 140e6
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path)], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    rss = json.loads(out.strip().splitlines()[-1])
    growth = rss["peak"] - rss["before"]
    # Two copies of the model would be 2 x model_bytes; the allowance here is one shard, one tensor being
    # converted, and 48 MB for allocator slack and the loader's own bookkeeping.
    assert growth >= 0.9 * model_bytes, (growth, model_bytes)  # the measurement does see the weights
    assert growth <= model_bytes + largest_shard + largest_tensor + 48e6, (growth / 1e6, model_bytes / 1e6)
