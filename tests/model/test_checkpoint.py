"""Checkpoint I/O: HF round trip with MTP, shards, FP8 dequantization on load, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM as HFModel

from model import CheckpointError, DeepseekV3ForCausalLM
from model.checkpoint import INDEX_NAME
from model.fp8 import is_official_fp8_weight
from tests.model.reference import build_pair


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def mtp_tensors(model: DeepseekV3ForCausalLM) -> dict[str, torch.Tensor]:
    """The model's MTP module under checkpoint names (layer index num_hidden_layers), per-expert keys."""
    from model.checkpoint import iter_hf_state

    layer = f"model.layers.{model.config.num_hidden_layers}."
    return {k: v.clone() for k, v in iter_hf_state(model) if k.startswith(layer)}


@pytest.fixture()
def hf_checkpoint(tmp_path: Path) -> tuple[Path, DeepseekV3ForCausalLM, HFModel]:
    """transformers saves a sharded checkpoint; an MTP layer (as in the official files) is added as one more shard."""
    ours, reference = build_pair("qlora-groups-dense1-yarn")
    with torch.no_grad():
        for param in ours.model.mtp.parameters():
            param.normal_(0.0, 0.05)
    path = tmp_path / "hf"
    reference.save_pretrained(path, max_shard_size="200KB")
    index = json.loads((path / INDEX_NAME).read_text())
    extra = mtp_tensors(ours)
    save_file(extra, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
    (path / INDEX_NAME).write_text(json.dumps(index))
    return path, ours, reference


def test_round_trip_transformers_ours_transformers(hf_checkpoint, tmp_path: Path) -> None:
    path, ours_ref, reference = hf_checkpoint
    assert len(list(path.glob("model-*.safetensors"))) > 2  # really sharded
    loaded = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, progress=False)
    for name, tensor in ours_ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    out = tmp_path / "ours"
    loaded.save_pretrained(out, max_shard_size="300KB")
    original, saved = read_checkpoint(path), read_checkpoint(out)
    assert set(saved) == set(original)
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    assert any(".61." in k or f".{loaded.config.num_hidden_layers}.enorm" in k for k in saved)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    again = HFModel.from_pretrained(out, dtype=torch.float32)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_single_file_and_bf16_load(tmp_path: Path) -> None:
    ours, _ = build_pair("qproj-nogroup-dense0-plainrope")
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / INDEX_NAME).exists()
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype="bfloat16", progress=False)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    # The router stays fp32, as transformers keeps it.
    assert loaded.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert loaded.model.layers[0].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16))
    # Non-persistent RoPE buffers are rebuilt after the meta-device construction.
    assert torch.equal(loaded.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)


def quantize_reference(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Official weight quantization, written as a loop over blocks: s = amax / 448, q = e4m3(W / s)."""
    rows, cols = weight.shape
    nr, nc = -(-rows // block), -(-cols // block)
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            tile = weight[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            s = tile.abs().max() / 448.0
            scales[i, j] = s
            codes[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return codes, scales


def test_fp8_checkpoint_dequantized_on_load(tmp_path: Path) -> None:
    ours, _ = build_pair("qlora-groups-dense1-yarn", hidden_size=160, moe_intermediate_size=144)
    state = dict(__import__("model.checkpoint", fromlist=["iter_hf_state"]).iter_hf_state(ours))
    quantized, expected = {}, {}
    for key, tensor in state.items():
        if is_official_fp8_weight(key):
            codes, scale = quantize_reference(tensor)
            quantized[key], quantized[key + "_scale_inv"] = codes, scale
            rows = scale.repeat_interleave(128, 0)[: tensor.shape[0]].repeat_interleave(128, 1)[:, : tensor.shape[1]]
            expected[key] = codes.float() * rows
        else:
            quantized[key] = tensor.contiguous()
            expected[key] = tensor
    save_file(quantized, str(tmp_path / "model.safetensors"))
    config = ours.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path, torch_dtype=torch.float32, progress=False, fp8="dequantize"
    )
    from model.checkpoint import iter_hf_state

    for key, tensor in iter_hf_state(loaded):
        assert torch.equal(tensor, expected[key]), key
    # Partial edge blocks exist in this config (160 and 144 are not multiples of 128).
    assert any(
        t.shape[0] % 128 or t.shape[1] % 128 for k, t in quantized.items() if k.endswith(".weight") and t.dim() == 2
    )


def write_tiny(tmp_path: Path, shard: str = "300KB") -> Path:
    ours, _ = build_pair("qproj-nogroup-dense0-plainrope")
    ours.save_pretrained(tmp_path, max_shard_size=shard)
    return tmp_path


def edit_shard(path: Path, edit) -> None:
    """Rewrite the shard holding model.norm.weight after applying edit(tensors)."""
    index = json.loads((path / INDEX_NAME).read_text())
    file = path / index["weight_map"]["model.norm.weight"]
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file.name}
    index["weight_map"].update({k: file.name for k in tensors})
    (path / INDEX_NAME).write_text(json.dumps(index))


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path: Path) -> None:
    path = write_tiny(tmp_path)

    def damage(tensors):
        tensors.pop("model.norm.weight")
        tensors["model.layers.0.mlp.gate.not_a_weight"] = torch.zeros(3)

    edit_shard(path, damage)
    first = next(k for k in json.loads((path / INDEX_NAME).read_text())["weight_map"] if "embed_tokens" in k)
    index = json.loads((path / INDEX_NAME).read_text())
    file = path / index["weight_map"][first]
    tensors = load_file(str(file))
    tensors[first] = tensors[first][:, :-1].contiguous()
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError) as err:
        DeepseekV3ForCausalLM.from_pretrained(path, progress=False)
    message = str(err.value)
    assert "missing tensors: model.norm.weight" in message
    assert "unexpected tensors: model.layers.0.mlp.gate.not_a_weight" in message
    assert "wrong shape: model.embed_tokens.weight" in message


def test_missing_expert_slice_is_reported(tmp_path: Path) -> None:
    path = write_tiny(tmp_path)
    index = json.loads((path / INDEX_NAME).read_text())
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    file = path / index["weight_map"].pop(key)
    tensors = load_file(str(file))
    tensors.pop(key)
    save_file(tensors, str(file))
    (path / INDEX_NAME).write_text(json.dumps(index))
    # Named as the checkpoint names it (per-expert keys), not by the model's fused tensor.
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.\{5\}\.\{up\}_proj\.weight \(1 expert slices\)"
    ):
        DeepseekV3ForCausalLM.from_pretrained(path, progress=False)


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    path = write_tiny(tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated or corrupt"):
        DeepseekV3ForCausalLM.from_pretrained(path, progress=False)


def test_bad_index_errors(tmp_path: Path) -> None:
    path = write_tiny(tmp_path)
    (path / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        DeepseekV3ForCausalLM.from_pretrained(path, progress=False)
    (path / INDEX_NAME).write_text(json.dumps({"weight_map": {"model.norm.weight": "model-99.safetensors"}}))
    with pytest.raises(CheckpointError, match="listed but not found: model-99.safetensors"):
        DeepseekV3ForCausalLM.from_pretrained(path, progress=False)


def test_index_pointing_at_wrong_shard(tmp_path: Path) -> None:
    path = write_tiny(tmp_path)
    index = json.loads((path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = next(f for f in files if f != index["weight_map"]["model.norm.weight"])
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.norm.weight is listed in the index for .* but not stored there"):
        DeepseekV3ForCausalLM.from_pretrained(path, progress=False)


def test_fp8_weight_without_scale_is_named(tmp_path: Path) -> None:
    path = write_tiny(tmp_path)
    index = json.loads((path / INDEX_NAME).read_text())
    key = "model.layers.0.self_attn.o_proj.weight"
    file = path / index["weight_map"][key]
    tensors = load_file(str(file))
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=f"{key} is FP8 but its scale {key}_scale_inv is missing"):
        DeepseekV3ForCausalLM.from_pretrained(path, progress=False)


def test_saved_shards_respect_size_and_index(tmp_path: Path) -> None:
    path = write_tiny(tmp_path, shard="250KB")
    index = json.loads((path / INDEX_NAME).read_text())
    for file in set(index["weight_map"].values()):
        with safe_open(str(path / file), "pt") as handle:
            size = sum(handle.get_tensor(k).numel() * 4 for k in handle.keys())
            assert size <= 250_000 or len(list(handle.keys())) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in read_checkpoint(path).values())
