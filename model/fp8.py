"""FP8 as DeepSeek-V3 ships it: e4m3 codes with 128x128 block scales for weights, 1x128 scales for activations.

- `quantize_weight` / `dequantize_weight` / `quantize_activation` reproduce the official formulas bit for bit.
- `fp8_gemm` is one interface over backends: "emulated" (exact quantization, fp32 matmul; runs anywhere and is
  the reference), "scaled_mm" (torch's cuBLAS blockwise FP8 GEMM, Hopper) and "triton" (model/fp8_triton.py).
- `FP8Linear` holds a frozen checkpoint weight as 1 byte per weight plus `weight_scale_inv`; gradients reach the
  input (and adapters such as peft LoRA on top), never the FP8 weight.
- `fp8_grouped_mm` does the same for the fused routed experts; their gate_up scale layout is
  [E, 2 * ceil(I/128), ceil(H/128)] (gate blocks, then up blocks) so it stays exact when I % 128 != 0.
- `FP8TrainingLinear` / `fp8_training_grouped_mm` / `apply_fp8_training` give trainable BF16/FP32 weights an FP8
  forward (paper recipe: 128x128 weight blocks, 1x128 activation tiles) and a high-precision straight-through
  backward.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekV3Config
from .moe import RoutedExperts, no_autocast

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
BLOCK_SIZE = 128
# Weights the official FP8 checkpoint stores as e4m3 (checkpoint or model names); everything else (embeddings,
# heads, norms, router, eh_proj, the MTP norms) stays BF16/FP32.
OFFICIAL_FP8_WEIGHT = re.compile(
    r".*\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def is_official_fp8_weight(name: str) -> bool:
    """Whether the official FP8 checkpoint quantizes the weight `name` (a per-expert or dense linear weight)."""
    return OFFICIAL_FP8_WEIGHT.match(name) is not None


ACTIVATION_AMAX_MIN = 1e-4  # the official act_quant clamp: keeps the scale of an all-zero tile finite
SCALE_FMTS = (None, "ue8m0")
SCALE_DTYPES = (torch.float32, torch.bfloat16, getattr(torch, "float8_e8m0fnu", torch.float32))
BACKENDS = ("auto", "emulated", "scaled_mm", "triton")
FP8_GROUPS = ("attention", "shared", "dense", "experts")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_scale_fmt(scale_fmt: str | None, name: str = "tensor") -> None:
    """Raise one ValueError naming the tensor when scale_fmt is not None or "ue8m0"."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"{name}: unknown FP8 scale_fmt {scale_fmt!r}; expected None (fp32 scales) or 'ue8m0'")


def check_quantization_config(quantization_config: dict, name: str = "config.json") -> str | None:
    """Validate a checkpoint's quantization_config (DeepSeek-V3 FP8 only) and return its scale_fmt."""
    where = f"{name}: quantization_config"
    if quantization_config.get("quant_method", "fp8") != "fp8":
        raise ValueError(f"{where}.quant_method={quantization_config['quant_method']!r} is not supported (only 'fp8')")
    if quantization_config.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{where}.fmt={quantization_config['fmt']!r} is not supported (only 'e4m3')")
    block = list(quantization_config.get("weight_block_size", [BLOCK_SIZE, BLOCK_SIZE]))
    if block != [BLOCK_SIZE, BLOCK_SIZE]:
        raise ValueError(f"{where}.weight_block_size={block} is not supported (only [128, 128])")
    if quantization_config.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(
            f"{where}.activation_scheme={quantization_config['activation_scheme']!r} is not supported (only 'dynamic')"
        )
    scale_fmt = quantization_config.get("scale_fmt")
    check_scale_fmt(scale_fmt, where)
    return scale_fmt


def check_fp8_weight(codes: torch.Tensor, scale_inv: torch.Tensor | None, name: str = "weight") -> None:
    """Raise one ValueError naming the tensor if codes are not e4m3 or scale_inv is missing or mis-shaped."""
    if codes.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: expected float8_e4m3fn codes, got {codes.dtype}")
    if scale_inv is None:
        raise ValueError(f"{name}: FP8 tensor without its scale ({_scale_name(name)} is missing)")
    if codes.dim() < 2:
        raise ValueError(f"{name}: FP8 weights are at least 2-D, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape[-2:]
    expected = (*codes.shape[:-2], _cdiv(rows, BLOCK_SIZE), _cdiv(cols, BLOCK_SIZE))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{_scale_name(name)}: shape {tuple(scale_inv.shape)} does not fit {name} of shape {tuple(codes.shape)}; "
            f"expected {expected} (one scale per 128x128 block)"
        )
    if scale_inv.dtype not in SCALE_DTYPES:
        raise ValueError(f"{_scale_name(name)}: expected float32 scales, got {scale_inv.dtype}")


def _scale_name(name: str) -> str:
    return f"{name}_scale_inv"


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to a power of two exactly (the ue8m0 scale format of V3.1)."""
    # Bit-exact ceil(log2(s)): s = m * 2^e with m in [0.5, 1); s is already a power of two when m == 0.5.
    mantissa, exponent = torch.frexp(scale)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale), exponent)


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    # x / s is at most 448 up to one rounding of the division; the clamp keeps that last ulp from becoming NaN.
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(
    weight: torch.Tensor, scale_fmt: str | None = None, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> (e4m3 codes [..., N, K], fp32 scale_inv [..., ceil(N/128), ceil(K/128)]).

    Per 128x128 block (edge blocks may be partial): s = amax(|block|) / 448, codes = e4m3(W / s), scale_inv = s.
    An all-zero block gets s = 1 (any s gives zero codes; the formula would give 0/0).
    """
    check_scale_fmt(scale_fmt, name)
    if weight.dim() < 2:
        raise ValueError(f"{name}: only tensors with at least 2 dims are block-quantized, got {tuple(weight.shape)}")
    rows, cols = weight.shape[-2:]
    row_blocks, col_blocks = _cdiv(rows, BLOCK_SIZE), _cdiv(cols, BLOCK_SIZE)
    # Zero padding cannot change a block's amax, so partial edge blocks quantize as the official code does.
    padded = F.pad(weight.float(), (0, col_blocks * BLOCK_SIZE - cols, 0, row_blocks * BLOCK_SIZE - rows))
    blocks = padded.unflatten(-1, (col_blocks, BLOCK_SIZE)).unflatten(
        -3, (row_blocks, BLOCK_SIZE)
    )  # [.., R, 128, C, 128]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., R, C]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        scale = round_scale_ue8m0(scale)
    codes = _to_e4m3(blocks / scale[..., :, None, :, None])
    codes = codes.flatten(-2, -1).flatten(-3, -2)[..., :rows, :cols]
    return codes.contiguous(), scale


def dequantize_weight(
    codes: torch.Tensor, scale_inv: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16, name: str = "weight"
) -> torch.Tensor:
    """W = codes * scale_inv[i // 128, j // 128], computed in fp32 and then cast to dtype (as fp8_cast_bf16.py)."""
    check_fp8_weight(codes, scale_inv, name)
    rows, cols = codes.shape[-2:]
    weight = codes.float()  # [..., N, K]
    # Expand the scales over rows only and broadcast them over each row's 128-wide column blocks through a view:
    # a fully expanded scale tensor would be a second weight-sized fp32 tensor.
    scale = scale_inv.float().repeat_interleave(BLOCK_SIZE, dim=-2)[..., :rows, :]  # [..., N, ceil(K/128)]
    full = cols // BLOCK_SIZE
    weight[..., : full * BLOCK_SIZE].unflatten(-1, (full, BLOCK_SIZE)).mul_(scale[..., :full, None])
    if cols % BLOCK_SIZE:
        weight[..., full * BLOCK_SIZE :].mul_(scale[..., full:])
    return weight.to(dtype)


def quantize_activation(x: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (e4m3 codes [..., K], fp32 scales [..., ceil(K/128)]), per token per 128 channels.

    Official act_quant: amax clamped to >= 1e-4, s = amax / 448 (ue8m0: rounded up to a power of two).
    """
    check_scale_fmt(scale_fmt, "activation")
    cols = x.shape[-1]
    col_blocks = _cdiv(cols, BLOCK_SIZE)
    tiles = F.pad(x.float(), (0, col_blocks * BLOCK_SIZE - cols)).unflatten(-1, (col_blocks, BLOCK_SIZE))
    scale = tiles.abs().amax(dim=-1).clamp(min=ACTIVATION_AMAX_MIN) / FP8_MAX  # [..., C]
    if scale_fmt == "ue8m0":
        scale = round_scale_ue8m0(scale)
    codes = _to_e4m3(tiles / scale[..., None]).flatten(-2, -1)[..., :cols]
    return codes.contiguous(), scale


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_activation, in fp32: x = codes * scale[..., k // 128]."""
    cols = codes.shape[-1]
    return codes.float() * scale.repeat_interleave(BLOCK_SIZE, dim=-1)[..., :cols]


def fake_quantize_activation(x: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """Round x through 1x128 e4m3 quantization, returned in fp32 (products of these with FP8 weights are exact)."""
    return dequantize_activation(*quantize_activation(x, scale_fmt))


# ---------------------------------------------------------------------------------------------------------------
# GEMM backends


def _scaled_mm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _triton_available(device: torch.device) -> bool:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, n: int | None = None, k: int | None = None) -> str:
    """Pick the GEMM backend: an explicit name is checked, "auto" takes the fastest one this device has."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 GEMM backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    aligned = n is None or (n % BLOCK_SIZE == 0 and k % BLOCK_SIZE == 0)
    if aligned and _scaled_mm_available(device):
        return "scaled_mm"
    if _triton_available(device):
        return "triton"
    return "emulated"


def _gemm_emulated(a, a_scale, b, b_scale_inv, out_dtype):
    # dequantize(a) @ dequantize(b)^T equals sum_kb (a_q b_q^T) * s_a[m, kb] * s_b[n // 128, kb] up to fp32
    # rounding: each dequantized value is one exact e4m3 code times its scale, rounded once to fp32.
    a_deq = dequantize_activation(a, a_scale)  # [M, K]
    b_deq = dequantize_weight(b, b_scale_inv, torch.float32)  # [N, K]
    return (a_deq @ b_deq.t()).to(out_dtype)


def _gemm_scaled_mm(a, a_scale, b, b_scale_inv, out_dtype):
    # cuBLAS (CUDA >= 12.9, sm90) blockwise scaling: a's 1x128 scales outer-dim-major [M, K/128] with stride
    # (1, M); b = codes^T [K, N] column-major with 128x128 scales [L4, N/128] (L padded to a multiple of 4) with
    # stride (1, L4). Layout as in torch's test_scaled_mm_block_wise_numerics.
    scale_a = a_scale.float().t().contiguous().t()
    k_blocks = b_scale_inv.shape[1]
    scale_b = F.pad(b_scale_inv.float(), (0, (-k_blocks) % 4)).t()
    if hasattr(F, "scaled_mm"):
        from torch.nn.functional import ScalingType, SwizzleType

        return F.scaled_mm(
            a,
            b.t(),
            scale_a,
            ScalingType.BlockWise1x128,
            scale_b,
            ScalingType.BlockWise128x128,
            swizzle_a=SwizzleType.NO_SWIZZLE,
            swizzle_b=SwizzleType.NO_SWIZZLE,
            output_dtype=out_dtype,
        )
    return torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=out_dtype)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-scaled FP8 GEMM: a [M, K] e4m3 with 1x128 scales [M, ceil(K/128)], b [N, K] e4m3 with 128x128
    scale_inv [ceil(N/128), ceil(K/128)] -> [M, N] = sum over K blocks of (a_q b_q^T) * s_a * s_b, fp32 accumulate."""
    check_fp8_weight(b, b_scale_inv, "b")
    if a.dtype != FP8_DTYPE or a_scale.shape != (a.shape[0], b_scale_inv.shape[1]):
        raise ValueError(f"a: expected e4m3 codes with scales {(a.shape[0], b_scale_inv.shape[1])}")
    backend = resolve_backend(backend, a.device, b.shape[0], b.shape[1])
    if backend == "emulated":
        return _gemm_emulated(a, a_scale, b, b_scale_inv, out_dtype)
    if backend == "scaled_mm":
        return _gemm_scaled_mm(a, a_scale, b, b_scale_inv, out_dtype)
    from .fp8_triton import triton_fp8_gemm

    return triton_fp8_gemm(a, a_scale, b, b_scale_inv, out_dtype)


def fp8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_fmt: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x [..., K] @ W^T for an FP8 weight, the official inference way: activations quantized per token per 128."""
    a, a_scale = quantize_activation(x.reshape(-1, x.shape[-1]), scale_fmt)
    out = fp8_gemm(a, a_scale, codes, scale_inv, x.dtype, backend)
    out = out.view(*x.shape[:-1], codes.shape[0])
    return out if bias is None else out + bias


# ---------------------------------------------------------------------------------------------------------------
# Frozen FP8 weights


class _FrozenFP8Linear(torch.autograd.Function):
    """FP8 forward; the input gradient goes through the dequantized weight (straight-through the activation
    quantization). The codes and scales get no gradient."""

    @staticmethod
    def forward(ctx, x, codes, scale_inv, bias, quantize_activations, scale_fmt, backend):
        ctx.save_for_backward(codes, scale_inv)
        ctx.has_bias = bias is not None
        if quantize_activations:
            return fp8_linear(x, codes, scale_inv, bias, scale_fmt, backend)
        return F.linear(x, dequantize_weight(codes, scale_inv, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale_inv = ctx.saved_tensors
        grad_x = grad_out @ dequantize_weight(codes, scale_inv, grad_out.dtype)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, None, None, grad_bias, None, None, None


def _apply_keeping_dtype(module: nn.Module, fn: Callable, names: Iterable[str]) -> None:
    """Move the named FP8 tensors with the module (device, to_empty) but never cast them: a dtype cast such as
    model.to(torch.bfloat16) would turn the codes into plain numbers without their block scales."""
    for name in names:
        param = module._parameters.get(name)
        if param is None:
            continue
        target = fn(torch.empty(0, device=param.device)).device  # what fn does to a float tensor tells where to
        if param.device == target:
            continue
        moved = torch.empty_like(param, device=target) if param.is_meta else param.to(target)
        module._parameters[name] = nn.Parameter(moved, requires_grad=False)


class FP8Linear(nn.Linear):
    """A frozen nn.Linear stored as in the official checkpoint: `weight` e4m3 [out, in] (1 byte per weight) and
    `weight_scale_inv` fp32 [ceil(out/128), ceil(in/128)].

    forward quantizes activations per token per 128 channels and runs the FP8 GEMM (official inference), or,
    with quantize_activations=False, multiplies by the weight dequantized into the activation dtype. Gradients
    reach the input only, so peft LoRA on top trains; `compute_dtype` is what peft gives the LoRA weights (it
    would otherwise copy the weight's float8 dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        scale_fmt: str | None = None,
        quantize_activations: bool = True,
        backend: str = "auto",
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        nn.Module.__init__(self)  # skip nn.Linear's full-precision weight
        check_scale_fmt(scale_fmt, "FP8Linear")
        self.in_features, self.out_features = in_features, out_features
        self.scale_fmt = scale_fmt
        self.quantize_activations = quantize_activations
        self.backend = backend
        self.compute_dtype = compute_dtype
        scale_shape = (_cdiv(out_features, BLOCK_SIZE), _cdiv(in_features, BLOCK_SIZE))
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(torch.ones(scale_shape, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str | None = None, **kwargs) -> FP8Linear:
        """Quantize a full-precision nn.Linear (its weight is dropped)."""
        fp8 = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            linear.weight.device,
            scale_fmt=scale_fmt,
            compute_dtype=linear.weight.dtype,
            **kwargs,
        )
        codes, scale = quantize_weight(linear.weight.detach(), scale_fmt)
        fp8.weight.data, fp8.weight_scale_inv.data = codes, scale
        if linear.bias is not None:
            fp8.bias = linear.bias
        return fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenFP8Linear.apply(
            x, self.weight, self.weight_scale_inv, self.bias, self.quantize_activations, self.scale_fmt, self.backend
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the codes stand for, [out, in] in dtype (default: compute_dtype)."""
        return dequantize_weight(self.weight, self.weight_scale_inv, dtype or self.compute_dtype, "weight")

    def _apply(self, fn, recurse=True):
        _apply_keeping_dtype(self, fn, ("weight", "weight_scale_inv"))
        kept = {n: self._parameters.pop(n) for n in ("weight", "weight_scale_inv")}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters.update(kept)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fp8=e4m3 128x128, scale_fmt={self.scale_fmt}, quantize_activations={self.quantize_activations}"
        )


def replace_linear_with_fp8(model: nn.Module, names: Iterable[str], scale_fmt: str | None = None) -> None:
    """Swap the named nn.Linear submodules for FP8Linear quantized from their weights (tests and conversion)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), scale_fmt))


# ---------------------------------------------------------------------------------------------------------------
# Fused routed experts


def fuse_gate_up(
    gate: torch.Tensor, gate_scale_inv: torch.Tensor, up: torch.Tensor, up_scale_inv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert gate and up codes [..., I, H] with scales [..., ceil(I/128), ceil(H/128)] -> fused codes
    [..., 2I, H] and scales [..., 2 * ceil(I/128), ceil(H/128)], gate first: exact for any I."""
    return torch.cat([gate, up], dim=-2), torch.cat([gate_scale_inv, up_scale_inv], dim=-2)


def split_gate_up(
    codes: torch.Tensor, scale_inv: torch.Tensor, name: str = "gate_up_proj"
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of fuse_gate_up: ((gate codes, gate scales), (up codes, up scales))."""
    inter = codes.shape[-2] // 2
    blocks = _cdiv(inter, BLOCK_SIZE)
    expected = (*codes.shape[:-2], 2 * blocks, _cdiv(codes.shape[-1], BLOCK_SIZE))
    if codes.shape[-2] % 2 or tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{_scale_name(name)}: shape {tuple(scale_inv.shape)} does not fit fused {name} of shape "
            f"{tuple(codes.shape)}; expected {expected} (gate blocks, then up blocks)"
        )
    gate, up = codes.split(inter, dim=-2)
    gate_scale, up_scale = scale_inv.split(blocks, dim=-2)
    return (gate, gate_scale), (up, up_scale)


def fused_scale_shape(shape: tuple[int, ...], gate_up: bool) -> tuple[int, ...]:
    """The scale_inv shape of a fused expert weight of `shape` ([E, 2I, H] for gate_up, [E, H, I] for down)."""
    *lead, rows, cols = shape
    row_blocks = 2 * _cdiv(rows // 2, BLOCK_SIZE) if gate_up else _cdiv(rows, BLOCK_SIZE)
    return (*lead, row_blocks, _cdiv(cols, BLOCK_SIZE))


def quantize_experts(
    weight: torch.Tensor, gate_up: bool, scale_fmt: str | None = None, name: str = "experts"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a fused expert weight ([E, 2I, H] gate_up or [E, H, I] down) in the fused scale layout."""
    if not gate_up:
        return quantize_weight(weight, scale_fmt, name)
    gate, up = weight.chunk(2, dim=-2)
    return fuse_gate_up(*quantize_weight(gate, scale_fmt, name), *quantize_weight(up, scale_fmt, name))


def dequantize_experts(
    codes: torch.Tensor,
    scale_inv: torch.Tensor | None,
    gate_up: bool,
    dtype: torch.dtype = torch.bfloat16,
    name: str = "experts",
) -> torch.Tensor:
    """Dequantize a fused expert weight (or a slice of experts of it) in the fused scale layout."""
    if scale_inv is None:
        raise ValueError(f"{name}: FP8 tensor without its scale ({_scale_name(name)} is missing)")
    if not gate_up:
        return dequantize_weight(codes, scale_inv, dtype, name)
    (gate, gate_scale), (up, up_scale) = split_gate_up(codes, scale_inv, name)
    gate, up = dequantize_weight(gate, gate_scale, dtype, name), dequantize_weight(up, up_scale, dtype, name)
    return torch.cat([gate, up], dim=-2)


# Bytes of dequantized expert weights alive at once in the frozen experts' forward/backward.
EXPERT_DEQUANT_BUDGET = 1 << 30


def _expert_chunks(offsets: torch.Tensor, num_experts: int, expert_bytes: int):
    """(first expert, end expert, first row, end row) chunks of consecutive experts within the dequant budget."""
    per_chunk = max(1, EXPERT_DEQUANT_BUDGET // max(expert_bytes, 1))
    ends = [0, *offsets.tolist()]
    for start in range(0, num_experts, per_chunk):
        end = min(start + per_chunk, num_experts)
        if ends[end] > ends[start]:
            yield start, end, ends[start], ends[end]


def _grouped_mm_dequantized(x, codes, scale_inv, offsets, gate_up, dtype):
    """x [S, K] sorted by expert, FP8 codes [E, N, K] -> [S, N], dequantizing one budget-sized chunk at a time."""
    out = x.new_zeros(x.shape[0], codes.shape[-2], dtype=dtype)
    expert_bytes = codes[0].numel() * torch.finfo(dtype).bits // 8
    for first, end, lo, hi in _expert_chunks(offsets, codes.shape[0], expert_bytes):
        weight = dequantize_experts(codes[first:end], scale_inv[first:end], gate_up, dtype)  # [e, N, K]
        chunk_offsets = (offsets[first:end] - lo).to(torch.int32)
        out[lo:hi] = torch._grouped_mm(x[lo:hi].to(dtype), weight.transpose(1, 2), offs=chunk_offsets)
    return out


class _FrozenFP8GroupedMM(torch.autograd.Function):
    """Grouped GEMM over frozen FP8 experts: activations fake-quantized 1x128 in forward (exact emulation of the
    FP8 GEMM), straight-through input gradient through the dequantized experts."""

    @staticmethod
    def forward(ctx, x, codes, scale_inv, offsets, gate_up, quantize_activations, scale_fmt):
        ctx.save_for_backward(codes, scale_inv, offsets)
        ctx.gate_up = gate_up
        if quantize_activations:
            x_q = fake_quantize_activation(x, scale_fmt)  # [S, K] fp32
            return _grouped_mm_dequantized(x_q, codes, scale_inv, offsets, gate_up, torch.float32).to(x.dtype)
        return _grouped_mm_dequantized(x, codes, scale_inv, offsets, gate_up, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale_inv, offsets = ctx.saved_tensors
        grad_x = grad_out.new_zeros(grad_out.shape[0], codes.shape[-1])
        expert_bytes = codes[0].numel() * grad_out.element_size()
        for first, end, lo, hi in _expert_chunks(offsets, codes.shape[0], expert_bytes):
            weight = dequantize_experts(codes[first:end], scale_inv[first:end], ctx.gate_up, grad_out.dtype)
            chunk_offsets = (offsets[first:end] - lo).to(torch.int32)
            grad_x[lo:hi] = torch._grouped_mm(grad_out[lo:hi].contiguous(), weight, offs=chunk_offsets)
        return grad_x, None, None, None, None, None, None


def fp8_grouped_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale_inv: torch.Tensor,
    offsets: torch.Tensor,
    gate_up: bool,
    quantize_activations: bool = True,
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """Frozen FP8 experts: x [S, K] (rows sorted by expert, offsets [E] cumulative ends) @ expert_e^T -> [S, N]."""
    return _FrozenFP8GroupedMM.apply(x, codes, scale_inv, offsets, gate_up, quantize_activations, scale_fmt)


class FP8RoutedExperts(RoutedExperts):
    """Frozen routed experts holding the checkpoint's FP8 codes: gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    in e4m3 (1 byte per weight) with gate_up_proj_scale_inv [E, 2 * ceil(I/128), ceil(H/128)] (gate blocks, then
    up blocks) and down_proj_scale_inv [E, ceil(H/128), ceil(I/128)]. Gradients reach the tokens only."""

    def __init__(
        self,
        config: DeepseekV3Config,
        device: torch.device | str | None = None,
        scale_fmt: str | None = None,
        quantize_activations: bool = True,
    ):
        nn.Module.__init__(self)  # skip RoutedExperts' full-precision weights
        self.num_experts = config.n_routed_experts
        self.scale_fmt = scale_fmt
        self.quantize_activations = quantize_activations
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        for name, shape, gate_up in (
            ("gate_up_proj", (self.num_experts, 2 * inter, hidden), True),
            ("down_proj", (self.num_experts, hidden, inter), False),
        ):
            codes = torch.zeros(shape, dtype=FP8_DTYPE, device=device)
            setattr(self, name, nn.Parameter(codes, requires_grad=False))
            scale = torch.ones(fused_scale_shape(shape, gate_up), device=device)
            setattr(self, _scale_name(name), nn.Parameter(scale, requires_grad=False))

    @classmethod
    def from_experts(cls, experts: RoutedExperts, config: DeepseekV3Config, scale_fmt: str | None = None):
        """Quantize full-precision routed experts (tests and conversion)."""
        fp8 = cls(config, experts.gate_up_proj.device, scale_fmt)
        fp8.gate_up_proj.data, fp8.gate_up_proj_scale_inv.data = quantize_experts(
            experts.gate_up_proj.detach(), True, scale_fmt
        )
        fp8.down_proj.data, fp8.down_proj_scale_inv.data = quantize_experts(
            experts.down_proj.detach(), False, scale_fmt
        )
        return fp8

    def run_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0, dtype=torch.int32)
        quant, fmt = self.quantize_activations, self.scale_fmt
        gate_up = fp8_grouped_mm(tokens, self.gate_up_proj, self.gate_up_proj_scale_inv, offsets, True, quant, fmt)
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return fp8_grouped_mm(F.silu(gate) * up, self.down_proj, self.down_proj_scale_inv, offsets, False, quant, fmt)

    def _apply(self, fn, recurse=True):
        names = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")
        _apply_keeping_dtype(self, fn, names)
        kept = {n: self._parameters.pop(n) for n in names}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters.update(kept)


def apply_fp8_storage(
    model: nn.Module,
    module_names: Iterable[str],
    scale_fmt: str | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    quantize_activations: bool = True,
) -> None:
    """Swap the named nn.Linear / RoutedExperts modules for empty FP8 ones of the same shape (meta-device builds).

    The loader calls this before allocating the model, so the FP8 tensors are never materialised in BF16.
    """
    for name in module_names:
        module = model.get_submodule(name)
        device = next(module.parameters()).device
        if isinstance(module, RoutedExperts):
            new = FP8RoutedExperts(model.config, device, scale_fmt, quantize_activations)
        elif isinstance(module, nn.Linear):
            new = FP8Linear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                device,
                scale_fmt=scale_fmt,
                quantize_activations=quantize_activations,
                compute_dtype=compute_dtype,
            )
        else:
            raise ValueError(
                f"{name}: a {type(module).__name__} cannot hold FP8 weights (only linear layers and experts)"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


# ---------------------------------------------------------------------------------------------------------------
# FP8 forward for trainable weights


def _fake_quantize_weight(weight: torch.Tensor, scale_fmt: str | None, gate_up: bool = False) -> torch.Tensor:
    if gate_up:
        return dequantize_experts(*quantize_experts(weight, True, scale_fmt), True, torch.float32)
    return dequantize_weight(*quantize_weight(weight, scale_fmt), torch.float32)


class _FP8TrainingLinear(torch.autograd.Function):
    """Forward: weight 128x128 and activations 1x128 in e4m3, FP8 GEMM with fp32 accumulation. Backward: the
    high-precision gradients of the unquantized x @ W^T (straight-through)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_fmt, backend):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        codes, scale_inv = quantize_weight(weight.detach(), scale_fmt)
        return fp8_linear(x, codes, scale_inv, bias, scale_fmt, backend)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_2d.t() @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype)).to(weight.dtype)
        grad_b = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class FP8TrainingLinear(nn.Linear):
    """nn.Linear (same parameters, same names) whose forward runs in FP8 and whose backward is high precision."""

    scale_fmt: str | None = None
    backend: str = "auto"

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str | None = None, backend: str = "auto") -> FP8TrainingLinear:
        """Wrap a linear layer, sharing its weight and bias Parameters (optimizer references stay valid)."""
        check_scale_fmt(scale_fmt, "FP8TrainingLinear")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.scale_fmt, module.backend = scale_fmt, backend
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with no_autocast(x.device.type):  # the FP8 forward is its own precision (autocast has no FP8 dtypes)
            return _FP8TrainingLinear.apply(x, self.weight, self.bias, self.scale_fmt, self.backend)


class _FP8TrainingGroupedMM(torch.autograd.Function):
    """Fused trainable experts with an FP8 forward (per-expert 128x128 weight blocks, 1x128 activation tiles) and a
    high-precision straight-through backward."""

    @staticmethod
    def forward(ctx, x, weight, offsets, gate_up, scale_fmt):
        ctx.save_for_backward(x, weight, offsets)
        x_q = fake_quantize_activation(x, scale_fmt)  # [S, K] fp32
        w_q = _fake_quantize_weight(weight.detach(), scale_fmt, gate_up)  # [E, N, K] fp32
        return torch._grouped_mm(x_q, w_q.transpose(1, 2), offs=offsets).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dtype = torch.promote_types(grad_out.dtype, weight.dtype)
        grad_x = torch._grouped_mm(grad_out.to(dtype), weight, offs=offsets).to(x.dtype)  # [S, K]
        # grad_w[e] = grad_e^T x_e, a grouped GEMM whose groups run along the token dimension.
        grad_w = torch._grouped_mm(grad_out.to(dtype).t(), x.to(dtype), offs=offsets)  # [E, N, K]
        return grad_x, grad_w.to(weight.dtype), None, None, None


def fp8_training_grouped_mm(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, gate_up: bool, scale_fmt: str | None = None
) -> torch.Tensor:
    """Trainable fused experts with an FP8 forward: x [S, K] sorted by expert, weight [E, N, K] -> [S, N]."""
    with no_autocast(x.device.type):  # the FP8 forward is its own precision (autocast has no FP8 dtypes)
        return _FP8TrainingGroupedMM.apply(x, weight, offsets, gate_up, scale_fmt)


class FP8TrainingRoutedExperts(RoutedExperts):
    """Trainable routed experts (same Parameters) whose grouped GEMMs run an FP8 forward."""

    scale_fmt: str | None = None

    @classmethod
    def from_experts(cls, experts: RoutedExperts, scale_fmt: str | None = None) -> FP8TrainingRoutedExperts:
        """Wrap experts, sharing their gate_up_proj and down_proj Parameters."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.num_experts = experts.num_experts
        module.gate_up_proj, module.down_proj = experts.gate_up_proj, experts.down_proj
        module.scale_fmt = scale_fmt
        return module

    def run_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0, dtype=torch.int32)
        gate, up = fp8_training_grouped_mm(tokens, self.gate_up_proj, offsets, True, self.scale_fmt).chunk(2, dim=-1)
        return fp8_training_grouped_mm(F.silu(gate) * up, self.down_proj, offsets, False, self.scale_fmt)


def module_group(name: str) -> str | None:
    """Which FP8 group a module belongs to by its name; None for what the paper keeps in BF16/FP32 (embeddings,
    output head, router, norms, MTP projection)."""
    leaf = name.rpartition(".")[2]
    if leaf in ("gate", "lm_head", "embed_tokens", "eh_proj", "head") or "shared_head" in name:
        return None
    if ".experts" in name or name.startswith("experts"):
        return "experts"
    if "self_attn" in name:
        return "attention"
    if "shared_experts" in name:
        return "shared"
    if ".mlp." in name or name.startswith("mlp."):
        return "dense"
    return None


def apply_fp8_training(
    model: nn.Module,
    groups: Iterable[str] = FP8_GROUPS,
    scale_fmt: str | None = None,
    backend: str = "auto",
) -> list[str]:
    """Give the trainable linear layers and fused experts of the chosen groups an FP8 forward; returns their names.

    Linear layers become FP8TrainingLinear and routed experts FP8TrainingRoutedExperts, sharing the same
    Parameters, so the optimizer may be built before or after. Frozen FP8 modules are left alone.
    """
    groups = set(groups)
    unknown = groups - set(FP8_GROUPS)
    if unknown:
        raise ValueError(f"unknown FP8 module groups {sorted(unknown)}; expected some of {FP8_GROUPS}")
    check_scale_fmt(scale_fmt, "apply_fp8_training")
    changed = []
    for name, module in list(model.named_modules()):
        if module_group(name) not in groups:
            continue
        if type(module) is nn.Linear and module.weight.requires_grad:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, FP8TrainingLinear.from_linear(module, scale_fmt, backend))
            changed.append(name)
        elif type(module) is RoutedExperts and module.gate_up_proj.requires_grad:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, FP8TrainingRoutedExperts.from_experts(module, scale_fmt))
            changed.append(name)
    return changed


def fp8_tensor_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of FP8 codes plus their scales, number of FP8 weights) held by the model."""
    total, weights = 0, 0
    params = dict(model.named_parameters())
    for name, param in params.items():
        if param.dtype == FP8_DTYPE:
            scale = params.get(_scale_name(name))
            total += param.numel() + (scale.numel() * scale.element_size() if scale is not None else 0)
            weights += param.numel()
    return total, weights
