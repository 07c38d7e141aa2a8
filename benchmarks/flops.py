"""Model FLOPs of a training step and the CPU's measured GEMM peak: "CPU MFU" for the benchmarks.

FLOPs are the multiply-adds (x2) the step needs, independent of how an implementation runs them: every GEMM of
the decoder layers for every token, the routed experts for the top-k chosen per token, the LM head only at
positions that carry a target, and causal attention (S(S+1)/2 query-key pairs per head). The backward is twice the
forward for weights that train and once (input gradients only) for frozen ones. The peak is a 2048^3 matmul in the
same dtype, timed in the same process (finetune.hardware.gemm_peak_gflops).
"""

from __future__ import annotations

from model import DeepseekV3Config


def _attention_weights(config: DeepseekV3Config) -> int:
    h, heads = config.hidden_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.q_lora_rank is None:
        q = h * heads * qk
    else:
        q = h * config.q_lora_rank + config.q_lora_rank * heads * qk
    kv = h * (config.kv_lora_rank + config.qk_rope_head_dim)
    kv += config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
    return q + kv + heads * config.v_head_dim * h


def _layer_weights(config: DeepseekV3Config, layer: int) -> int:
    """GEMM weights one token passes through in decoder layer `layer` (routed experts: the top-k only)."""
    h = config.hidden_size
    if layer < config.first_k_dense_replace:
        mlp = 3 * h * config.intermediate_size
    else:
        expert = 3 * h * config.moe_intermediate_size
        mlp = expert * (config.num_experts_per_tok + config.n_shared_experts) + h * config.n_routed_experts
    return _attention_weights(config) + mlp


def step_flops(
    config: DeepseekV3Config,
    batch: int,
    seq: int,
    targets: int,
    body_trained: bool = True,
    head_trained: bool = True,
    mtp: bool = False,
) -> float:
    """FLOPs of one forward+backward over [batch, seq] tokens with `targets` of them carrying a loss target.

    body_trained False: a LoRA step (the adapters' own FLOPs are left out; they are a few percent at rank 16).
    mtp: the MTP module's layer and head also run (as when its loss is on).
    """
    tokens = batch * seq
    layers = config.num_hidden_layers
    body = sum(_layer_weights(config, i) for i in range(layers))
    heads, qk = config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim
    pairs = batch * seq * (seq + 1) // 2
    attention = 2 * pairs * heads * (qk + config.v_head_dim)  # QK^T and PV, forward, per layer
    head = config.vocab_size * config.hidden_size
    if mtp and config.num_mtp_modules:
        body += config.num_mtp_modules * (_layer_weights(config, layers) + 2 * config.hidden_size**2)
        layers += config.num_mtp_modules
    factor = 6 if body_trained else 4
    flops = factor * body * tokens + 3 * attention * layers  # attention's backward: twice its forward
    flops += (6 if head_trained else 4) * head * targets * (1 + (config.num_mtp_modules if mtp else 0))
    return float(flops)


def cpu_peaks() -> dict[str, float]:
    """Measured GFLOP/s of a 2048^3 matmul in fp32 and bf16 on this CPU (bf16: a smaller one where emulated)."""
    import torch

    from finetune.hardware import gemm_peak_gflops

    return {"float32": gemm_peak_gflops(torch.float32), "bfloat16": gemm_peak_gflops(torch.bfloat16)}
