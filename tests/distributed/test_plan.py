"""The memory planner: its figures against the peak memory measured on small ZeRO-3 + EP runs on CPU (within 15%;
live heap bytes, as a GPU's allocator would count them), and its verdict for the 671B LoRA recipes on 8 x H200."""

from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path

import pytest
import torch
import yaml

from finetune.parallel import (
    build_expert_parallel_groups,
    load_expert_parallel,
    prepare_zero3_expert_parallel,
    zero3_config,
)
from finetune.plan import (
    Layout,
    find_model_config,
    layout_from_recipe,
    main,
    plan_memory,
    smallest_fit,
)
from model import DeepseekV3ForCausalLM

from .common import tiny_config, training_config, write_fp8_checkpoint, write_tiny_checkpoint
from .launch import check_ranks

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15
# Big enough that states and activations dwarf the allocator's noise, small enough for two busy cores.
PLAN_MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    num_experts_per_tok=4,
    num_hidden_layers=4,
)
MICRO_BATCH, SEQ, LORA_R = 2, 512, 8


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class HeapPeak:
    """Peak bytes malloc has handed out and not taken back (all threads, all arenas), sampled every millisecond.

    Process RSS is no measure here: file mappings, freed-but-kept arena pages and DeepSpeed's JIT-built CPU op move
    it by tens of MiB from run to run (364 to 443 MiB for the same LoRA run). glibc's mallinfo2 counts live
    allocations only (torch's CPU allocator is malloc underneath), which is what the GPU's caching allocator counts
    as allocated: the memory the planner models.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._mallinfo2 = libc.mallinfo2

    def live(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self) -> HeapPeak:
        self.base = self.live()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def sample(self) -> int:
        now = self.live() - self.base
        self.peak = max(self.peak, now)
        return now

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def memory_worker(rank: int, world: int, path: Path, out: Path, lora: bool) -> None:
    import deepspeed

    groups = build_expert_parallel_groups(2)
    with HeapPeak() as heap:
        base, _ = load_expert_parallel(
            DeepseekV3ForCausalLM, path, groups, dtype=torch.float32, config=training_config(path)
        )
        model = base
        if lora:
            from peft import get_peft_model

            from finetune.lora import build_lora_config

            model = get_peft_model(base, build_lora_config(base, preset="both", r=LORA_R, include_mtp=True))
        model.train()
        prepare_zero3_expert_parallel(model, groups)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=opt, config=zero3_config(micro_batch_size=MICRO_BATCH, world_size=world)
        )
        generator = torch.Generator().manual_seed(rank)
        after_init = heap.sample()
        hook = torch.nn.modules.module.register_module_forward_hook(lambda *_: heap.sample() and None)
        for _ in range(3):
            rows = torch.randint(0, PLAN_MODEL["vocab_size"], (MICRO_BATCH, SEQ), generator=generator)
            engine.backward(engine(input_ids=rows, labels=rows).loss)
            engine.step()
    hook.remove()
    counts = base.expert_counts().float()
    torch.distributed.all_reduce(counts)  # summed over ranks: the global batch's load
    padding = float((counts.max(-1).values / counts.mean(-1)).mean())
    peak = {"peak": heap.peak, "after_init": after_init, "end": heap.sample(), "padding": padding}
    torch.save(peak, out / f"peak-{int(lora)}-rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full-sft", "lora-fp8"])
def test_plan_matches_measured_peak(tmp_path: Path, lora: bool) -> None:
    path = tmp_path / "model"
    if lora:
        write_fp8_checkpoint(path, **PLAN_MODEL)
    else:
        write_tiny_checkpoint(path, **PLAN_MODEL)
    check_ranks(memory_worker, 2, path, tmp_path, lora)
    ranks = [torch.load(tmp_path / f"peak-{int(lora)}-rank{r}.pt") for r in range(2)]
    print(ranks)
    measured = max(r["peak"] for r in ranks)
    config = tiny_config(**PLAN_MODEL)
    if lora:
        config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    layout = Layout(
        gpus=2,
        ep_size=2,
        micro_batch=MICRO_BATCH,
        seq_len=SEQ,
        lora=lora,
        lora_r=LORA_R,
        fp8_base=lora,
        param_bytes=4,
        activation_bytes=4,
        activation_checkpointing=False,
        mtp_loss=True,
        attention="fused",  # V is zero-padded to the q/k head dim, so SDPA runs its fused kernel on CPU too
        expert_padding=1.0,  # grouped GEMMs over exactly the routed tokens (no padding to the busiest expert)
        runtime_bytes=0,  # tensors only: no CUDA context or NCCL buffers on CPU
    )
    plan = plan_memory(config, layout)
    print({k: round(v / 2**20) for k, v in plan.parts.items()})
    planned = plan.total
    error = planned / measured - 1
    print(
        f"{'lora-fp8' if lora else 'full-sft'}: planned {planned / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
    )
    assert abs(error) <= TOLERANCE, f"planned {planned / 2**20:.0f} MiB vs measured {measured / 2**20:.0f} MiB"


def recipe_671b(tmp_path: Path, stage: str) -> Path:
    """A 671B LoRA recipe on the FP8 base at sequence length 4096 next to the real config.json."""
    folder = tmp_path / "deepseek-v3-671b" / stage
    folder.mkdir(parents=True)
    (folder.parent / "config.json").write_text((ROOT / "recipes/deepseek-v3-671b/config.json").read_text())
    recipe = {
        "model_name_or_path": "/models/DeepSeek-V3",
        "torch_dtype": "bfloat16",
        "bf16": True,
        "use_lora": True,
        "lora_r": 16,
        "activation_checkpointing": True,
        "per_device_train_batch_size": 1,
        "data": {"max_length": 4096},
    }
    if stage == "dpo":
        recipe["beta"] = 0.1
    (folder / "lora.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "lora.yaml"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_671b_lora_fits_one_node_of_h200(tmp_path: Path, stage: str, capsys) -> None:
    path = recipe_671b(tmp_path, stage)
    recipe = yaml.safe_load(path.read_text())
    config = find_model_config(path, recipe)
    layout = layout_from_recipe(recipe, config, gpus=8)
    assert layout.ep_size == 8 and layout.fp8_base and layout.rows_per_sample == (2 if stage == "dpo" else 1)
    plan = plan_memory(config, layout)
    assert plan.total < 141e9 * 0.95
    gpus, _ = smallest_fit(config, layout, 141e9)
    assert gpus == 8  # 4 GPUs would hold 160 GB of FP8 experts each
    assert main(["--config", str(path), "--gpus", "8", "--gpu-mem", "141"]) == 0
    assert "smallest GPU count that fits: 8" in capsys.readouterr().out
    assert main(["--config", str(path), "--gpus", "4", "--gpu-mem", "141"]) == 2


def test_plan_rejects_a_bad_ep_size(tmp_path: Path, capsys) -> None:
    path = recipe_671b(tmp_path, "sft")
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--gpus", "8", "--gpu-mem", "141", "--ep-size", "3"])
    assert "ep_size=3 does not divide the world size 8" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--gpus", "0"), ("--gpu-mem", "-5"), ("--gpus", "two")])
def test_plan_refuses_impossible_hardware_in_one_line(flag, value):
    import subprocess
    import sys

    recipe = ROOT / "recipes/deepseek-v3-671b/sft/lora.yaml"
    args = {"--gpus": "8", "--gpu-mem": "141", flag: value}
    command = [sys.executable, "-m", "finetune.plan", "--config", str(recipe)]
    for key, val in args.items():
        command += [key, val]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"argument {flag}" in proc.stderr.strip().splitlines()[-1]


RECIPES = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml") if p.parent.name != "accelerate"
)
HARDWARE = re.compile(r"Hardware \(python -m finetune\.plan ([^)]*)\):(.*?)(\d+\.\d) GiB per GPU", re.S)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_shipped_recipe_is_planned_and_says_what_the_planner_says(path: Path, capsys) -> None:
    """#16 item 8: each recipe's first line is its launch command and its hardware line is the planner's figure."""
    text = path.read_text()
    first = text.splitlines()[0]
    command = " -m finetune." in first or "# dsv3-finetune " in first
    assert first.startswith("# ") and command and str(path.relative_to(path.parents[2])) in first
    header = "".join(line[2:] + " " for line in text.splitlines() if line.startswith("#"))
    match = HARDWARE.search(header)
    flags = match.group(1).split() if match else ["--gpus", "1", "--gpu-mem", "141"]
    code = main(["--config", str(path), *flags])
    out = capsys.readouterr().out
    assert code == 0, out  # it fits where the recipe says
    total = float(re.search(r"total per GPU\s+([\d.]+) GiB", out).group(1))
    if match:
        assert f"{total:.1f}" == match.group(3), (path, total)
        host = re.search(r"host memory at load: ([\d.]+) GiB per rank", out).group(1)
        if "Host memory at load" in header:
            assert f"Host memory at load: {host} GiB per rank" in header, (path, host)
