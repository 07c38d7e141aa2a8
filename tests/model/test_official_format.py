"""What serving engines read: config.json in the official form on every save, and community checkpoints that
transformers wrote (no MTP tensors, num_nextn_predict_layers still 1) load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from model import CheckpointError, DeepseekV3ForCausalLM
from model.checkpoint import INDEX_NAME
from model.config import FP8_QUANTIZATION_CONFIG, OFFICIAL_CONFIG_KEYS
from tests.model.reference import build_pair
from tests.model.test_fp8_model import write_fp8_checkpoint

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL = json.loads((ROOT / "recipes/deepseek-v3-671b/config.json").read_text())
SHARED = ROOT.parent / "shared/configs/deepseek-v3-671b.config.json"


def test_recipe_config_is_the_real_671b_file() -> None:
    """The key set we write is taken from recipes/deepseek-v3-671b/config.json; that file is the official one."""
    if SHARED.is_file():  # shared/ lies beside the clone on developer machines and in CI
        assert json.loads(SHARED.read_text()) == OFFICIAL
    assert set(OFFICIAL_CONFIG_KEYS) == set(OFFICIAL)


def test_saved_config_has_exactly_the_official_keys_and_forms(tmp_path: Path) -> None:
    ours, _ = build_pair("qlora-groups-dense1-yarn")
    ours.config.mtp_loss_enabled, ours.config.balance_loss_alpha = True, 1e-4  # training settings: not written
    ours.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    written = json.loads((tmp_path / "bf16/config.json").read_text())
    assert set(written) == set(OFFICIAL) - {"quantization_config"}
    for key in ("architectures", "model_type", "scoring_func", "topk_method", "moe_layer_freq", "use_cache"):
        assert written[key] == OFFICIAL[key], key
    assert written["torch_dtype"] == "bfloat16"
    assert written["rope_scaling"] == {
        "type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 128,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    assert written["rope_theta"] == 10000.0 and written["n_group"] == 4 and written["topk_group"] == 2
    # The stored dtype is named as it is: an fp32 save says float32.
    ours.float().save_pretrained(tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32/config.json").read_text())["torch_dtype"] == "float32"
    # transformers 5 reads the official form back to the same RoPE and routing.
    hf = AutoConfig.from_pretrained(tmp_path / "bf16")
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4
    assert hf.rope_parameters["rope_theta"] == 10000.0 and hf.n_group == 4
    assert not hasattr(hf, "mtp_loss_enabled")


def test_plain_rope_is_written_as_null(tmp_path: Path) -> None:
    ours, _ = build_pair("qproj-nogroup-dense0-plainrope")
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"] is None and written["q_lora_rank"] is None
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, progress=False)
    assert reloaded.config.rope_parameters["rope_type"] == "default"


def test_fp8_save_writes_the_official_quantization_config(tmp_path: Path) -> None:
    ours, _ = build_pair("qlora-groups-dense1-yarn")
    from model.checkpoint import iter_hf_state

    values = {k: v for k, v in ours.config.to_dict().items()}
    values["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    (tmp_path / "src").mkdir()
    write_fp8_checkpoint(tmp_path / "src", dict(iter_hf_state(ours)), values)
    kept = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16, progress=False)
    kept.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out/config.json").read_text())
    assert set(written) == set(OFFICIAL)
    assert written["quantization_config"] == OFFICIAL["quantization_config"]
    assert written["torch_dtype"] == "bfloat16"
    # Dequantized on load, nothing is FP8 any more: the save must not claim it.
    plain = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "src", dtype=torch.bfloat16, progress=False, fp8="dequantize"
    )
    plain.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain/config.json").read_text())


@pytest.fixture()
def transformers_checkpoint(tmp_path: Path):
    """A checkpoint as transformers writes a DeepSeek-V3 fine-tune: no MTP tensors, num_nextn_predict_layers 1."""
    ours, reference = build_pair("qlora-2groups-dense2-yarn")
    path = tmp_path / "community"
    reference.save_pretrained(path, max_shard_size="200KB")
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    keys = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    assert not any(k.startswith(f"model.layers.{reference.config.num_hidden_layers}.") for k in keys)
    return path, reference


def test_transformers_checkpoint_without_mtp_loads_and_matches(transformers_checkpoint, caplog) -> None:
    path, reference = transformers_checkpoint
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no MTP tensors" in warnings[0].getMessage()
    assert "loaded without the MTP module" in warnings[0].getMessage()
    assert len(model.model.mtp) == 0 and model.config.num_nextn_predict_layers == 0
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_transformers_checkpoint_with_mtp_loss_gets_a_fresh_mtp_module(transformers_checkpoint, caplog) -> None:
    from model import load_config

    path, reference = transformers_checkpoint
    config = load_config(path)
    config.mtp_loss_enabled = True
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        model = DeepseekV3ForCausalLM.from_pretrained(path, config=config, dtype=torch.float32, progress=False)
    assert "initialised fresh" in caplog.records[-1].getMessage()
    mtp = model.model.mtp[0]
    assert torch.equal(mtp.shared_head.norm.weight, reference.model.norm.weight)
    assert mtp.eh_proj.weight.std() > 0 and torch.isfinite(mtp.eh_proj.weight).all()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.mtp_loss) and out.mtp_loss > 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_partial_mtp_layer_is_an_error_naming_checkpoint_keys(tmp_path: Path) -> None:
    ours, _ = build_pair("qlora-groups-dense1-yarn")
    ours.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    layer = ours.config.num_hidden_layers
    index["weight_map"].pop(f"model.layers.{layer}.eh_proj.weight")
    for e in (1, 3):
        index["weight_map"].pop(f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight")
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, progress=False, strict=False)
    message = str(err.value)
    assert f"model.layers.{layer}.eh_proj.weight" in message
    assert f"model.layers.{layer}.mlp.experts.{{1,3}}.{{down}}_proj.weight (2 expert slices)" in message
    assert "model.mtp." not in message


def test_mtp_shares_embedding_and_head_and_the_checkpoint_carries_copies(tmp_path: Path, caplog) -> None:
    """The MTP module uses the main embedding and output head (paper section 2.2; vLLM and SGLang share them too):
    it holds no copy, the saved checkpoint carries copies under model.layers.{L} as the official files do, and a
    checkpoint whose copies differ loads with one warning naming them."""
    from safetensors.torch import load_file, save_file

    ours, _ = build_pair("qlora-groups-dense1-yarn")
    names = {n for n, _ in ours.named_parameters()}
    assert not any(n.startswith("model.mtp.") and ("embed_tokens" in n or "head.weight" in n) for n in names)
    ours.save_pretrained(tmp_path)
    layer = ours.config.num_hidden_layers
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(saved[f"model.layers.{layer}.embed_tokens.weight"], saved["model.embed_tokens.weight"])
    assert torch.equal(saved[f"model.layers.{layer}.shared_head.head.weight"], saved["lm_head.weight"])
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, progress=False)
    assert not caplog.records
    saved[f"model.layers.{layer}.embed_tokens.weight"] = saved["model.embed_tokens.weight"] + 1.0
    save_file(saved, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    assert len(caplog.records) == 1
    assert f"model.layers.{layer}.embed_tokens.weight (!= model.embed_tokens.weight)" in caplog.records[0].getMessage()
    assert torch.equal(loaded.model.embed_tokens.weight, ours.model.embed_tokens.weight)
