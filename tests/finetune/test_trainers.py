"""The DPO loss against trl's formula on a fixed batch; MTP and balance losses reach their weights."""

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedTokenizerFast

from data_tools import DataCollator
from finetune.config import DPOStageConfig, SFTStageConfig, build_stage_config
from finetune.lora import build_lora_config
from finetune.trainers import DeepseekDPOTrainer, DeepseekSFTTrainer
from model import DeepseekV3Config, DeepseekV3ForCausalLM


def tiny(**overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("tiny", num_hidden_layers=2, **overrides))


def preference_rows(n=4) -> Dataset:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt_ids": torch.randint(3, 1000, (5 + i,), generator=g).tolist(),
                "chosen_ids": torch.randint(3, 1000, (3,), generator=g).tolist() + [1],
                "rejected_ids": torch.randint(3, 1000, (2 + i,), generator=g).tolist() + [1],
            }
        )
    return Dataset.from_list(rows)


def completion_logps(model, batch) -> torch.Tensor:
    """Reference computation: full logits, log_softmax, sum over completion tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    logps = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_dpo_loss_and_rewards_match_reference(small_tokenizer, tmp_path):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(small_tokenizer)
    args = build_stage_config(
        DPOStageConfig,
        {"output_dir": str(tmp_path), "report_to": "none", "beta": 0.3, "per_device_train_batch_size": 4},
    )
    model = tiny()
    trainer = DeepseekDPOTrainer(
        model=model,
        args=args,
        train_dataset=preference_rows(),
        processing_class=tokenizer,
        peft_config=build_lora_config(model, "both", r=4),
    )
    peft_model = trainer.model
    with torch.no_grad():  # a non-zero adapter, so policy != reference
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = trainer.data_collator([preference_rows()[i] for i in range(4)])
    peft_model.train()
    loss = trainer.compute_loss(peft_model, batch)
    metrics = trainer._metrics["train"]

    peft_model.eval()  # no dropout either way; eval keeps the balance loss out
    with torch.no_grad():
        policy = completion_logps(peft_model, batch)
        with peft_model.disable_adapter():
            reference = completion_logps(peft_model, batch)
    chosen, rejected = (policy - reference).chunk(2)
    expected = -F.logsigmoid(0.3 * (chosen - rejected)).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert abs(metrics["rewards/chosen"][-1] - float(0.3 * chosen.mean())) < 1e-4
    assert abs(metrics["rewards/rejected"][-1] - float(0.3 * rejected.mean())) < 1e-4
    assert abs(metrics["rewards/margins"][-1] - float(0.3 * (chosen - rejected).mean())) < 1e-4


def packed_rows(n=8, width=32) -> Dataset:
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 1000, (width,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:], "position_ids": list(range(width))})
    return Dataset.from_list(rows)


def one_step(tmp_path, tokenizer_dir, **fields) -> tuple[DeepseekV3ForCausalLM, DeepseekV3ForCausalLM]:
    """(initial copy, model after 2 full-training steps) with the given stage fields."""
    overrides = {k: fields.pop(k) for k in ("balance_loss_alpha", "mtp_loss_enabled") if k in fields}
    model = tiny(**overrides)
    initial = tiny(**overrides)
    args = build_stage_config(
        SFTStageConfig,
        {
            "output_dir": str(tmp_path),
            "report_to": "none",
            "max_steps": 2,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 4,
            "save_strategy": "no",
            **fields,
        },
    )
    trainer = DeepseekSFTTrainer(
        model=model,
        args=args,
        train_dataset=packed_rows(),
        data_collator=DataCollator(pad_id=1),
        processing_class=PreTrainedTokenizerFast.from_pretrained(tokenizer_dir),
    )
    trainer.train()
    return initial, model


def changed(a: torch.nn.Module, b: torch.nn.Module, prefix: str) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return any(not torch.equal(pa[k], pb[k]) for k in pa if k.startswith(prefix))


def test_mtp_loss_trains_the_mtp_module(tmp_path, small_tokenizer):
    initial, off = one_step(tmp_path / "off", small_tokenizer)
    assert not changed(initial, off, "model.mtp.0.")
    initial, on = one_step(tmp_path / "on", small_tokenizer, mtp_loss_enabled=True)
    assert changed(initial, on, "model.mtp.0.eh_proj") and changed(initial, on, "model.mtp.0.mlp.gate")


def test_balance_loss_changes_the_router(tmp_path, small_tokenizer):
    _, off = one_step(tmp_path / "off", small_tokenizer, router_bias_update="never")
    _, on = one_step(tmp_path / "on", small_tokenizer, balance_loss_alpha=0.1, router_bias_update="never")
    gate_off, gate_on = off.model.layers[1].mlp.gate.weight, on.model.layers[1].mlp.gate.weight
    assert not torch.allclose(gate_off, gate_on)
    assert off.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0


def test_router_bias_update_follows_load(tmp_path, small_tokenizer):
    initial, model = one_step(tmp_path, small_tokenizer, router_bias_gamma=0.01)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0
    steps = bias.abs() / 0.01  # two updates of +-gamma (or none when the load was exactly the mean)
    torch.testing.assert_close(steps, steps.round())
