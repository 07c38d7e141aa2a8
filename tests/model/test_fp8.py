"""FP8 quantization against an independent implementation of the official formulas, FP8 layers, LoRA on FP8."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import fp8
from model.fp8 import (
    FP8Linear,
    FP8TrainingLinear,
    apply_fp8_training,
    check_quantization_config,
    dequantize_experts,
    dequantize_weight,
    fake_quantize_activation,
    fp8_gemm,
    fp8_grouped_mm,
    fp8_training_grouped_mm,
    quantize_activation,
    quantize_experts,
    quantize_weight,
)

# ---------------------------------------------------------------------------------------------------------------
# Independent reference: plain numpy, one block at a time, e4m3 rounding written out by hand.


def e4m3_round(values: np.ndarray) -> np.ndarray:
    """Round float32 values in [-448, 448] to the nearest e4m3 value (ties to even), by the format's definition:
    3 mantissa bits, exponents -6..8, subnormal quantum 2^-9."""
    v = values.astype(np.float64)
    mag = np.abs(v)
    _, e = np.frexp(np.where(mag > 0, mag, 1.0))  # mag = m * 2^e, m in [0.5, 1): floor(log2 mag) = e - 1
    quantum = np.exp2(np.maximum(e - 1, -6) - 3.0)
    rounded = np.minimum(np.round(mag / quantum) * quantum, 448.0)  # np.round rounds half to even
    return np.copysign(np.where(mag > 0, rounded, 0.0), v)


def pow2_ceil(s: float) -> float:
    """Smallest power of two >= s, by search."""
    p = 2.0 ** math.floor(math.log2(s))
    while p < s:
        p *= 2
    while p / 2 >= s:
        p /= 2
    return p


def reference_weight_quant(w: np.ndarray, ue8m0: bool) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = w.shape
    codes = np.zeros_like(w, dtype=np.float64)
    scales = np.zeros((math.ceil(rows / 128), math.ceil(cols / 128)), dtype=np.float32)
    for bi in range(scales.shape[0]):
        for bj in range(scales.shape[1]):
            block = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128].astype(np.float32)
            amax = np.float32(np.abs(block).max())
            s = np.float32(amax / np.float32(448.0)) if amax > 0 else np.float32(1.0)
            if ue8m0:
                s = np.float32(pow2_ceil(float(s)))
            scales[bi, bj] = s
            codes[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128] = e4m3_round(np.clip(block / s, -448, 448))
    return codes, scales


def reference_act_quant(x: np.ndarray, ue8m0: bool) -> tuple[np.ndarray, np.ndarray]:
    tokens, cols = x.shape
    codes = np.zeros_like(x, dtype=np.float64)
    scales = np.zeros((tokens, math.ceil(cols / 128)), dtype=np.float32)
    for t in range(tokens):
        for g in range(scales.shape[1]):
            tile = x[t, g * 128 : (g + 1) * 128].astype(np.float32)
            s = np.float32(max(np.float32(np.abs(tile).max()), np.float32(1e-4)) / np.float32(448.0))
            if ue8m0:
                s = np.float32(pow2_ceil(float(s)))
            scales[t, g] = s
            codes[t, g * 128 : (g + 1) * 128] = e4m3_round(np.clip(tile / s, -448, 448))
    return codes, scales


def as_bits(codes: torch.Tensor) -> np.ndarray:
    return codes.view(torch.uint8).numpy()


def reference_bits(values: np.ndarray) -> np.ndarray:
    # Every value is exactly representable in e4m3, so this cast cannot round.
    return as_bits(torch.from_numpy(values).to(torch.float8_e4m3fn))


def spread_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights spanning many binades, with an all-zero block and a tiny block, to exercise every code path."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-12, 4, (rows, cols), generator=g).float())
    w[:128, 128:256] = 0.0
    w[128:, :128] *= 1e-6
    return w


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(300, 200), (576, 256), (129, 385)])
def test_weight_quantization_is_bit_exact(shape, scale_fmt):
    w = spread_weight(*shape)
    codes, scale = quantize_weight(w, scale_fmt)
    ref_codes, ref_scale = reference_weight_quant(w.numpy(), scale_fmt == "ue8m0")
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    np.testing.assert_array_equal(scale.numpy().view(np.uint32), ref_scale.view(np.uint32))
    np.testing.assert_array_equal(as_bits(codes), reference_bits(ref_codes))
    if scale_fmt == "ue8m0":
        mantissa, _ = torch.frexp(scale)
        assert torch.all(mantissa == 0.5)


def test_expert_weights_quantize_per_expert():
    w = torch.stack([spread_weight(200, 130, seed) for seed in range(3)])  # [E, N, K]
    codes, scale = quantize_weight(w)
    assert scale.shape == (3, 2, 2)
    for e in range(3):
        ref_codes, ref_scale = reference_weight_quant(w[e].numpy(), False)
        np.testing.assert_array_equal(scale[e].numpy(), ref_scale)
        np.testing.assert_array_equal(as_bits(codes[e]), reference_bits(ref_codes))


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_activation_quantization_is_bit_exact(scale_fmt):
    x = spread_weight(6, 300, seed=3)[:, :300].clone()
    x[2] = 0.0  # amax clamp: an all-zero token gets s = 1e-4 / 448
    x[3, :128] = 1e-7
    codes, scale = quantize_activation(x, scale_fmt)
    ref_codes, ref_scale = reference_act_quant(x.numpy(), scale_fmt == "ue8m0")
    assert scale.shape == (6, 3)
    np.testing.assert_array_equal(scale.numpy().view(np.uint32), ref_scale.view(np.uint32))
    np.testing.assert_array_equal(as_bits(codes), reference_bits(ref_codes))


def test_dequantization_matches_elementwise_formula():
    w = spread_weight(300, 200)
    codes, scale = quantize_weight(w)
    rows, cols = np.arange(300)[:, None], np.arange(200)[None, :]
    ref = codes.float().numpy() * scale.numpy()[rows // 128, cols // 128]  # W[i, j] = q[i, j] * s[i//128, j//128]
    np.testing.assert_array_equal(dequantize_weight(codes, scale, torch.float32).numpy(), ref)
    assert torch.equal(dequantize_weight(codes, scale, torch.bfloat16), torch.from_numpy(ref).bfloat16())
    # quantization error of e4m3: at most half a step of 3 mantissa bits, relative 2^-4 of each value's binade
    normal = w.abs() > scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] * 2**-6
    err = (dequantize_weight(codes, scale, torch.float32) - w).abs()
    assert torch.all(err[normal] <= w.abs()[normal] * 2**-4)


def test_fp8_gemm_emulated_matches_blockwise_formula():
    torch.manual_seed(0)
    x, w = torch.randn(37, 300), torch.randn(200, 300)
    a, a_scale = quantize_activation(x)
    b, b_scale = quantize_weight(w)
    out = fp8_gemm(a, a_scale, b, b_scale, torch.float32, backend="emulated")
    ref = torch.zeros(37, 200, dtype=torch.float64)
    for kb in range(3):
        ks = slice(kb * 128, (kb + 1) * 128)
        partial = a[:, ks].double() @ b[:, ks].double().t()  # exact: products of e4m3 codes
        ref += partial * a_scale[:, kb, None].double() * b_scale[:, kb].double().repeat_interleave(128)[None, :200]
    # fp32 accumulation of K=300 terms of size <= ~10: worst-case rounding ~ 300 * 2^-24 * 10 = 2e-4
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-4)
    # and it is close to the unquantized product (e4m3 has a 2^-4 relative step)
    rel = (out - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel < 0.05


def test_resolve_backend_on_cpu_is_emulated():
    assert fp8.resolve_backend("auto", torch.device("cpu"), 256, 256) == "emulated"
    with pytest.raises(ValueError, match="backend"):
        fp8.resolve_backend("cutlass", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors_name_the_tensor():
    codes, scale = quantize_weight(torch.randn(256, 300))
    name = "model.layers.0.self_attn.q_a_proj.weight"
    with pytest.raises(ValueError, match=rf"{name}_scale_inv: shape \(2, 2\).*expected \(2, 3\)"):
        dequantize_weight(codes, scale[:, :2], name=name)
    with pytest.raises(ValueError, match=rf"{name}: FP8 tensor without its scale"):
        dequantize_weight(codes, None, name=name)
    with pytest.raises(ValueError, match=rf"{name}: unknown FP8 scale_fmt 'e8m0'"):
        quantize_weight(torch.randn(4, 4), "e8m0", name=name)
    with pytest.raises(ValueError, match=r"experts.gate_up_proj_scale_inv: shape"):
        dequantize_experts(*quantize_weight(torch.randn(2, 320, 128)), gate_up=True, name="experts.gate_up_proj")
    with pytest.raises(ValueError, match=r"quantization_config.fmt='e5m2'"):
        check_quantization_config({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match=r"weight_block_size"):
        check_quantization_config({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]})
    assert check_quantization_config({"fmt": "e4m3", "scale_fmt": "ue8m0"}) == "ue8m0"


# ---------------------------------------------------------------------------------------------------------------
# Frozen FP8 linear layers


def test_fp8_linear_forward_backward_and_storage():
    torch.manual_seed(0)
    linear = nn.Linear(300, 200, bias=False)
    layer = FP8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    assert set(layer.state_dict()) == {"weight", "weight_scale_inv"}
    assert layer.weight_scale_inv.shape == (2, 3)
    dequantized = layer.dequantized_weight(torch.float32)

    x = torch.randn(4, 5, 300, requires_grad=True)
    out = layer(x)
    a, a_scale = quantize_activation(x.detach().reshape(-1, 300))
    expected = fp8_gemm(a, a_scale, layer.weight, layer.weight_scale_inv, torch.float32, "emulated")
    torch.testing.assert_close(out.reshape(-1, 200), expected, rtol=0, atol=0)
    out.square().sum().backward()
    # straight-through: the input gradient is the one of x @ W_deq^T at the FP8 output
    torch.testing.assert_close(x.grad, (2 * out.detach()) @ dequantized, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None

    layer.quantize_activations = False
    torch.testing.assert_close(layer(x), F.linear(x, dequantized), rtol=0, atol=0)

    # a dtype cast of the model must not turn codes into plain numbers
    bits = layer.weight.view(torch.uint8).clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale_inv.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), bits)
    meta = FP8Linear(300, 200, device="meta").to_empty(device="cpu")
    assert meta.weight.device.type == "cpu" and meta.weight.dtype == torch.float8_e4m3fn

    total, weights = fp8.fp8_tensor_bytes(layer)
    assert weights == 60000 and total / weights < 1.001


class TinyBlock(nn.Module):
    """Attention-like and shared-expert-like projections, named as in the model, for LoRA on FP8."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.self_attn.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Module()
        self.mlp.shared_experts = nn.Module()
        self.mlp.shared_experts.up_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.mlp.shared_experts.down_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.mlp.gate = nn.Linear(hidden, 8, bias=False)  # the router: never FP8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn.o_proj(torch.tanh(self.self_attn.q_proj(x)))
        return h + self.mlp.shared_experts.down_proj(F.silu(self.mlp.shared_experts.up_proj(h)))


FP8_NAMES = ["self_attn.q_proj", "self_attn.o_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"]


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_peft_lora_trains_on_fp8_base(autocast_adapter_dtype):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    teacher = TinyBlock()
    student = TinyBlock()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # the student starts from a perturbed base; LoRA has to learn the difference
        student.self_attn.q_proj.weight.add_(0.05 * torch.randn(256, 256))
    fp8.replace_linear_with_fp8(student, FP8_NAMES)
    frozen = {n: m.weight.view(torch.uint8).clone() for n, m in student.named_modules() if isinstance(m, FP8Linear)}

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"])
    model = get_peft_model(student, config, autocast_adapter_dtype=autocast_adapter_dtype)
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora_params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # peft copies the base weight's dtype to the adapters; FP8Linear.compute_dtype (fp32 here: the layers were
    # quantized from fp32) keeps them out of float8 whether or not peft upcasts them afterwards
    assert all(p.dtype == torch.float32 for p in lora_params)

    opt = torch.optim.AdamW(lora_params, lr=3e-3)
    x = torch.randn(64, 256)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, module in student.named_modules():
        if isinstance(module, FP8Linear):
            assert torch.equal(module.weight.view(torch.uint8), frozen[name.removesuffix(".base_layer")])


def test_peft_lora_dtype_follows_compute_dtype():
    from peft import LoraConfig, get_peft_model

    block = TinyBlock()
    fp8.replace_linear_with_fp8(block, FP8_NAMES)
    for name in FP8_NAMES:
        block.get_submodule(name).compute_dtype = torch.bfloat16
    model = get_peft_model(block, LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    lora_a = model.base_model.model.self_attn.q_proj.lora_A["default"].weight
    assert lora_a.dtype == torch.bfloat16
    assert model(torch.randn(3, 256)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Fused routed experts


def test_fused_expert_scales_stay_exact_for_partial_blocks():
    torch.manual_seed(0)
    experts, inter, hidden = 3, 160, 200  # I % 128 != 0: a shared [2I/128] scale row would mix gate and up
    gate_up = torch.randn(experts, 2 * inter, hidden)
    codes, scale = quantize_experts(gate_up, gate_up=True)
    assert scale.shape == (experts, 4, 2) == fp8.fused_scale_shape(tuple(gate_up.shape), gate_up=True)
    for e in range(experts):
        gate_codes, gate_scale = quantize_weight(gate_up[e, :inter])
        up_codes, up_scale = quantize_weight(gate_up[e, inter:])
        assert torch.equal(codes[e].view(torch.uint8), torch.cat([gate_codes, up_codes]).view(torch.uint8))
        assert torch.equal(scale[e], torch.cat([gate_scale, up_scale]))
        expected = torch.cat([dequantize_weight(gate_codes, gate_scale), dequantize_weight(up_codes, up_scale)])
        assert torch.equal(dequantize_experts(codes[e : e + 1], scale[e : e + 1], True)[0], expected)


@pytest.mark.parametrize("gate_up", [True, False])
def test_fp8_grouped_mm_matches_per_expert_loop(gate_up, monkeypatch):
    torch.manual_seed(0)
    experts, rows, cols = 4, 320, 200
    codes, scale = quantize_experts(torch.randn(experts, rows, cols), gate_up=gate_up)
    counts = torch.tensor([5, 0, 7, 4])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), cols, requires_grad=True)
    monkeypatch.setattr(fp8, "EXPERT_DEQUANT_BUDGET", rows * cols * 4 * 2)  # two experts per chunk
    out = fp8_grouped_mm(x, codes, scale, offsets, gate_up)
    out.backward(torch.ones_like(out))
    weights = dequantize_experts(codes, scale, gate_up, torch.float32)
    x_q = fake_quantize_activation(x.detach())
    start = 0
    for e, n in enumerate(counts.tolist()):
        rows_e = slice(start, start + n)
        torch.testing.assert_close(out[rows_e], x_q[rows_e] @ weights[e].t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad[rows_e], torch.ones(n, rows) @ weights[e], rtol=1e-5, atol=1e-5)
        start += n


# ---------------------------------------------------------------------------------------------------------------
# FP8 forward for trainable weights


def test_fp8_training_linear_forward_is_fp8_and_backward_is_high_precision():
    torch.manual_seed(0)
    linear = nn.Linear(300, 200)
    layer = FP8TrainingLinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(6, 300, requires_grad=True)
    out = layer(x)
    a, a_scale = quantize_activation(x.detach())
    b, b_scale = quantize_weight(linear.weight.detach())
    torch.testing.assert_close(out, fp8_gemm(a, a_scale, b, b_scale, torch.float32, "emulated") + linear.bias)
    grad = torch.randn(6, 200)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ linear.weight.detach())
    torch.testing.assert_close(linear.weight.grad, grad.t() @ x.detach())
    torch.testing.assert_close(linear.bias.grad, grad.sum(0))


def test_fp8_training_grouped_mm_gradients_are_those_of_the_unquantized_product():
    torch.manual_seed(0)
    weight = torch.randn(3, 320, 200, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    x = torch.randn(10, 200, requires_grad=True)
    out = fp8_training_grouped_mm(x, weight, offsets, gate_up=True)
    ref_x = x.detach().clone().requires_grad_()
    ref_w = weight.detach().clone().requires_grad_()
    ref = torch._grouped_mm(ref_x, ref_w.transpose(1, 2), offs=offsets)
    assert (out - ref).norm() / ref.norm() < 0.05  # FP8 forward
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad)


def test_apply_fp8_training_selects_groups_by_name():
    block = TinyBlock()
    weights_before = {n: p for n, p in block.named_parameters()}
    changed = apply_fp8_training(block, groups=("attention",))
    assert changed == ["self_attn.q_proj", "self_attn.o_proj"]
    assert isinstance(block.self_attn.q_proj, FP8TrainingLinear)
    assert type(block.mlp.shared_experts.up_proj) is nn.Linear
    changed = apply_fp8_training(block, groups=("shared", "dense"))
    assert changed == ["mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"]
    assert type(block.mlp.gate) is nn.Linear  # the router stays high precision
    assert {n: p for n, p in block.named_parameters()} == weights_before
    with pytest.raises(ValueError, match="unknown FP8 module groups"):
        apply_fp8_training(block, groups=("router",))
