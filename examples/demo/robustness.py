"""The demo's headline measured for robustness: `make demo`'s pipeline over seeds and host conditions.

    python examples/demo/robustness.py --out outputs/robustness --seeds 0 1 2 3 4 --variants default avx2 threads1 bf16

Each run is `python -m finetune.demo --seeds N` in its own process (kernel choices are read when torch loads):
- default: torch's threads (the cores) and the CPU's own kernels;
- threads1: one thread, so every reduction runs in another order;
- avx2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2, the kernels an AVX2-only host
  runs (other rounding, and on such a host bf16 is emulated);
- bf16: bf16 autocast in every stage (fp32 master weights), where the CPU has native bf16 (skipped and said
  otherwise).
Prints and writes OUT/robustness.md: per variant and model the min / median / max over seeds of each measure, the
DPO gain on its target (held-out chat accuracy, Chat minus SFT) against 3x its seed-to-seed standard deviation, and
whether every run met the targets (Base < 5% in chat format while it knows the sums in plain text; Chat >= 90%).
`--scale` and `--jobs` trade fidelity and time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from finetune.hardware import AVX2_IMITATION, cpu_bf16_native  # noqa: E402

MEASURES = ("accuracy", "accuracy_seen", "accuracy_unseen", "sum_accuracy", "wordy", "plain_accuracy_seen")
MEASURES += ("plain_accuracy_unseen", "preference_accuracy")


def variant_env(variant: str) -> tuple[dict[str, str], list[str]]:
    env, args = dict(os.environ), []
    if variant == "avx2":
        env.update(AVX2_IMITATION)
    elif variant == "threads1":
        args += ["--threads", "1"]
    elif variant == "bf16":
        args += ["--bf16"]
    elif variant != "default":
        raise SystemExit(f"unknown variant {variant!r}: default, threads1, avx2, bf16")
    return env, args


def run(out: Path, variant: str, seed: int, scale: float, threads: int | None) -> dict:
    folder = out / variant
    result = folder / f"seed{seed}" / "result.json"
    if result.is_file():  # a finished run is kept: rerunning resumes the matrix
        return json.loads(result.read_text())
    env, args = variant_env(variant)
    if threads and "--threads" not in args:
        args += ["--threads", str(threads)]
    command = [sys.executable, "-m", "finetune.demo", "--out", str(folder), "--seeds", str(seed), "--scale", str(scale)]
    command += ["--report-to", "none", *args]
    start = time.time()
    log = folder / f"seed{seed}.log"
    folder.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed (exit {proc.returncode}); see {log}")
    print(f"{variant} seed {seed}: {time.time() - start:.0f} s", flush=True)
    return json.loads(result.read_text())


def spread(values: list[float]) -> str:
    return f"{min(values):.1%} / {statistics.median(values):.1%} / {max(values):.1%}"


def summarize(results: dict[str, list[dict]]) -> tuple[str, bool]:
    lines = ["| variant | runs | model | " + " | ".join(MEASURES) + " |", "| --- " * (len(MEASURES) + 3) + "|"]
    ok = True
    checks = []
    for variant, runs in results.items():
        for model in ("Base", "SFT", "Chat"):
            cells = [spread([r["table"][model][m] for r in runs]) for m in MEASURES]
            lines.append(f"| {variant} | {len(runs)} | {model} | " + " | ".join(cells) + " |")
        gains = [r["table"]["Chat"]["accuracy"] - r["table"]["SFT"]["accuracy"] for r in runs]
        noise = statistics.stdev([r["table"]["Chat"]["accuracy"] for r in runs]) if len(runs) > 1 else float("nan")
        base_chat = max(r["table"]["Base"]["accuracy"] for r in runs)
        base_plain = min(min(r["table"]["Base"][m] for m in MEASURES[5:7]) for r in runs)
        chat = min(r["table"]["Chat"]["accuracy"] for r in runs)
        met = base_chat < 0.05 and chat >= 0.90 and (len(runs) < 2 or min(gains) > 3 * noise)
        ok &= met
        checks.append(
            f"- {variant}: Base in chat format at most {base_chat:.1%} (target < 5%), its plain-text accuracy at "
            f"least {base_plain:.1%}; Chat at least {chat:.1%} (target >= 90%); DPO gain {spread(gains)} against "
            f"3 x seed std {3 * noise:.1%}: {'met' if met else 'NOT met'}"
        )
    return "\n".join(lines + ["", *checks]), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/robustness")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=["default", "threads1", "avx2", "bf16"])
    parser.add_argument("--scale", type=float, default=1.0, help="the demo's --scale (1: as make demo)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each then gets cores / jobs threads)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    variants = list(args.variants)
    if "bf16" in variants and not cpu_bf16_native():
        print("bf16: this CPU has no native bf16 (AVX512-BF16 / AMX): skipped, the demo runs fp32 here")
        variants.remove("bf16")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    jobs = [(v, s) for v in variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda job: (job[0], run(out, job[0], job[1], args.scale, threads)), jobs))
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for variant, result in done:
        results[variant].append(result)
    table, ok = summarize(results)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    header = f"# Demo robustness ({cpu}, {os.cpu_count()} cores, scale {args.scale}, seeds {args.seeds})\n\n"
    header += "min / median / max over seeds\n\n"
    (out / "robustness.md").write_text(header + table + "\n")
    print(header + table)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
