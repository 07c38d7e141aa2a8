"""The fast variant of the demo's robustness check (examples/demo/robustness.py runs the full one): the demo's data and
recipes on a compact vocabulary (examples/demo/standin.py), two seeds, with this host's kernels and with the kernels
an AVX2-only host runs. A recipe or data change that makes the Base -> chat carry-over fragile fails here."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from finetune.hardware import AVX2_IMITATION

ROOT = Path(__file__).resolve().parents[2]
RUNS = [(seed, kernels) for seed in (0, 1) for kernels in ("default", "avx2")]


def standin(seed: int, kernels: str) -> dict:
    env = {**os.environ, **(AVX2_IMITATION if kernels == "avx2" else {})}
    command = [sys.executable, str(ROOT / "examples/demo/standin.py"), "--seed", str(seed), "--threads", "1"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict:
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(RUNS, pool.map(lambda run: standin(*run), RUNS)))


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=lambda run: f"seed{run[0]}-{run[1]}")
def test_the_base_knows_the_sums_in_plain_text_and_not_in_chat_form_and_sft_carries_them_over(results, run):
    result = results[run]
    seen, unseen = result["base_plain"]
    assert seen >= 85 and unseen >= 80, result  # the Base learned the sums, also ones it never read
    # ... and rarely answers in chat form. The demo's target is < 5%, which this design misses on seed 1 (6% here,
    # 14-21% on the real pipeline; docs/demo.md, #24 open): this bound keeps it from getting worse unnoticed.
    assert max(result["base_chat"]) < 10, result
    chat_seen, chat_unseen = result["sft_sum_chat"]
    assert chat_seen >= seen - 8 and chat_unseen >= unseen - 10, result  # SFT carried what the Base knows
