"""KTO, CPO/SimPO and ORPO: the recipes load, short real runs on the tiny preset, and the loss on a fixed batch equals
trl's own computation (its unmodified full-logits forward) and the paper's formula written out here."""

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from finetune import cpo, kto, orpo
from finetune.cli import available_stages
from finetune.config import CPOStageConfig, KTOStageConfig, ORPOStageConfig, build_stage_config, load_stage_config
from finetune.stage import build_data, build_lora_config_from, build_model, build_tokenizer
from finetune.trainers import (
    DeepseekCPOTrainer,
    DeepseekKTOTrainer,
    DeepseekORPOTrainer,
    TrainingDiverged,
    unwrap_base,
)

ROOT = Path(__file__).resolve().parents[2]
STAGE_CLASSES = {"kto": KTOStageConfig, "cpo": CPOStageConfig, "orpo": ORPOStageConfig}
# ours (fused chunked log-probs) vs full-logits log_softmax, float32; measured: CPO/SimPO bitwise equal, ORPO and
# KTO up to 1.3e-7 and 5.7e-7 relative (0 on some batches)
RTOL, ATOL = 1e-5, 1e-6


def args(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def losses(folder: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def adapter_modules(folder: Path) -> set[str]:
    keys = load_file(folder / "adapter_model.safetensors").keys()
    return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}


def assert_attention_and_shared_experts_only(modules: set[str]) -> None:
    assert modules and all(m.startswith("model.layers.") for m in modules)
    assert all("self_attn." in m or "mlp.shared_experts." in m for m in modules)
    assert any("shared_experts" in m for m in modules) and any("kv_b_proj" in m for m in modules)


@pytest.fixture(scope="module")
def kto_records(demo_data, tmp_path_factory) -> Path:
    """The demo pairs written as unpaired kto records, alternating desirable and undesirable."""
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    with open(path, "w") as out:
        for i, line in enumerate(demo_data["preference"].read_text().splitlines()):
            pair = json.loads(line)
            good = i % 2 == 0
            completion = pair["chosen"] if good else pair["rejected"]
            out.write(json.dumps({"prompt": pair["prompt"], "completion": completion, "label": good}) + "\n")
    return path


@pytest.fixture(scope="module")
def few_kto_records(kto_records) -> Path:
    """Two batches' worth: precompute_ref_log_probs runs the reference over the whole dataset."""
    path = kto_records.with_name("few.jsonl")
    path.write_text("\n".join(kto_records.read_text().splitlines()[:8]) + "\n")
    return path


# --- recipes and CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name in STAGE_CLASSES),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_preference_recipes_load(path):
    first = path.read_text().splitlines()[0]
    command = f"{path.parent.name} --config {path.relative_to(ROOT)}"
    assert first.startswith((f"# python -m finetune.{command}", f"# dsv3-finetune {command}"))
    config = load_stage_config(STAGE_CLASSES[path.parent.name], path)
    assert config.data.get("sources") and config.use_lora


def test_stages_are_listed():
    assert {"kto", "cpo", "orpo"} <= set(available_stages())


def test_unpair_gives_one_desirable_and_one_undesirable_example_per_pair():
    pairs = Dataset.from_dict(
        {"prompt_ids": [[1], [2], [3]], "chosen_ids": [[4], [5], [6]], "rejected_ids": [[7], [8], [9]]}
    )
    rows = kto.unpair(pairs, seed=0)
    assert set(rows.column_names) == {"prompt_ids", "completion_ids", "label"}
    got = sorted((r["prompt_ids"][0], r["completion_ids"][0], r["label"]) for r in rows)
    assert got == [(1, 4, True), (1, 7, False), (2, 5, True), (2, 8, False), (3, 6, True), (3, 9, False)]
    assert [r["label"] for r in rows] != [True] * 3 + [False] * 3, "shuffled: batches mix both labels"


# --- short real runs -------------------------------------------------------------------------------------------


@pytest.mark.slow  # four forwards a step (policy, reference, and both on the KL completions): ~30 s on 2 busy cores
def test_kto_lora_runs_with_adapter_disabled_reference(base_values, kto_records):
    values = {**base_values, "use_lora": True, "lora_r": 8, "learning_rate": 5e-3, "beta": 0.5}
    values["data"] = {"sources": [str(kto_records)], "max_length": 64}
    kto.main(args({**values, "max_steps": 6}))
    run = Path(values["output_dir"])
    curve = losses(run)
    assert curve[1] == pytest.approx(0.5, abs=1e-6), "first step: policy == reference, every loss is 1 - sigmoid(0)"
    assert all(torch.isfinite(torch.tensor(v)) for v in curve.values())
    assert curve[6] < curve[1] - 0.1
    assert losses(run, "rewards/margins")[6] > 0
    assert_attention_and_shared_experts_only(adapter_modules(run))


def test_simpo_lora_loss_falls(base_values, demo_data):
    values = {**base_values, "use_lora": True, "lora_r": 8, "learning_rate": 5e-3}
    values |= {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0}
    values["data"] = {"sources": [str(demo_data["preference"])], "max_length": 64}
    cpo.main(args({**values, "max_steps": 6}))
    run = Path(values["output_dir"])
    curve = losses(run)
    assert curve[6] < curve[1]
    assert losses(run, "rewards/margins")[6] > losses(run, "rewards/margins")[1]
    assert_attention_and_shared_experts_only(adapter_modules(run))


def test_orpo_lora_loss_falls(base_values, demo_data):
    values = {**base_values, "use_lora": True, "lora_r": 8, "learning_rate": 5e-3}
    values["data"] = {"sources": [str(demo_data["preference"])], "max_length": 64}
    orpo.main(args({**values, "max_steps": 6}))
    run = Path(values["output_dir"])
    curve = losses(run)
    assert curve[6] < curve[1] - 0.1
    assert losses(run, "nll_loss")[6] < losses(run, "nll_loss")[1]
    assert_attention_and_shared_experts_only(adapter_modules(run))


# --- the loss on a fixed batch against trl and the papers -----------------------------------------------------


def build_trainer(cls, config_cls, values: dict, task: str, data: Path):
    """One of our trainers on the tiny preset, without the stage's logging."""
    config = build_stage_config(config_cls, {**values, "data": {"sources": [str(data)], "max_length": 64}})
    tokenizer = build_tokenizer(config)
    model = build_model(config)
    train, _ = build_data(config, task, tokenizer, model.config.vocab_size)
    peft_config = build_lora_config_from(model, config) if config.use_lora else None
    return cls(model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config)


def sequence_log_probs(model, input_ids, attention_mask, labels, average: bool) -> torch.Tensor:
    """Sum (or mean) of log p(label) over the positions where labels != -100, from the model's full logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    per_token = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    return per_token.sum(-1) / mask.sum(-1) if average else per_token.sum(-1)


def trl_reference_loss(trainer, trl_cls, model, batch) -> torch.Tensor:
    """trl's own loss: its unmodified concatenated_forward (full logits from our model's forward)."""
    trainer.concatenated_forward = types.MethodType(trl_cls.concatenated_forward, trainer)
    try:
        return trl_cls.get_batch_loss_metrics(trainer, model, batch)[0]
    finally:
        del trainer.concatenated_forward


@pytest.fixture(scope="module")
def preference_batch_values(small_tokenizer, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    return {"model_overrides": {"num_hidden_layers": 2}, "tokenizer": small_tokenizer, "output_dir": str(out)} | {
        "report_to": "none",
        "seed": 0,
        "per_device_train_batch_size": 4,
        "balance_loss_alpha": 0.01,
    }


def test_cpo_and_simpo_loss_match_trl_and_formula(preference_batch_values, demo_data):
    values = {**preference_batch_values, "loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0}
    trainer = build_trainer(DeepseekCPOTrainer, CPOStageConfig, values, "dpo", demo_data["preference"])
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    half = batch["chosen_input_ids"].shape[0]
    rows = trainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
    ids, mask, labels = (rows[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    for loss_type, cpo_alpha in (("simpo", 0.0), ("simpo", 0.5), ("sigmoid", 1.0), ("ipo", 1.0)):
        trainer.loss_type, trainer.cpo_alpha = loss_type, cpo_alpha
        model.eval()
        with torch.no_grad():
            ours = trainer.compute_loss(model, batch)
            reference = trl_reference_loss(trainer, CPOTrainer, model, batch)
            logps = sequence_log_probs(model, ids, mask, labels, average=loss_type in ("simpo", "ipo"))
            margin = logps[:half] - logps[half:]
            nll = -sequence_log_probs(model, ids[:half], mask[:half], labels[:half], average=False).sum()
            nll = nll / (labels[:half, 1:] != -100).sum()
        if loss_type == "simpo":  # SimPO eq. 6: -log sigmoid(beta * (avg logp_c - avg logp_r) - gamma)
            paper = -F.logsigmoid(2.0 * margin - 1.0).mean()
        elif loss_type == "sigmoid":
            paper = -F.logsigmoid(2.0 * margin).mean()
        else:
            paper = ((margin - 1 / (2 * 2.0)) ** 2).mean()
        paper = paper + cpo_alpha * nll
        assert ours.item() == pytest.approx(reference.item(), rel=RTOL, abs=ATOL), loss_type
        assert ours.item() == pytest.approx(paper.item(), rel=RTOL, abs=ATOL), loss_type
    model.train()  # training adds the balance loss of the policy forward
    trained = trainer.compute_loss(model, batch)
    balance = unwrap_base(model).policy_balance_loss
    assert balance is not None and balance.item() > 0
    assert trained.item() == pytest.approx(ours.item() + balance.item(), rel=RTOL, abs=ATOL)
    trainer.cpo_loss = lambda chosen, rejected: (chosen * float("nan"), chosen.detach(), rejected.detach())
    with pytest.raises(TrainingDiverged, match="step 1"):
        trainer.compute_loss(model, batch)


def test_orpo_loss_matches_trl_and_formula(preference_batch_values, demo_data):
    values = {**preference_batch_values, "beta": 0.25}
    trainer = build_trainer(DeepseekORPOTrainer, ORPOStageConfig, values, "dpo", demo_data["preference"])
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    half = batch["chosen_input_ids"].shape[0]
    rows = trainer.concatenated_inputs(batch, padding_value=trainer.padding_value)
    ids, mask, labels = (rows[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        reference = trl_reference_loss(trainer, ORPOTrainer, model, batch)
        logps = sequence_log_probs(model, ids, mask, labels, average=True)
        # the NLL term covers prompt + chosen (trl and the ORPO authors' code), a token mean over the chosen rows
        every_token = ids.masked_fill(mask == 0, -100)[:half]
        nll = -sequence_log_probs(model, ids[:half], mask[:half], every_token, average=False).sum()
        nll = nll / (every_token[:, 1:] != -100).sum()
    # ORPO eq. 4-6: odds(y) = p / (1 - p) with p the length-normalised likelihood; L = L_SFT + lambda * L_OR
    p_chosen, p_rejected = logps[:half].exp(), logps[half:].exp()
    log_odds = torch.log(p_chosen / (1 - p_chosen)) - torch.log(p_rejected / (1 - p_rejected))
    paper = nll - 0.25 * F.logsigmoid(log_odds).mean()
    assert ours.item() == pytest.approx(reference.item(), rel=RTOL, abs=ATOL)
    assert ours.item() == pytest.approx(paper.item(), rel=RTOL, abs=ATOL)


def perturbed_kto_trainer(values: dict, kto_records: Path) -> DeepseekKTOTrainer:
    """A LoRA KTO trainer whose adapters are random (policy != reference), the same for the same values."""
    trainer = build_trainer(DeepseekKTOTrainer, KTOStageConfig, values, "kto", kto_records)
    assert trainer.ref_model is None, "LoRA: the reference is the policy with its adapters disabled"
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    trainer.model.eval()
    return trainer


@pytest.mark.parametrize("precompute", [False, True], ids=["live_reference", "precomputed_reference"])
def test_kto_loss_matches_formula_with_adapter_disabled_reference(preference_batch_values, few_kto_records, precompute):
    values = {**preference_batch_values, "use_lora": True, "lora_r": 8, "beta": 0.5, "desirable_weight": 1.3}
    trainer = perturbed_kto_trainer({**values, "precompute_ref_log_probs": precompute}, few_kto_records)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert ("ref_logps" in batch) == precompute
    label = batch["label"]
    assert label.any() and not label.all()

    def completion_logps(prefix: str) -> torch.Tensor:
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        labels = ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, -100)
        return sequence_log_probs(model, ids, mask, labels, average=False)

    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        policy, policy_kl = completion_logps(""), completion_logps("KL_")
        with model.disable_adapter():
            reference, reference_kl = completion_logps(""), completion_logps("KL_")
    # KTO eq. 7 as trl has it: z0 = batch mean of KL(policy || reference) on mismatched completions, clamped at 0
    z0 = (policy_kl - reference_kl).mean().clamp(min=0)
    ratio = policy - reference
    chosen = 1 - torch.sigmoid(0.5 * (ratio[label] - z0))
    rejected = 1 - torch.sigmoid(0.5 * (z0 - ratio[~label]))
    paper = torch.cat([1.3 * chosen, rejected]).mean()
    assert ratio.abs().max() > 1e-3, "the perturbed adapters must move the policy"
    assert ours.item() == pytest.approx(paper.item(), rel=RTOL, abs=ATOL)


def test_kto_full_training_keeps_a_frozen_copy_as_reference(preference_batch_values, few_kto_records):
    trainer = build_trainer(DeepseekKTOTrainer, KTOStageConfig, preference_batch_values, "kto", few_kto_records)
    reference, policy = unwrap_base(trainer.ref_model), unwrap_base(trainer.model)
    assert reference is not policy
    assert not any(p.requires_grad for p in reference.parameters())
    for (name, a), b in zip(policy.named_parameters(), reference.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
