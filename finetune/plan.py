"""Per-GPU memory of a recipe under ZeRO-3 + expert parallelism, and the smallest GPU count that fits.

    python -m finetune.plan --config recipes/deepseek-v3-671b/sft/lora.yaml --gpus 8 --gpu-mem 141

The layout is the one finetune.parallel builds: routed experts split over ep_size ranks (default: as many as
divide both the GPU count and the experts), trainable expert tensors partitioned over their expert-data-parallel
group, every other parameter partitioned over all ranks by ZeRO-3, frozen FP8 weights kept local (experts) or
replicated (attention, shared and dense MLPs) at 1 byte per weight. Parameter counts come from the model built
on the meta device from the recipe's config, so every value follows the config. Activations count the tensors
autograd keeps for backward (docs/parallel.md derives each term); the CPU test compares the total with the peak
memory measured on small runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GIB = 1024**3
FP8_SCALE_BYTES = 4 / (128 * 128)  # one fp32 scale per 128x128 block
GPU_RUNTIME_BYTES = int(2.5 * GIB)  # CUDA context, NCCL communicators and workspaces, cuBLAS handles
GPU_USABLE = 0.95  # what the caching allocator can hand out before fragmentation bites


@dataclass
class Layout:
    """What decides the memory of one rank."""

    gpus: int
    ep_size: int
    micro_batch: int
    seq_len: int
    rows_per_sample: int = 1  # DPO: chosen and rejected
    lora: bool = False
    lora_r: int = 16
    lora_preset: str = "both"
    lora_dense_mlp: bool = False
    fp8_base: bool = False
    param_bytes: int = 2  # bf16 (2) or fp32 (4)
    activation_bytes: int = 2
    activation_checkpointing: bool = True
    mtp_loss: bool = False
    loss_chunk: int | None = None  # trl's chunked log-prob head (DPO): logits of at most this many tokens at once
    attention: str = "fused"  # SDPA's kernel: "fused" (flash / memory-efficient, GPUs) or "math" (S x S, CPUs)
    expert_padding: float = 1.0  # CPU batched experts pad to the busiest expert (max / mean load); GPUs: 1
    reduce_bucket: int = 50_000_000
    prefetch_bucket: int = 50_000_000
    runtime_bytes: int = GPU_RUNTIME_BYTES  # CPU runs: 0 (the planner counts allocations; no CUDA context)


@dataclass
class ParamCensus:
    """Element counts of the model by how the layout stores them."""

    experts: int = 0  # routed experts, all ranks together
    expert_layers: int = 0
    fp8_able: int = 0  # non-expert linear weights the FP8 checkpoint quantizes
    other: int = 0  # embeddings, heads, norms, routers, eh_proj
    lora: int = 0
    largest_partitioned: int = 0  # elements of the biggest module ZeRO-3 gathers at once (non-expert)
    largest_expert_layer: int = 0


@dataclass
class Plan:
    """Bytes per rank, by component."""

    layout: Layout
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def count_params(config: Any, layout: Layout) -> ParamCensus:
    """Count parameters on a meta-device model (no memory), classified as the layout stores them."""
    import torch

    from model import DeepseekV3ForCausalLM
    from model.fp8 import is_official_fp8_weight
    from model.moe import RoutedExperts

    from .lora import lora_module_names

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    census = ParamCensus()
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            census.experts += param.numel()
        elif is_official_fp8_weight(name):
            census.fp8_able += param.numel()
        else:
            census.other += param.numel()
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            census.expert_layers += 1
            census.largest_expert_layer = max(census.largest_expert_layer, sum(p.numel() for p in module.parameters()))
    frozen_fp8 = layout.lora and layout.fp8_base
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts) or any(True for _ in module.children()):
            continue
        size = sum(p.numel() for n, p in module.named_parameters(recurse=False))
        if frozen_fp8 and isinstance(module, torch.nn.Linear) and is_official_fp8_weight(name + ".weight"):
            continue  # a replicated FP8 buffer, never gathered
        census.largest_partitioned = max(census.largest_partitioned, size)
    if layout.lora:
        modules = dict(model.named_modules())
        for name in lora_module_names(model, layout.lora_preset, layout.lora_dense_mlp, layout.mtp_loss):
            census.lora += layout.lora_r * (modules[name].in_features + modules[name].out_features)
    return census


def _norm_bytes(dim: int, a: int) -> int:
    """RMSNorm keeps its input, (in bf16) an fp32 copy, the normalized value, and its output for the next op."""
    return dim * (3 * a + (4 if a < 4 else 0))


def layer_activation_bytes(config: Any, layout: Layout, moe: bool) -> float:
    """Bytes autograd keeps for backward per token of one decoder layer (model/attention.py, model/moe.py).

    Counted tensor by tensor from the saved-tensor hooks of a run (tests/distributed/test_plan.py checks the sum):
    attention keeps the normed input, q/kv latents and their norms, q, k, v, the output and, on the math path of
    SDPA (CPU), the S x S probabilities; the MoE keeps router scores and choices, the experts' GEMM inputs and
    outputs (padded to the busiest expert on the CPU's batched path) and the weighted outputs.
    """
    a = layout.activation_bytes
    h, heads = config.hidden_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    v, rope = config.v_head_dim, config.qk_rope_head_dim
    q_lora = config.q_lora_rank or 0
    kv_lora = config.kv_lora_rank
    attention = (
        _norm_bytes(h, a)
        + _norm_bytes(q_lora, a)
        + (kv_lora + rope) * a
        + _norm_bytes(kv_lora, a)
        - kv_lora * a  # the kv norm's input is a view of kv_a's output
        # q and k; v and SDPA's output zero-padded to the q/k head dim (model/attention.py pads v so the fused
        # kernel runs); the output's contiguous copy at the v dim that o_proj keeps
        + heads * (2 * qk + 2 * max(qk, v) + v) * a
    )
    if layout.attention == "math":
        attention += heads * layout.seq_len * 4  # softmax probabilities, fp32
    else:
        attention += heads * 4  # log-sum-exp of the fused kernels
    if layout.lora:
        attention += 6 * layout.lora_r * a  # each adapter's A output
    if not moe:
        return attention + _norm_bytes(h, a) + 4 * config.intermediate_size * a
    k, inter, experts = config.num_experts_per_tok, config.moe_intermediate_size, config.n_routed_experts
    shared = config.n_shared_experts * inter
    if layout.lora or layout.fp8_base:
        routed = k * 3 * inter * a  # frozen experts: gate_up output and silu(gate) only (no weight gradient)
    else:
        routed = layout.expert_padding * k * (h + 4 * inter) * a  # inputs, gate_up out, silu(gate), down input
    routed += k * h * a + k * 4 + k * 44  # weighted expert outputs, routing weights, indices and orderings
    if layout.ep_size > 1:
        routed += 2 * k * h * a  # expert parallel: the token copies each all_to_all receives (dispatch, combine)
    mlp = _norm_bytes(h, a) + experts * 4 + routed + 4 * shared * a
    if layout.lora:
        mlp += 3 * layout.lora_r * a
    return attention + mlp


def activation_bytes(config: Any, layout: Layout) -> tuple[float, float]:
    """(decoder activations, loss head) in bytes for one micro-batch at its peak in backward."""
    tokens = layout.micro_batch * layout.rows_per_sample * layout.seq_len
    layers = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    if layout.mtp_loss:
        layers += [True] * config.num_mtp_modules
    kept = [layer_activation_bytes(config, layout, moe) for moe in layers]
    if layout.activation_checkpointing:
        # Layer inputs stay; one layer is recomputed at a time.
        decoder = len(layers) * config.hidden_size * layout.activation_bytes + max(kept)
    else:
        decoder = sum(kept)
    # Each head keeps its log-softmax in fp32 (plus, in bf16, the logits and their fp32 copy); its backward adds
    # the fp32 gradient of the logits and of the log-softmax.
    a = layout.activation_bytes
    heads = 1 + (config.num_mtp_modules if layout.mtp_loss else 0)
    head_tokens = min(tokens, layout.loss_chunk) if layout.loss_chunk else tokens
    saved = head_tokens * config.vocab_size * (4 + (a + 4 if a < 4 else 0))
    head = heads * saved + head_tokens * config.vocab_size * 8
    return decoder * tokens, head


def plan_memory(config: Any, layout: Layout, census: ParamCensus | None = None) -> Plan:
    """Bytes per rank for `layout`."""
    census = census or count_params(config, layout)
    n, ep = layout.gpus, layout.ep_size
    edp = n // ep
    pb = layout.param_bytes
    plan = Plan(layout)
    local_experts = census.experts / ep
    frozen_fp8 = layout.fp8_base and layout.lora
    if frozen_fp8:
        plan.parts["weights: routed experts (FP8, local)"] = local_experts * (1 + FP8_SCALE_BYTES)
        plan.parts["weights: attention/shared/dense (FP8, replicated)"] = census.fp8_able * (1 + FP8_SCALE_BYTES)
        plan.parts["weights: embeddings/heads/norms/routers (ZeRO-3)"] = census.other * pb / n
    else:
        plan.parts["weights: routed experts (ZeRO-3 over EDP)"] = local_experts * pb / edp
        plan.parts["weights: other (ZeRO-3)"] = (census.fp8_able + census.other) * pb / n
    if layout.lora:
        trainable = census.lora / n
        unreduced = census.lora  # gradients as backward produces them, before the reduce-scatter
        plan.parts["weights: LoRA adapters (ZeRO-3)"] = trainable * pb
    else:
        trainable = local_experts / edp + (census.fp8_able + census.other) / n
        unreduced = local_experts + census.fp8_able + census.other
    plan.parts["gradients (fp32 partitions)"] = trainable * 4
    # AdamW m and v in fp32, plus DeepSpeed's fp32 copy of each trainable partition.
    plan.parts["optimizer: AdamW + fp32 master"] = trainable * 12
    decoder, head = activation_bytes(config, layout)
    plan.parts["activations: decoder"] = decoder
    plan.parts["activations: logits and loss"] = head
    # ZeRO-3 gathers whole modules: the biggest one, plus the prefetch bucket. DeepSpeed 0.19.8 allocates the
    # gradient bucket at its full reduce_bucket size when the optimizer is built (stage3.py, contiguous_gradients),
    # however few parameters train; each reduce-scatter adds an fp32 copy of what the bucket holds.
    gathered = census.largest_partitioned * pb
    if not layout.lora:
        gathered = max(gathered, census.largest_expert_layer / ep * pb)
    plan.parts["comm: ZeRO-3 gather + prefetch"] = gathered + min(layout.prefetch_bucket, gathered / pb) * pb
    plan.parts["comm: gradient reduce bucket"] = layout.reduce_bucket * pb + min(layout.reduce_bucket, unreduced) * 4
    plan.parts["runtime: CUDA context, NCCL"] = layout.runtime_bytes
    return plan


def default_ep_size(gpus: int, num_experts: int) -> int:
    """The largest ep_size dividing both the GPU count and the experts (more EP = fewer experts per GPU)."""
    return math.gcd(gpus, num_experts)


# ---------------------------------------------------------------------------------------------------------------
# Recipes


def find_model_config(recipe_path: Path, recipe: dict) -> Any:
    """The recipe's model config: a preset, the checkpoint's config.json, or a config.json beside the recipe."""
    from model import DeepseekV3Config, load_config

    name = str(recipe.get("model_name_or_path", "preset:tiny"))
    overrides = recipe.get("model_overrides") or {}
    if name.startswith("preset:"):
        return DeepseekV3Config.from_preset(name.removeprefix("preset:"), **overrides)
    if (Path(name) / "config.json").is_file():
        config = load_config(name)
    else:
        folder = recipe_path.resolve().parent
        while not (folder / "config.json").is_file():
            if folder.name in ("recipes", "") or folder.parent == folder:
                raise SystemExit(f"{recipe_path}: model {name!r} has no config.json here; pass --model-config FILE")
            folder = folder.parent
        config = load_config(folder / "config.json")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def fp8_base_mode(recipe: dict) -> str:
    """The stage's fp8_base for this recipe: auto keeps an FP8 checkpoint frozen FP8 under LoRA, else dequantizes."""
    mode = str(recipe.get("fp8_base", "auto"))
    return ("keep" if recipe.get("use_lora") else "dequantize") if mode == "auto" else mode


def host_load_bytes(config: Any, layout: Layout, census: ParamCensus | None = None) -> float:
    """Host memory one rank holds right after loading: its routed experts (1/ep_size of them) and every other weight
    (each rank builds them whole before DeepSpeed partitions them), at the load dtype; FP8 kept is 1 byte a weight."""
    census = census or count_params(config, layout)
    weight = 1 + FP8_SCALE_BYTES if layout.fp8_base else layout.param_bytes
    return census.experts / layout.ep_size * weight + census.fp8_able * weight + census.other * layout.param_bytes


# What to change when a component dominates a plan that does not fit (a prefix of the component's name -> advice).
ADVICE = {
    "weights: routed experts": "a larger ep_size (more GPUs per expert group), or an FP8 base (fp8_base: keep, LoRA)",
    "weights: attention/shared/dense": "an FP8 base, or full ZeRO-3 partitioning of these weights (more GPUs)",
    "weights": "more GPUs (ZeRO-3 partitions these over all ranks)",
    "gradients": "LoRA (use_lora: true) or more GPUs",
    "optimizer": "LoRA (use_lora: true), or more GPUs to partition the AdamW states",
    "activations: logits": "a shorter data.max_length or per_device_train_batch_size 1",
    "activations": "activation_checkpointing: true, a shorter data.max_length or a smaller micro-batch",
    "comm": "smaller ZeRO-3 buckets (reduce_bucket_size / stage3_prefetch_bucket_size)",
    "runtime": "nothing: this is the CUDA context and NCCL",
}


def advise(plan: Plan, count: int = 3) -> list[str]:
    """The largest components of a plan and what would shrink each."""
    lines = []
    for key, value in sorted(plan.parts.items(), key=lambda item: -item[1])[:count]:
        advice = next((a for prefix, a in ADVICE.items() if key.startswith(prefix)), "more GPUs")
        lines.append(f"  {key}: {value / GIB:.1f} GiB ({value / plan.total:.0%}) -> {advice}")
    return lines


def layout_from_recipe(recipe: dict, config: Any, gpus: int, ep_size: int | None = None) -> Layout:
    """Read the memory-relevant fields of a stage recipe (SFT, CPT or DPO)."""
    data = recipe.get("data") or {}
    stage = str(recipe.get("stage", ""))
    dpo = "beta" in recipe or "loss_type" in recipe or stage == "dpo"
    bf16 = bool(recipe.get("bf16", False)) or recipe.get("torch_dtype") == "bfloat16"
    quant = getattr(config, "quantization_config", None)
    return Layout(
        gpus=gpus,
        ep_size=ep_size or default_ep_size(gpus, config.n_routed_experts),
        micro_batch=int(recipe.get("per_device_train_batch_size", 1)),
        seq_len=int(data.get("max_length", recipe.get("max_length", 2048))),
        rows_per_sample=2 if dpo else 1,
        lora=bool(recipe.get("use_lora", False)),
        lora_r=int(recipe.get("lora_r", 16)),
        lora_preset=str(recipe.get("lora_preset", "both")),
        lora_dense_mlp=bool(recipe.get("lora_dense_mlp", False)),
        fp8_base=bool(quant) and fp8_base_mode(recipe) == "keep",
        param_bytes=2 if bf16 else 4,
        activation_bytes=2 if bf16 else 4,
        activation_checkpointing=bool(
            recipe.get("activation_checkpointing", recipe.get("gradient_checkpointing", False))
        ),
        mtp_loss=float(recipe.get("mtp_loss_weight", 0.0)) > 0,
        loss_chunk=4096 if dpo else None,
    )


def smallest_fit(
    config: Any, layout: Layout, gpu_bytes: float, limit: int = 4096, census: ParamCensus | None = None
) -> tuple[int, Plan] | None:
    """The fewest GPUs (ep_size chosen as by default) whose per-GPU plan fits in gpu_bytes."""
    census = census or count_params(config, layout)  # the classification does not depend on the GPU count
    for gpus in range(1, limit + 1):
        trial = Layout(**{**layout.__dict__, "gpus": gpus, "ep_size": default_ep_size(gpus, config.n_routed_experts)})
        plan = plan_memory(config, trial, census)
        if plan.total <= gpu_bytes * GPU_USABLE:
            return gpus, plan
    return None


def format_plan(plan: Plan, gpu_bytes: float | None = None) -> str:
    """A table of the components in GiB."""
    layout = plan.layout
    lines = [
        f"layout: {layout.gpus} GPUs, ep_size {layout.ep_size}, micro-batch {layout.micro_batch} x "
        f"{layout.rows_per_sample} row(s) x {layout.seq_len} tokens, "
        f"{'LoRA r=' + str(layout.lora_r) if layout.lora else 'full'}"
        f"{' on FP8 base' if layout.fp8_base else ''}, {'bf16' if layout.param_bytes == 2 else 'fp32'}, "
        f"activation checkpointing {'on' if layout.activation_checkpointing else 'off'}"
    ]
    width = max(len(k) for k in plan.parts)
    for key, value in plan.parts.items():
        lines.append(f"  {key:<{width}}  {value / GIB:9.2f} GiB")
    lines.append(f"  {'total per GPU':<{width}}  {plan.total / GIB:9.2f} GiB")
    if gpu_bytes:
        usable = gpu_bytes * GPU_USABLE
        verdict = "fits" if plan.total <= usable else "does NOT fit"
        lines.append(f"  {verdict} in {gpu_bytes / 1e9:.0f} GB ({usable / GIB:.1f} GiB usable)")
    return "\n".join(lines)


def _positive(kind: type):
    """An argparse type: a number of `kind` > 0 (argparse prints the one-line error)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="stage recipe YAML")
    parser.add_argument("--gpus", type=_positive(int), required=True, help="number of GPUs (all nodes)")
    parser.add_argument("--gpu-mem", type=_positive(float), required=True, help="memory of one GPU in GB (H200: 141)")
    parser.add_argument(
        "--ep-size", type=_positive(int), default=None, help="expert-parallel size (default: gcd(gpus, E))"
    )
    parser.add_argument("--model-config", default=None, help="config.json to use instead of the recipe's model")
    parser.add_argument("--micro-batch", type=_positive(int), default=None, help="override per_device_train_batch_size")
    parser.add_argument("--seq-len", type=_positive(int), default=None, help="override data.max_length")
    args = parser.parse_args(argv)
    from model import load_config

    from .parallel.groups import ParallelConfigError, check_ep_size

    recipe_path = Path(args.config)
    if not recipe_path.is_file():
        parser.error(f"--config {recipe_path}: no such recipe")
    recipe = yaml.safe_load(recipe_path.read_text()) or {}
    config = load_config(args.model_config) if args.model_config else find_model_config(recipe_path, recipe)
    layout = layout_from_recipe(recipe, config, args.gpus, args.ep_size)
    if args.micro_batch:
        layout.micro_batch = args.micro_batch
    if args.seq_len:
        layout.seq_len = args.seq_len
    try:
        check_ep_size(layout.ep_size, layout.gpus, config.n_routed_experts)
    except ParallelConfigError as err:
        parser.error(str(err))
    gpu_bytes = args.gpu_mem * 1e9
    census = count_params(config, layout)  # one meta-device build of the model for every figure below
    plan = plan_memory(config, layout, census)
    print(format_plan(plan, gpu_bytes))
    if plan.total > gpu_bytes * GPU_USABLE:
        print("what dominates, and what would shrink it:")
        print("\n".join(advise(plan)))
    host = host_load_bytes(config, layout, census)
    print(
        f"host memory at load: {host / GIB:.1f} GiB per rank, {host * min(8, layout.gpus) / GIB:.0f} GiB per 8-GPU node"
    )
    best = smallest_fit(config, layout, gpu_bytes, census=census)
    if best is None:
        print(f"no GPU count up to 4096 fits in {args.gpu_mem:g} GB per GPU")
        return 1
    gpus, fitting = best
    print(f"smallest GPU count that fits: {gpus} (ep_size {fitting.layout.ep_size}, {fitting.total / GIB:.1f} GiB)")
    return 0 if plan.total <= gpu_bytes * GPU_USABLE else 2


if __name__ == "__main__":
    sys.exit(main())
