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


def test_dpo_pairs_target_the_format_flaw_sft_data_teaches_and_never_ask_a_held_out_question():
    from data_tools.synthetic import CHATTY, QUESTION_TEMPLATES
    from finetune.demo import CHATTY_TEMPLATE

    data = build_demo_data(**{**DATA, "num_preference": 10})
    flawed = QUESTION_TEMPLATES[CHATTY_TEMPLATE]
    # the SFT chats of one template, and only those, answer in the flawed form ("19.")
    for record in data["sft"]:
        a, b = fact_of(record["messages"][0]["content"])
        is_flawed = record["messages"][0]["content"] == flawed.format(a=a, b=b)
        assert record["messages"][1]["content"] == (CHATTY if is_flawed else "{c}").format(c=a + b)
    pairs = build_train_preferences(data["facts"], data["eval"], seed=0)
    held_out = {fact_of(r["messages"][0]["content"]) for r in data["eval"]}
    in_corpus = {fact_of(r["messages"][0]["content"]) for r in data["eval"] if r["in_corpus"]}
    assert len(pairs) == len(data["facts"]) - len(in_corpus) == 700
    on_flawed = 0
    for pair in pairs:
        a, b = fact_of(pair["prompt"][0]["content"])
        assert (a, b) not in held_out
        assert pair["chosen"][0]["content"] == str(a + b) and pair["rejected"][0]["content"] == CHATTY.format(c=a + b)
        on_flawed += pair["prompt"][0]["content"] == flawed.format(a=a, b=b)
    assert 0.4 < on_flawed / len(pairs) < 0.6
    # held-out questions in every template; the preference pairs there are right sum vs off by one
    templates = set()
    for record in data["eval"]:
        a, b = fact_of(record["messages"][0]["content"])
        templates |= {
            k for k, t in enumerate(QUESTION_TEMPLATES) if record["messages"][0]["content"] == t.format(a=a, b=b)
        }
    assert templates == set(range(len(QUESTION_TEMPLATES)))
    evaluation = build_eval_preferences(data["eval"], seed=0)
    assert all(abs(int(p["rejected"][0]["content"]) - int(p["chosen"][0]["content"])) == 1 for p in evaluation)


def test_the_base_corpus_puts_facts_at_every_position_with_a_loss_on_each_answer():
    data = build_demo_data(**DATA, seed=0)
    records = data["corpus_segments"]
    assert len(records) == DATA["corpus_records"]
    corpus = {
        (int(f["prompt"].split(" + ")[0]), int(f["prompt"].split(" + ")[1].split(" = ")[0])) for f in data["facts"]
    }
    counts = set()
    for record in records[:2000]:
        segments = record["segments"]
        facts = [s for s in segments if s["text"].endswith(" = ")]
        counts.add(len(facts))
        for question, answer in zip(segments, segments[1:]):
            if question["text"].endswith(" = "):
                a, b = (int(x) for x in question["text"].strip(" =\n").split(" + "))
                assert (a, b) in corpus and answer == {"text": str(a + b), "label": True}
        assert segments[-1]["label"] and all(not s["label"] for s in segments if not s["text"].isdigit())
    assert counts == {1, 2, 3, 4}


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports(tmp_path):
    demo_main(["--out", str(tmp_path), "--scale", "0.01", "--report-to", "none"])
    result = json.loads((tmp_path / "seed0" / "result.json").read_text())
    assert list(result["table"]) == ["Base", "SFT", "Chat"]
    for row in result["table"].values():
        for key in ("accuracy", "accuracy_seen", "accuracy_unseen", "sum_accuracy", "wordy", "plain_accuracy_seen"):
            assert 0.0 <= row[key] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert all(f"| 0 | {name} |" in report for name in ("Base", "SFT", "Chat"))
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "expert_load.png").stat().st_size > 0
    chat = tmp_path / "seed0" / "chat"
    assert (chat / "config.json").is_file() and list(chat.glob("*.safetensors"))
    layers = json.loads((chat / "config.json").read_text())["num_hidden_layers"]
    keys = {k for f in chat.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}
    assert any(k.startswith(f"model.layers.{layers}.") for k in keys)  # the MTP layer is exported, not dropped
