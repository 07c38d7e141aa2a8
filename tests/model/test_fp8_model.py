"""FP8 in the bundled model: an FP8 checkpoint of a tiny model kept in FP8 vs transformers on the dequantized
weights, the dequantize option, saving back to the official format, LoRA on the FP8 base, FP8 training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import DeepseekV3ForCausalLM
from model.checkpoint import CheckpointError, iter_hf_state
from model.fp8 import (
    FP8Linear,
    FP8RoutedExperts,
    FP8TrainingLinear,
    FP8TrainingRoutedExperts,
    apply_fp8_training,
    fp8_tensor_bytes,
    is_official_fp8_weight,
    quantize_weight,
)

from .reference import build_pair

QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def write_fp8_checkpoint(path: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """Quantize with the official formula and write per-expert keys with their own weight_scale_inv."""
    tensors = {}
    for key, tensor in state.items():
        if is_official_fp8_weight(key):
            tensors[key], tensors[key + "_scale_inv"] = quantize_weight(tensor)
        else:
            tensors[key] = tensor.contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": QUANT_CONFIG}))


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    # hidden 160 and expert width 144 are not multiples of 128: partial edge blocks everywhere, and the fused
    # gate_up scales of an expert are two separate partial-block rows.
    ours, reference = build_pair("qlora-groups-dense1-yarn", hidden_size=160, moe_intermediate_size=144)
    path = tmp_path_factory.mktemp("fp8")
    write_fp8_checkpoint(path, dict(iter_hf_state(ours)), ours.config.to_dict())
    return path, reference


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def projection_errors(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> dict[str, float]:
    """Relative error of every FP8Linear's output against the exact product with its dequantized weight."""
    errors, handles = {}, []

    def check(name):
        def hook(module, args, out):
            exact = torch.nn.functional.linear(args[0], module.dequantized_weight(torch.float32))
            errors[name] = relative_error(out, exact)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            handles.append(module.register_forward_hook(check(name)))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return errors


def noisy_logits(model, fp8_model, ids: torch.Tensor, seed: int, sigma: float) -> torch.Tensor:
    """Logits of `model` with relative Gaussian noise on the inputs of the modules that are FP8 in fp8_model."""
    g = torch.Generator().manual_seed(seed)
    names = {n for n, m in fp8_model.named_modules() if isinstance(m, FP8Linear | FP8RoutedExperts)}

    def perturb(module, args):
        return (args[0] * (1 + sigma * torch.randn(args[0].shape, generator=g)), *args[1:])

    handles = [m.register_forward_pre_hook(perturb) for n, m in model.named_modules() if n in names]
    with torch.no_grad():
        logits = model(ids).logits
    for handle in handles:
        handle.remove()
    return logits


def test_fp8_checkpoint_keeps_fp8_and_matches_transformers_on_dequantized_weights(fp8_checkpoint, tmp_path):
    path, reference = fp8_checkpoint
    kept = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    dequantized = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False, fp8="dequantize")

    # FP8 kept: every quantized linear layer and every routed-expert block, about 1 byte per weight
    fp8_linears = [n for n, m in kept.named_modules() if isinstance(m, FP8Linear)]
    fp8_experts = [n for n, m in kept.named_modules() if isinstance(m, FP8RoutedExperts)]
    assert len(fp8_experts) == 3  # 2 MoE decoder layers + the MTP layer
    assert "model.layers.0.mlp.gate_proj" in fp8_linears and "model.mtp.0.self_attn.kv_b_proj" in fp8_linears
    assert not any(n.endswith(("eh_proj", "lm_head", "head", ".gate")) for n in fp8_linears)
    fp8_bytes, fp8_weights = fp8_tensor_bytes(kept)
    assert fp8_bytes / fp8_weights <= 1.1
    assert not any(p.dtype == torch.float8_e4m3fn for p in dequantized.parameters())

    # transformers on the dequantized weights (the exact values the FP8 codes stand for)
    state = {k: v for k, v in dequantized.state_dict().items() if ".mtp." not in k}
    reference.load_state_dict(state, strict=True)
    ids = torch.randint(0, kept.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        logits_dequantized = dequantized(ids).logits
        logits_kept = kept(ids).logits
    # dequantize option: the same weights, so only fp32 rounding differs
    torch.testing.assert_close(logits_dequantized, expected, rtol=1e-4, atol=1e-4)
    # FP8 kept runs the official FP8 inference path: the weights are exact (see below), the activations are
    # rounded per token per 128 channels to e4m3 (3 mantissa bits: measured 2.6% RMS relative rounding error).
    # 1) Each FP8 projection is then 2-3% off its exact output (bound 4%).
    # 2) End to end the error is what this network does with rounding-sized noise: this tiny random model
    #    (init 0.1, chosen in tests/model/reference.py so routing is far from uniform) amplifies it, mostly
    #    through flipped expert choices. The same model with independent 2.6% RMS relative noise on the inputs
    #    of the same projections moves its logits by 27-44% (5 seeds); FP8 moves them by ~30-44%. Bound: 1.5x
    #    the largest of 4 noise runs. A trained model is far less sensitive; the bound is about the mechanism.
    per_layer = projection_errors(kept, ids)
    assert max(per_layer.values()) < 0.04, per_layer
    err = relative_error(logits_kept, expected)
    noise = [relative_error(noisy_logits(dequantized, kept, ids, seed, 0.026), expected) for seed in range(4)]
    assert err < 1.5 * max(noise), (err, noise)

    # with activation quantization off the FP8 layers are weight-only: fp32 tolerance again
    for module in kept.modules():
        if isinstance(module, FP8Linear | FP8RoutedExperts):
            module.quantize_activations = False
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, expected, rtol=1e-4, atol=1e-4)

    # saving writes the official format back: the same keys, codes and scales, bit for bit
    kept.save_pretrained(tmp_path)
    original, saved = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(original)
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype, key
        assert torch.equal(saved[key].view(torch.uint8), tensor.view(torch.uint8)) or torch.equal(saved[key], tensor)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
    dequantized.save_pretrained(tmp_path / "bf16")
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


def test_fp8_checkpoint_errors_name_the_tensor(fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    tensors = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    key = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    bad = dict(tensors)
    bad[key] = bad[key][:, :1].contiguous()
    save_file(bad, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{key} \(2, 1\) \(model expects \(2, 2\)\)"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, progress=False)

    key = "model.layers.0.self_attn.o_proj.weight"
    bad = dict(tensors)
    bad[key] = bad[key].to(torch.bfloat16)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{key} is torch.bfloat16, but its _scale_inv"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, progress=False)

    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"fmt": "e5m2"}}))
    with pytest.raises(ValueError, match=r"config.json: quantization_config.*'e5m2'"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, progress=False)


def fp8_bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.replace(".base_layer", ""): p.view(torch.uint8).clone()
        for n, p in model.named_parameters()
        if p.dtype == torch.float8_e4m3fn
    }


LORA_TARGETS = (
    r".*\.self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|.*\.shared_experts\.(gate_proj|up_proj|down_proj)"
)


def test_lora_on_fp8_attention_and_shared_experts_trains(fp8_checkpoint, monkeypatch):
    import peft.utils.transformers_weight_conversion as conversion
    from peft import LoraConfig, get_peft_model

    # peft 0.21 rewrites gate/up/down_proj targets of a deepseek_v3 model into routed-expert parameters and drops
    # the shared experts (REFERENCE.md, known traps); finetune's LoRA presets own that fix, this test the FP8 part.
    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers", lambda *args, **kwargs: None)
    path, _ = fp8_checkpoint
    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    before = fp8_bits(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("shared_experts.up_proj.lora_A" in n for n in trainable)
    assert any("self_attn.kv_b_proj.lora_B" in n for n in trainable)
    assert all("lora_" in n for n in trainable) and not any(".experts." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)

    peft_model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=ids, labels=ids, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = fp8_bits(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def structured_batch(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Sequences that follow a fixed random successor table: learnable, so the loss falls a long way."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randint(0, vocab, (vocab,), generator=torch.Generator().manual_seed(123))
    ids = torch.empty(batch, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for i in range(1, seq):
        ids[:, i] = successor[ids[:, i - 1]]
    return ids


def train_curve(model: DeepseekV3ForCausalLM, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(steps):
        ids = structured_batch(model.config.vocab_size, 4, 32, seed=step)
        loss = model(input_ids=ids, labels=ids, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fp8_forward_training_follows_the_high_precision_loss_curve():
    ours, _ = build_pair("qproj-nogroup-dense0-plainrope", initializer_range=0.02, vocab_size=256)
    baseline = copy.deepcopy(ours)
    changed = apply_fp8_training(ours)
    assert isinstance(ours.model.layers[0].self_attn.q_proj, FP8TrainingLinear)
    assert isinstance(ours.model.layers[0].mlp.experts, FP8TrainingRoutedExperts)
    assert type(ours.lm_head) is torch.nn.Linear and type(ours.model.layers[0].mlp.gate).__name__ == "Router"
    assert any(n.endswith("shared_experts.down_proj") for n in changed)

    torch.manual_seed(0)
    reference_losses = train_curve(baseline, 12)
    torch.manual_seed(0)
    fp8_losses = train_curve(ours, 12)
    assert reference_losses[-1] < 0.8 * reference_losses[0]
    # Same data, same init: FP8 forward (e4m3 weights 128x128, activations 1x128, straight-through backward) vs
    # fp32 (the CPU has no bf16 units; fp32 is the stricter baseline). Measured gap: at most 1.2% of the loss at
    # any of 20 steps (loss 5.5 -> 2.9); the bound is 4%.
    gaps = [abs(a - b) / b for a, b in zip(fp8_losses, reference_losses)]
    assert max(gaps) < 0.04, (max(gaps), fp8_losses, reference_losses)
