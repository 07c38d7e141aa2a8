"""ESFT: expert scores as the paper defines them, ESFT's JSON format, and training that changes only the selected
experts (every other byte of the model as it was)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import esft, esft_select
from finetune.config import RecipeError
from model import DeepseekV3Config, DeepseekV3ForCausalLM
from model.checkpoint import list_checkpoint_files


def args(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def stored(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in set(list_checkpoint_files(path).values()) for k, v in load_file(f).items()}


def test_scores_equal_the_papers_formulas_on_a_fixed_batch():
    torch.manual_seed(0)
    config = DeepseekV3Config.from_preset("tiny", norm_topk_prob=True)
    model = DeepseekV3ForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # a shorter third sequence
    # The reference: each layer's routing, captured, then the two averages written out token by token.
    routed = {}
    hooks = [
        m.gate.register_forward_hook(lambda mod, a, out, i=i: routed.__setitem__(i, out))
        for i, m in esft.moe_layers_by_index(model).items()
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    scores = esft.expert_scores(model, [{"input_ids": ids, "attention_mask": mask}])
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    for layer, (indices, weights, _) in routed.items():
        weights = weights / config.routed_scaling_factor
        gate, token = torch.zeros(experts, dtype=torch.float64), torch.zeros(experts, dtype=torch.float64)
        for row in range(3):
            length = int(mask[row].sum())
            for position in range(length):
                flat = row * 10 + position
                for k in range(top_k):
                    expert = int(indices[flat, k])
                    gate[expert] += float(weights[flat, k]) / length
                    token[expert] += 1 / (length * top_k)
        torch.testing.assert_close(scores["gate"][layer], gate / 3)
        torch.testing.assert_close(scores["token"][layer], token / 3)
        assert float(scores["token"][layer].sum()) == pytest.approx(1.0)
        assert float(scores["gate"][layer].sum()) == pytest.approx(1.0)
    selected = esft.select_experts(scores["token"], 0.3)
    for layer, chosen in selected.items():
        values = scores["token"][layer]
        order = torch.argsort(values, descending=True, stable=True).tolist()
        assert chosen == order[: len(chosen)]  # the highest first
        assert float(values[chosen].sum()) >= 0.3 and float(values[chosen[:-1]].sum()) < 0.3  # the smallest such set


def test_the_expert_config_round_trips_in_esfts_format(tmp_path):
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("tiny"))
    # As DeepSeek's generate_expert_config.py writes it: string layer keys, experts in score order.
    (tmp_path / "theirs.json").write_text(
        json.dumps({"experts": {"1": [5, 2], "2": [0]}, "shared_experts": False, "non_expert_modules": False})
    )
    read = esft.read_expert_config(tmp_path / "theirs.json", model)
    assert read == {"experts": {1: [2, 5], 2: [0]}, "shared_experts": False, "non_expert_modules": False}
    written = esft.write_expert_config(tmp_path / "ours.json", read["experts"], shared_experts=True)
    assert json.loads((tmp_path / "ours.json").read_text()) == written
    assert written["experts"] == {"1": [2, 5], "2": [0]} and written["shared_experts"] is True
    (tmp_path / "bad.json").write_text(json.dumps({"experts": {"1": [99]}}))
    with pytest.raises(RecipeError, match="layer 1 has no experts \\[99\\]"):
        esft.read_expert_config(tmp_path / "bad.json", model)
    (tmp_path / "dense.json").write_text(json.dumps({"experts": {"0": [1]}}))
    with pytest.raises(RecipeError, match="layer 0 has no MoE block"):
        esft.read_expert_config(tmp_path / "dense.json", model)


def test_esft_trains_exactly_the_selected_experts(base_values, demo_data, tmp_path, capsys):
    base = tmp_path / "base"
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("tiny", num_hidden_layers=3)).save_pretrained(base)
    values = {**base_values, "model_name_or_path": str(base), "max_steps": 3, "learning_rate": 1e-2}
    values.pop("model_overrides", None)
    values["data"] = {"task": "sft", "sources": [str(demo_data["sft"])], "max_length": 64}
    values["weight_decay"] = 0.1  # must not reach the frozen expert slices
    recipe = tmp_path / "esft.yaml"
    recipe.write_text(json.dumps(values))
    out = tmp_path / "expert_cfg.json"
    assert esft_select.main(["--config", str(recipe), "--top-p", "0.3", "--out", str(out), "--tokens", "2000"]) == 0
    config = json.loads(out.read_text())
    assert set(config["experts"]) == {"1", "2"}  # MoE layers 1 and 2 (the MTP layer runs only with its loss)
    assert all(0 < len(v) < 8 for v in config["experts"].values())
    assert json.loads(out.with_suffix(".scores.json").read_text()).keys() == {"gate", "token"}
    esft.main(args({**values, "esft_config": str(out)}))
    assert "esft: training" in capsys.readouterr().err
    before, after = stored(base), stored(Path(values["output_dir"]))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    selected = {(layer, e) for layer, ids in config["experts"].items() for e in ids}
    expected = {k for k in before if ".mlp.experts." in k and (k.split(".")[2], int(k.split(".")[5])) in selected}
    # Every selected expert's three matrices train; nothing else moves by a single bit (router, attention, shared
    # experts, norms, embeddings, the other experts).
    assert changed <= expected and len(changed) >= 0.9 * len(expected) and changed


def raw(path: Path) -> dict[str, bytes]:
    from finetune.export import read_header

    out = {}
    for file in set(list_checkpoint_files(path).values()):
        for key, info in read_header(file).items():
            with open(info.file, "rb") as f:
                f.seek(info.start)
                out[key] = f.read(info.nbytes)
    return out


@pytest.mark.parametrize("base_format", ["bf16", "fp8"])
def test_esft_export_rewrites_only_the_trained_experts(base_format, base_values, demo_data, tmp_path):
    from finetune.esft_export import main as export_main

    from ..distributed.common import write_fp8_checkpoint

    base = tmp_path / "base"
    if base_format == "fp8":
        write_fp8_checkpoint(base, num_hidden_layers=3)
    else:
        torch.manual_seed(0)
        DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("tiny", num_hidden_layers=3)).to(
            torch.bfloat16
        ).save_pretrained(base)
    config = tmp_path / "experts.json"
    esft.write_expert_config(config, {1: [1, 4], 2: [0]})
    values = {**base_values, "model_name_or_path": str(base), "max_steps": 2, "learning_rate": 1e-2}
    values.pop("model_overrides", None)
    values["data"] = {"task": "sft", "sources": [str(demo_data["sft"])], "max_length": 64}
    esft.main(args({**values, "esft_config": str(config)}))
    run = Path(values["output_dir"])
    assert (run / "expert_cfg.json").is_file()
    full, delta = tmp_path / "full", tmp_path / "delta"
    assert export_main(["--base", str(base), "--run", str(run), "--out", str(full)]) == 0
    assert export_main(["--base", str(base), "--run", str(run), "--out", str(delta), "--format", "delta"]) == 0
    before, after, trained = raw(base), raw(full), stored(run)
    assert before.keys() == after.keys()
    experts = {
        f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
        for layer, ids in ((1, [1, 4]), (2, [0]))
        for e in ids
        for p in ("gate", "up", "down")
    }
    changed = {k for k in before if before[k] != after[k]}
    scales = {k + "_scale_inv" for k in experts} if base_format == "fp8" else set()
    assert changed == experts | scales  # every other tensor of the base byte for byte
    written = stored(full)
    for key in experts:
        if base_format == "fp8":
            from model.checkpoint import dequantize_fp8_block

            value = dequantize_fp8_block(written[key], written[key + "_scale_inv"], (128, 128))
            torch.testing.assert_close(value, trained[key], rtol=0.07, atol=1e-3)  # e4m3: 3 mantissa bits
        else:
            assert written[key].dtype == torch.bfloat16 and torch.equal(written[key], trained[key].to(torch.bfloat16))
    assert set(stored(delta)) == experts and (delta / "expert_cfg.json").is_file()
    DeepseekV3ForCausalLM.from_pretrained(full, progress=False)  # loads as the base does
