"""FP8 (block-scaled e4m3) vs BF16 GEMM throughput on DeepSeek-V3 shapes.

    python benchmarks/fp8_gemm.py            # CPU: the emulated path (M reduced to 256 to stay under a minute)
    python benchmarks/fp8_gemm.py --m 4096   # on a CUDA GPU: torch._scaled_mm blockwise and the Triton kernel

Each FP8 backend is first checked against the emulated reference on the same quantized inputs. FP8 times are
for the GEMM on already-quantized operands (weights are stored quantized; `+act` adds the 1x128 activation
quantization that a linear layer pays per call). TFLOP/s = 2*M*N*K / median time. The emulated path computes
in fp32, so on a CPU its speed follows the FP32 column; on CPUs without bf16 instructions (AVX2 only) BF16 is the
slowest of the three.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.fp8 import fp8_gemm, quantize_activation, quantize_weight  # noqa: E402

# (name, N, K) of DeepSeek-V3 671B projections; M is the number of tokens.
SHAPES = [
    ("expert gate/up  7168->2048", 2048, 7168),
    ("expert down     2048->7168", 7168, 2048),
    ("q_a_proj        7168->1536", 1536, 7168),
    ("q_b_proj        1536->24576", 24576, 1536),
    ("o_proj         16384->7168", 7168, 16384),
]


def median_seconds(fn, runs: int, device: torch.device) -> float:
    fn()  # warm-up (and Triton autotuning)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fp8(x: torch.Tensor, w: torch.Tensor, backend: str, runs: int, device: torch.device):
    """(GEMM seconds, quantize-activations-and-GEMM seconds, max error relative to the emulated reference)."""
    a, a_scale = quantize_activation(x)
    b, b_scale = quantize_weight(w)
    reference = fp8_gemm(a, a_scale, b, b_scale, torch.float32, "emulated")
    out = fp8_gemm(a, a_scale, b, b_scale, torch.bfloat16, backend)
    err = ((out.float() - reference).abs().max() / reference.abs().max()).item()
    gemm = median_seconds(lambda: fp8_gemm(a, a_scale, b, b_scale, torch.bfloat16, backend), runs, device)
    with_act = median_seconds(
        lambda: fp8_gemm(*quantize_activation(x), b, b_scale, torch.bfloat16, backend), runs, device
    )
    return gemm, with_act, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=None, help="tokens (default 4096 on GPU, 256 on CPU)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per case (default 20 GPU, 3 CPU)")
    parser.add_argument("--shapes", type=int, default=None, help="only the first n shapes (default: 3 on CPU)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    m = args.m or (4096 if on_gpu else 256)
    runs = args.runs or (20 if on_gpu else 3)
    shapes = SHAPES[: args.shapes or (len(SHAPES) if on_gpu else 3)]
    backends = ["scaled_mm", "triton"] if on_gpu else ["emulated"]
    name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, M={m} tokens, median of {runs} runs")
    print(
        f"{'shape':30} {'backend':10} {'BF16 TF/s':>10} {'FP32 TF/s':>10} {'FP8 TF/s':>10} {'FP8+act':>10} "
        f"{'FP8/BF16':>9} {'max rel err':>12}"
    )

    torch.manual_seed(0)
    for label, n, k in shapes:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        flops = 2 * m * n * k
        bf16 = flops / median_seconds(partial(torch.matmul, x, w.t()), runs, device) / 1e12
        fp32 = flops / median_seconds(partial(torch.matmul, x.float(), w.float().t()), runs, device) / 1e12
        for backend in backends:
            try:
                gemm, with_act, err = time_fp8(x, w, backend, runs, device)
            except Exception as exc:  # a backend this GPU/torch lacks: say so and go on
                print(f"{label:30} {backend:10} failed: {type(exc).__name__}: {str(exc)[:150]}")
                continue
            gemm, with_act = flops / gemm / 1e12, flops / with_act / 1e12
            print(
                f"{label:30} {backend:10} {bf16:10.3f} {fp32:10.3f} {gemm:10.3f} {with_act:10.3f} "
                f"{gemm / bf16:8.2f}x {err:12.2e}"
            )


if __name__ == "__main__":
    main()
