"""Run a function on N local ranks (gloo, CPU) in forked processes: children inherit the imports, so a rank starts
in well under a second instead of re-importing torch, transformers and DeepSpeed."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

# DeepSpeed JIT-builds a C++ op for CPUs at init (about 90 s once): keep the build cached between runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))


ROOT = Path(__file__).resolve().parents[2]


def launch(
    config_file: str,
    stage: str,
    recipe: Path,
    out: Path,
    ep_size: int | None,
    env: dict[str, str] | None = None,
    overrides: tuple[str, ...] = (),
) -> str:
    """accelerate launch ... -m finetune.<stage> on 2 processes (extra `env` on top of this one's, `key=value`
    overrides after the recipe); returns stderr (fails the test on a bad exit)."""
    proc = launch_module(config_file, [f"finetune.{stage}"], recipe, out, ep_size, env, overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def launch_module(
    config_file: str,
    module: list[str],
    recipe: Path,
    out: Path,
    ep_size: int | None,
    env: dict[str, str] | None = None,
    overrides: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """accelerate launch ... -m <module and its first arguments> --config <recipe> output_dir=<out> <overrides> on 2
    processes, whatever its exit."""
    env = {
        k: v
        for k, v in {**os.environ, **(env or {})}.items()
        if k not in ("EP_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK")
    }
    env.update(TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if ep_size is not None:
        env["EP_SIZE"] = str(ep_size)
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", config_file, "--num_processes", "2"]
    command += ["--main_process_port", str(free_port()), "-m", *module]
    command += ["--config", str(recipe), f"output_dir={out}", *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # skip atexit handlers inherited from the parent (pytest's)


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 300) -> list[int]:
    """Run fn(rank, world_size, *args) on world_size ranks; returns exit codes (raises if any rank failed)."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


def check_ranks(fn: Callable, world_size: int, *args, timeout: float = 300) -> None:
    """run_ranks, failing the test unless every rank exited cleanly."""
    codes = run_ranks(fn, world_size, *args, timeout=timeout)
    assert codes == [0] * world_size, f"rank exit codes {codes} (tracebacks above in the captured stderr)"
