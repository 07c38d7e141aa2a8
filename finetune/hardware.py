"""What this machine's CPU does with bf16: native (AVX512-BF16 or AMX) or emulated, found out rather than assumed.

Hosts of one kind differ: on a CPU with AVX512-BF16 a bf16 matmul runs 2-4x faster than fp32; on an AVX2-only
CPU (or with oneDNN capped to AVX2 by ONEDNN_MAX_CPU_ISA) it is emulated at about 1 GFLOP/s, a hundred times
slower. `bf16: auto` in a recipe turns bf16 autocast on only where it pays, from the flags the CPU reports and a
short timing of the kernels torch will really use.
"""

from __future__ import annotations

import functools
import os
import time

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# The environment under which torch, oneDNN and MKL pick the kernels an AVX2-only host runs (set before torch loads,
# i.e. for a subprocess): other rounding, and bf16 emulated.
AVX2_IMITATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _matmul_seconds(dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = a @ b  # warm-up (oneDNN builds its kernel on the first call)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """True when a bf16 matmul on this CPU, with the kernels torch dispatches here, is faster than an fp32 one.

    A CPU without the AVX512-BF16 / AMX flags is answered without timing. With them, a 256^3 matmul is timed in
    both dtypes, best of 5 (about 2 ms; 70 ms where bf16 turns out emulated), which also sees ONEDNN_MAX_CPU_ISA caps.
    """
    if not any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS):
        return False
    return _matmul_seconds(torch.bfloat16, 256, 5) < _matmul_seconds(torch.float32, 256, 5)


def cpu_description() -> str:
    """One line naming the CPU's bf16 support and the thread count, for benchmark and run reports."""
    flags = cpu_flags()
    named = [flag for flag in NATIVE_BF16_FLAGS if flag in flags] or ["no AVX512-BF16/AMX"]
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    capped = f", ONEDNN_MAX_CPU_ISA={isa}" if isa else ""
    native = "native" if cpu_bf16_native() else "emulated"
    return (
        f"{torch.get_num_threads()} threads, {'/'.join(named)}{capped}, bf16 matmul {native}, "
        f"torch kernels {torch.backends.cpu.get_cpu_capability()}"
    )


def gemm_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Measured GEMM throughput (GFLOP/s, best of `repeats`) of a size^3 matmul in `dtype` on this CPU."""
    if dtype == torch.bfloat16 and not cpu_bf16_native():
        size = min(size, 256)  # emulated: a 2048^3 product would take minutes
    return 2 * size**3 / _matmul_seconds(dtype, size, repeats) / 1e9
