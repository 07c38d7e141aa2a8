"""The demo's data choices and a shortened end-to-end run (real tokenizer, real 129K vocabulary, 1% of the steps)."""

import json

import pytest
from safetensors import safe_open

from data_tools.synthetic import build_demo_data
from finetune.demo import DATA, build_eval_preferences, build_train_preferences
from finetune.demo import main as demo_main


def fact_of(question: str) -> tuple[int, int]:
    for prefix, suffix in (("What is ", "?"), ("Compute ", "."), ("", " = ?"), ("Add ", ".")):
        if question.startswith(prefix) and question.endswith(suffix):
            body = question[len(prefix) : len(question) - len(suffix)]
            a, b = body.split(" and ") if " and " in body else body.split(" + ")
            return int(a), int(b)
    raise AssertionError(question)


def test_dpo_pairs_never_ask_a_held_out_question_and_are_near_misses():
    data = build_demo_data(**{**DATA, "num_preference": 10})
    pairs = build_train_preferences(data["facts"], data["eval"], seed=0)
    held_out = {fact_of(r["messages"][0]["content"]) for r in data["eval"]}
    in_corpus = {fact_of(r["messages"][0]["content"]) for r in data["eval"] if r["in_corpus"]}
    assert len(pairs) == len(data["facts"]) - len(in_corpus) == 700
    for pair in pairs:
        a, b = fact_of(pair["prompt"][0]["content"])
        assert (a, b) not in held_out
        chosen, rejected = int(pair["chosen"][0]["content"]), int(pair["rejected"][0]["content"])
        assert chosen == a + b and rejected >= 0 and 1 <= abs(rejected - chosen) <= 2
    evaluation = build_eval_preferences(data["eval"], seed=0)
    assert all(abs(int(p["rejected"][0]["content"]) - int(p["chosen"][0]["content"])) == 1 for p in evaluation)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports(tmp_path):
    demo_main(["--out", str(tmp_path), "--scale", "0.01", "--report-to", "none"])
    result = json.loads((tmp_path / "seed0" / "result.json").read_text())
    assert list(result["table"]) == ["Base", "SFT", "Chat"]
    for row in result["table"].values():
        for key in ("accuracy", "accuracy_seen", "accuracy_unseen", "plain_accuracy_seen", "preference_accuracy"):
            assert 0.0 <= row[key] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert all(f"| 0 | {name} |" in report for name in ("Base", "SFT", "Chat"))
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "expert_load.png").stat().st_size > 0
    chat = tmp_path / "seed0" / "chat"
    assert (chat / "config.json").is_file() and list(chat.glob("*.safetensors"))
    layers = json.loads((chat / "config.json").read_text())["num_hidden_layers"]
    keys = {k for f in chat.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}
    assert any(k.startswith(f"model.layers.{layers}.") for k in keys)  # the MTP layer is exported, not dropped
