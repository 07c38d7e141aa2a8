"""Export: streamed LoRA merges into BF16 and FP8 checkpoints, the adapter alone, converters, atomicity, bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import peft.utils.transformers_weight_conversion as peft_conversion
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM as HFModel

from data_tools.tokenizer import extract_packaged_tokenizer
from finetune.export import (
    ExportError,
    convert_checkpoint,
    export_adapter,
    export_merged,
    main,
    read_header,
)
from finetune.lora import build_lora_config
from model import DeepseekV3ForCausalLM
from model.checkpoint import INDEX_NAME, dequantize_fp8_block, iter_hf_state
from model.fp8 import dequantize_weight, is_official_fp8_weight, quantize_weight
from tests.model.reference import build_pair

REPO = Path(__file__).resolve().parents[2]
# A milder init than reference.py's (routing flips make a 0.1-init model chaotic under FP8 noise) and sizes that
# leave partial 128-blocks in both dimensions of most weights (160 = 128 + 32, 136 = 128 + 8).
OVERRIDES = dict(
    initializer_range=0.02, hidden_size=160, q_lora_rank=136, intermediate_size=136, moe_intermediate_size=72
)
# e4m3 keeps 3 mantissa bits: a normal weight is stored to within 2^-4 of itself, a subnormal one (codes below 2^-6)
# to within half the 2^-9 step, times its block scale.
FP8_RELATIVE_STEP = 2**-4
FP8_SUBNORMAL_STEP = 2**-10


def checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def raw_bytes(path: Path, key: str) -> bytes:
    """The stored bytes of one tensor, straight from its shard."""
    weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    info = read_header(path / weight_map[key])[key]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def fp8_round_trip(model: DeepseekV3ForCausalLM) -> None:
    """Make every weight the official checkpoint stores in FP8 exactly representable in FP8 (per checkpoint tensor)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name.endswith("experts.gate_up_proj"):
                gate, up = tensor.chunk(2, dim=1)
                for part in (gate, up):
                    part.copy_(dequantize_weight(*quantize_weight(part.clone()), torch.float32))
            elif name.endswith("experts.down_proj") or is_official_fp8_weight(name):
                tensor.copy_(dequantize_weight(*quantize_weight(tensor.clone()), torch.float32))


def add_lora(model: DeepseekV3ForCausalLM, scale: float = 0.05) -> PeftModel:
    """Attention (incl. MTP), shared experts, the dense MLP and (ParamWrapper) routed experts, random B."""
    n = model.config.num_hidden_layers
    attention = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    targets = [f"model.layers.{i}.self_attn.{m}" for i in range(n) for m in attention]
    targets += [f"model.mtp.0.self_attn.{m}" for m in ("q_a_proj", "o_proj")]
    targets += [f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    targets += [f"model.layers.{i}.mlp.shared_experts.{m}" for i in range(1, n) for m in ("gate_proj", "down_proj")]
    parameters = [f"model.layers.{i}.mlp.experts.{p}" for i in range(1, n) for p in ("gate_up_proj", "down_proj")]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"o_proj": 6},
        target_modules=targets,
        target_parameters=parameters,
    )
    original = peft_conversion.convert_peft_config_for_transformers
    # peft would re-target gate/up/down_proj of a deepseek_v3 model onto the routed experts (see REFERENCE.md).
    peft_conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        peft_model = get_peft_model(model, config)
    finally:
        peft_conversion.convert_peft_config_for_transformers = original
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    return peft_model.eval()


def merged_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors of the peft-merged model (peft's own merge as the reference)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach().clone() for k, v in iter_hf_state(merged)}


def dequantized_copy(src: Path, dst: Path) -> None:
    """A fp32 copy of an FP8 checkpoint, dequantized with the official formula, loadable by transformers."""
    dst.mkdir()
    tensors = checkpoint(src)
    out = {}
    for key, tensor in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = dequantize_fp8_block(tensor, tensors[key + "_scale_inv"], (128, 128))
        out[key] = tensor.float()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))


def relative_rms(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """An FP8-representable fp32 base (sharded, with MTP), its FP8 conversion, and a LoRA adapter on it."""
    root = tmp_path_factory.mktemp("export")
    ours, _ = build_pair("qlora-groups-dense1-yarn", **OVERRIDES)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in ours.model.mtp.parameters():
            param.normal_(0.0, 0.05)
    ids = torch.randint(2, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    # What FP8 costs this model by itself: the bound the FP8 export is held to.
    exact_logits = logits_of(ours, ids)
    fp8_round_trip(ours)
    fp8_cost = relative_rms(logits_of(ours, ids), exact_logits)
    base = root / "base"
    ours.save_pretrained(base, max_shard_size="400KB")
    fp8_base = root / "base-fp8"
    convert_checkpoint(base, fp8_base, "fp8", progress=False)
    peft_model = add_lora(copy.deepcopy(ours))
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    return dict(
        fp8_cost=fp8_cost,
        root=root,
        ours=ours,
        base=base,
        fp8_base=fp8_base,
        adapter=adapter,
        peft_model=peft_model,
        merged=merged_state(peft_model),
        ids=ids,
        logits=logits_of(peft_model, ids),
    )


def test_bf16_merge_loads_in_transformers_and_matches_the_adapter_model(setup) -> None:
    base, out = setup["base"], setup["root"] / "merged-bf16"
    assert len(list(base.glob("model-*.safetensors"))) > 3  # really sharded
    # The packaged DeepSeek-V3 tokenizer folder: what any machine has, with or without ../shared.
    tokenizer_dir = extract_packaged_tokenizer()
    result = export_merged(base, setup["adapter"], out, "bf16", tokenizer_dir=tokenizer_dir, progress=False)
    assert result.tensors_merged > 0 and not result.fp8
    names = {p.name for p in out.iterdir()}
    assert {"config.json", INDEX_NAME, "generation_config.json", "tokenizer.json", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "quantization_config" not in config
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())

    reference = HFModel.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(reference, setup["ids"]), setup["logits"], atol=2e-5, rtol=1e-4)

    # Every tensor, MTP layer included, equals peft's own merge; untouched ones are the base's bytes.
    saved, merged = checkpoint(out), setup["merged"]
    assert set(saved) == set(merged)
    mtp_key = f"model.layers.{setup['ours'].config.num_hidden_layers}.self_attn.q_a_proj.weight"
    assert not torch.equal(saved[mtp_key], checkpoint(base)[mtp_key])
    touched = set(result_touched(setup))
    for key, tensor in merged.items():
        torch.testing.assert_close(saved[key], tensor, atol=1e-6, rtol=1e-5, msg=key)
        if key not in touched:
            assert raw_bytes(out, key) == raw_bytes(base, key), key


def result_touched(setup) -> list[str]:
    """Checkpoint keys whose merged value differs from the base."""
    base = checkpoint(setup["base"])
    return [k for k, v in setup["merged"].items() if not torch.equal(v, base[k])]


def test_fp8_merge_requantizes_in_the_official_format(setup) -> None:
    fp8_base, out = setup["fp8_base"], setup["root"] / "merged-fp8"
    result = export_merged(fp8_base, setup["adapter"], out, "fp8", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    saved, base, merged = checkpoint(out), checkpoint(fp8_base), setup["merged"]
    assert set(saved) == set(base)
    touched = set(result_touched(setup))
    fp8_touched = [k for k in touched if saved[k].dtype == torch.float8_e4m3fn]
    assert len(fp8_touched) > 50 and set(result.fp8) == set(fp8_touched)
    for key, tensor in saved.items():
        if key.endswith("_scale_inv"):
            continue
        if key not in touched:
            assert raw_bytes(out, key) == raw_bytes(fp8_base, key), key
            if tensor.dtype == torch.float8_e4m3fn:
                assert raw_bytes(out, key + "_scale_inv") == raw_bytes(fp8_base, key + "_scale_inv"), key
            continue
        if tensor.dtype != torch.float8_e4m3fn:  # e.g. nothing here; BF16 tensors keep their dtype
            torch.testing.assert_close(tensor, merged[key].to(tensor.dtype), msg=key)
            continue
        scale = saved[key + "_scale_inv"]
        assert scale.dtype == torch.float32 and scale.shape == (
            (tensor.shape[0] + 127) // 128,
            (tensor.shape[1] + 127) // 128,
        )
        official = dequantize_fp8_block(tensor, scale, (128, 128))
        assert torch.equal(official, dequantize_weight(tensor, scale, torch.float32)), key
        expand = scale.repeat_interleave(128, 0)[: tensor.shape[0]].repeat_interleave(128, 1)[:, : tensor.shape[1]]
        bound = torch.maximum(FP8_RELATIVE_STEP * merged[key].abs(), FP8_SUBNORMAL_STEP * expand)
        assert ((official - merged[key]).abs() <= bound * (1 + 1e-6)).all(), key
        # Our re-quantization of peft's merged weight gives the same codes (but for a rare rounding tie).
        codes, ref_scale = quantize_weight(merged[key])
        torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0, msg=key)
        differ = (codes.view(torch.uint8) != tensor.view(torch.uint8)).float().mean().item()
        assert differ <= 1e-3, (key, differ)
    # Logits of the FP8 export (dequantized with the official formula) against the exact BF16/fp32 merge.
    deq = setup["root"] / "merged-fp8-dequantized"
    dequantized_copy(out, deq)
    fp8_logits = logits_of(HFModel.from_pretrained(deq, dtype=torch.float32).eval(), setup["ids"])
    relative = relative_rms(fp8_logits, setup["logits"])
    print(
        f"FP8 export: relative RMS logit error {relative:.4f} vs the exact merge (FP8 alone costs the base "
        f"{setup['fp8_cost']:.4f}); delta kept {_kept(result)}"
    )
    # Nothing beyond FP8 rounding: the export runs like peft's merge quantized in the test with the official formula.
    requantized = {
        k: dequantize_weight(*quantize_weight(v), torch.float32) if is_official_fp8_weight(k) else v
        for k, v in setup["merged"].items()
    }
    reference = setup["root"] / "merged-requantized-in-test"
    reference.mkdir()
    save_file({k: v.contiguous() for k, v in requantized.items()}, str(reference / "model.safetensors"))
    (reference / "config.json").write_text((deq / "config.json").read_text())
    in_test = logits_of(HFModel.from_pretrained(reference, dtype=torch.float32).eval(), setup["ids"])
    assert relative_rms(fp8_logits, in_test) < 1e-3
    # No bound on `relative` itself: how far FP8 rounding puts a tiny random MoE from its exact weights is chaotic
    # (routing flips turn 2^-4 weight errors into 10-30% logit errors: 0.10 for the base, 0.15-0.32 for merges with
    # LoRA A drawn from two RNG states). The check above is the export's own: FP8 rounding and nothing else.
    report = json.loads((out / "export_report.json").read_text())
    assert set(report["fp8_delta"]) == set(result.fp8)


def _kept(result) -> str:
    kept = sorted(s.kept for s in result.fp8.values())
    return f"min {kept[0]:.3f} median {kept[len(kept) // 2]:.3f}"


def test_small_delta_is_reported_lost_in_fp8(setup, caplog) -> None:
    tiny = add_lora(copy.deepcopy(setup["ours"]), scale=1e-5)
    adapter = setup["root"] / "adapter-tiny"
    tiny.save_pretrained(adapter)
    with caplog.at_level("WARNING"):
        result = export_merged(setup["fp8_base"], adapter, setup["root"] / "tiny-fp8", "fp8", progress=False)
    assert min(s.kept for s in result.fp8.values()) < 0.5
    assert any("kept less than 50%" in w for w in result.warnings)
    assert "kept less than" in caplog.text


def test_fp8_base_to_bf16_merge_and_converters(setup) -> None:
    out = setup["root"] / "fp8-to-bf16"
    export_merged(setup["fp8_base"], setup["adapter"], out, "bf16", progress=False)
    saved, merged = checkpoint(out), setup["merged"]
    assert not any(k.endswith("_scale_inv") for k in saved)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for key, tensor in merged.items():
        expected_dtype = torch.bfloat16 if is_official_fp8_weight(key) else torch.float32
        assert saved[key].dtype == expected_dtype, key
        torch.testing.assert_close(saved[key], tensor.to(expected_dtype), msg=key)
    # BF16 -> FP8 converter: the official quantization of every weight the official checkpoint stores in FP8.
    fp8, base = checkpoint(setup["fp8_base"]), checkpoint(setup["base"])
    quantized = [k for k in base if is_official_fp8_weight(k)]
    assert quantized and all(fp8[k].dtype == torch.float8_e4m3fn for k in quantized)
    assert fp8["model.embed_tokens.weight"].dtype == torch.float32
    for key in quantized:
        codes, scale = quantize_weight(base[key])
        assert torch.equal(fp8[key].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(
            fp8[key + "_scale_inv"], scale
        )
    # FP8 -> BF16 converter: dequantized with the official formula, as fp8_cast_bf16.py does.
    plain = setup["root"] / "plain-bf16"
    convert_checkpoint(setup["fp8_base"], plain, "bf16", progress=False)
    converted = checkpoint(plain)
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    expected = dequantize_fp8_block(fp8[key], fp8[key + "_scale_inv"], (128, 128)).to(torch.bfloat16)
    assert torch.equal(converted[key], expected)


def test_adapter_export_loads_onto_transformers_with_peft(setup, caplog) -> None:
    out = setup["root"] / "adapter-hf"
    with caplog.at_level("WARNING"):
        result = export_adapter(setup["adapter"], out, setup["base"])
    assert any("MTP" in w for w in result.warnings)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.3.gate_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.mlp.shared_experts.gate_proj.lora_B.weight" in tensors
    assert not any(".mtp." in k or ".layers.3." in k for k in tensors)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6  # the largest rank, scaling folded into lora_B

    reference = HFModel.from_pretrained(setup["base"], dtype=torch.float32).eval()
    loaded = PeftModel.from_pretrained(reference, out).eval()
    adapted = {n.split(".lora_")[0] for n, _ in loaded.named_parameters() if ".lora_" in n}
    assert any("shared_experts.gate_proj" in n for n in adapted) and any("layers.0.mlp.down_proj" in n for n in adapted)
    torch.testing.assert_close(logits_of(loaded, setup["ids"]), setup["logits"], atol=2e-5, rtol=1e-4)


def test_trainable_token_rows_merge_as_peft_does(setup, tmp_path: Path) -> None:
    """LoRA with trainable tokens (the decoder's embedding, which the MTP layer shares; the checkpoint's MTP copy of
    it gets the same rows): the merged export replaces those rows as peft's merge_and_unload does, in BF16 and FP8
    output; an engine adapter refuses them clearly."""
    model = copy.deepcopy(setup["ours"])
    ids = [3, 40, 77]
    config = build_lora_config(model, "attention", r=4, include_mtp=True, trainable_tokens=ids)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.normal_(0.0, 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    expected = merged_state(peft_model.eval())
    base = checkpoint(setup["base"])
    mtp = setup["ours"].config.num_hidden_layers
    for key in ("model.embed_tokens.weight", f"model.layers.{mtp}.embed_tokens.weight"):
        changed = (expected[key] != base[key]).any(dim=1).nonzero().flatten().tolist()
        assert changed == ids, key  # the reference itself moved exactly those rows

    result = export_merged(setup["base"], adapter, tmp_path / "bf16", "bf16", progress=False)
    saved = checkpoint(tmp_path / "bf16")
    assert set(saved) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, atol=1e-6, rtol=1e-5, msg=key)
    assert result.tensors_merged == len(result_touched({**setup, "merged": expected}))
    assert "3 trained token rows of `model.embed_tokens.weight`" in (tmp_path / "bf16" / "README.md").read_text()

    # From the FP8 base: the embeddings are BF16 there, so the trained rows arrive exactly.
    export_merged(setup["fp8_base"], adapter, tmp_path / "fp8", "fp8", progress=False)
    saved = checkpoint(tmp_path / "fp8")
    for key in ("model.embed_tokens.weight", f"model.layers.{mtp}.embed_tokens.weight"):
        assert saved[key].dtype == base[key].dtype
        torch.testing.assert_close(saved[key][ids], expected[key][ids], atol=0, rtol=0, msg=key)

    with pytest.raises(ExportError, match="embedding rows"):
        export_adapter(adapter, tmp_path / "engine", setup["base"])
    assert not (tmp_path / "engine").exists()

    # Adapters whose rows and token ids do not fit together fail before writing, naming the file.
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    cases = {
        "no trainable_token_indices": ({**config, "trainable_token_indices": None}, tensors),
        "rows for 2 token ids": (
            {**config, "trainable_token_indices": {k: v[:2] for k, v in config["trainable_token_indices"].items()}},
            tensors,
        ),
        "no trainable_token_indices entry names model.embed_tokens": (
            {**config, "trainable_token_indices": {"lm_head": ids}},
            tensors,
        ),
        "trains token id 100000": (
            {**config, "trainable_token_indices": {k: [3, 40, 100000] for k in config["trainable_token_indices"]}},
            tensors,
        ),
    }
    for i, (message, (bad_config, bad_tensors)) in enumerate(cases.items()):
        bad = tmp_path / f"bad-{i}"
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps(bad_config))
        save_file(bad_tensors, str(bad / "adapter_model.safetensors"))
        with pytest.raises(ExportError, match=message):
            export_merged(setup["base"], bad, tmp_path / "out", "bf16", progress=False)
        assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_no_complete_folder(setup, monkeypatch) -> None:
    import finetune.export as export

    out = setup["root"] / "interrupted"
    calls = {"n": 0}
    original = export.ShardWriter.copy

    def copy_then_stop(self, info):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return original(self, info)

    monkeypatch.setattr(export.ShardWriter, "copy", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        export_merged(setup["base"], setup["adapter"], out, "bf16", progress=False)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # the staging folder was removed
    # A hard kill skips the cleanup: what it leaves is hidden, marked partial and has no config or index.
    calls["n"] = 0
    monkeypatch.setattr(export.shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(KeyboardInterrupt):
        export_merged(setup["base"], setup["adapter"], out, "bf16", progress=False)
    assert not out.exists()
    (left,) = out.parent.glob(f".{out.name}.partial-*")
    assert list(left.glob("*.safetensors")) and not (left / "config.json").exists()
    assert not (left / INDEX_NAME).exists()


def test_bad_inputs_fail_before_writing(setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # An adapter trained on another base (different hidden size).
    other, _ = build_pair("qlora-groups-dense1-yarn")
    other_adapter = tmp_path / "other-adapter"
    add_lora(other).save_pretrained(other_adapter)
    with pytest.raises(ExportError, match="another base"):
        export_merged(setup["base"], other_adapter, out, "bf16", progress=False)
    # An adapter naming a module the base does not have (q_proj on a q_lora_rank model).
    renamed = tmp_path / "renamed-adapter"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((setup["adapter"] / "adapter_config.json").read_text())
    tensors = load_file(str(setup["adapter"] / "adapter_model.safetensors"))
    save_file(
        {k.replace(".0.self_attn.q_b_proj.", ".0.self_attn.q_proj."): v for k, v in tensors.items()},
        str(renamed / "adapter_model.safetensors"),
    )
    with pytest.raises(ExportError, match="has no weight in"):
        export_merged(setup["base"], renamed, out, "bf16", progress=False)
    # A missing shard.
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in setup["base"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    missing = sorted(broken.glob("model-*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(ExportError, match=missing.name):
        export_merged(broken, setup["adapter"], out, "bf16", progress=False)
    # A truncated shard.
    (broken / missing.name).write_bytes((setup["base"] / missing.name).read_bytes()[:-100])
    with pytest.raises(ExportError, match="truncated"):
        export_merged(broken, setup["adapter"], out, "fp8", progress=False)
    # A quantization the export cannot write.
    config = json.loads((setup["fp8_base"] / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    odd = tmp_path / "odd"
    odd.mkdir()
    for file in setup["fp8_base"].iterdir():
        (odd / file.name).write_bytes(file.read_bytes())
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="weight_block_size"):
        export_merged(odd, setup["adapter"], out, "fp8", progress=False)
    # An existing output folder is not replaced without overwrite.
    out.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_merged(setup["base"], setup["adapter"], out, "bf16", progress=False)
    assert not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["other-adapter", "renamed-adapter", "broken", "odd", "out"]
    )


def test_cli_prints_one_line_errors_and_exports(setup, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "finetune.export", "--base", str(setup["base"]), "--out", str(tmp_path / "x")]
    with pytest.raises(ExportError, match="--format adapter needs --adapter DIR"):
        main(["--base", str(setup["base"]), "--out", str(tmp_path / "x"), "--format", "adapter"])
    bad = subprocess.run([*command, "--adapter", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "adapter_config.json" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: ")
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "Tiny Chat", "data": ["demo chats"], "evaluation": {"exact match": 0.5}}))
    good = subprocess.run(
        [*command, "--adapter", str(setup["adapter"]), "--format", "fp8", "--card", str(card), "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert good.returncode == 0, good.stderr
    assert "MB/s" in good.stdout and "FP8 delta" in good.stdout
    readme = (tmp_path / "x" / "README.md").read_text()
    assert "# Tiny Chat" in readme and "| exact match | 0.5 |" in readme
    with safe_open(str(next((tmp_path / "x").glob("model-*.safetensors"))), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_export_never_replaces_its_inputs_and_cleans_up_after_a_kill(setup, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(setup["base"], base)
    before = {f.name: f.read_bytes() for f in base.iterdir()}
    for out in (base, base / "inside"):
        with pytest.raises(ExportError, match="is or contains an input"):
            export_merged(base, setup["adapter"], out, "bf16", overwrite=True, progress=False)
    with pytest.raises(ExportError, match="is or contains an input"):
        export_adapter(setup["adapter"], setup["adapter"], base, overwrite=True)
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before
    # A killed export's hidden partial folder (its process is gone) is removed by the next export to that --out.
    out = tmp_path / "merged"
    stale = tmp_path / ".merged.partial-999999999"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    export_merged(base, setup["adapter"], out, "bf16", progress=False)
    assert not stale.exists() and (out / "config.json").is_file()


def test_export_free_space_counts_the_side_files(setup, tmp_path: Path, monkeypatch) -> None:
    import collections

    import finetune.export as export

    shards = sum(f.stat().st_size for f in setup["base"].glob("*.safetensors"))
    side = export.side_file_bytes(setup["base"])
    assert side > (setup["base"] / "generation_config.json").stat().st_size
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: usage(0, 0, shards + side // 2))
    with pytest.raises(ExportError, match="the export needs .* GB but only"):
        export_merged(setup["base"], setup["adapter"], tmp_path / "out", "bf16", progress=False)
    assert not (tmp_path / "out").exists()


def test_adapter_alpha_that_is_not_a_number_is_one_sentence(setup, tmp_path: Path) -> None:
    bad = tmp_path / "bad-alpha"
    bad.mkdir()
    config = json.loads((setup["adapter"] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "sixteen", "alpha_pattern": {}}))
    (bad / "adapter_model.safetensors").write_bytes((setup["adapter"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="lora_alpha for .* is 'sixteen' in adapter_config.json; it must be a number"):
        export_merged(setup["base"], bad, tmp_path / "out", "bf16", progress=False)


def test_chat_with_an_adapter_for_another_base_is_one_sentence(setup, tmp_path: Path) -> None:
    import subprocess
    import sys

    other, _ = build_pair("qlora-groups-dense1-yarn")
    other_adapter = tmp_path / "other-adapter"
    add_lora(other).save_pretrained(other_adapter)
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "finetune.chat", "--model", str(setup["base"]), "--adapter", str(other_adapter)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=root, input="", timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "another base" in last
