import json
import subprocess
import sys

import datasets
import pytest
import yaml

from data_tools.cli import main
from data_tools.errors import DataError
from data_tools.pipeline import DataRecipe, build_datasets, load_recipe
from data_tools.sources import SourceSpec
from data_tools.synthetic import build_demo_data, save_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    save_demo_data(folder)  # the default demo: 2000 chats, 200 eval questions, 500 pairs
    return folder


def test_demo_data_is_deterministic_and_eval_is_disjoint():
    first = build_demo_data(num_train=300, num_eval=50, num_preference=40, max_operand=30, seed=3)
    assert first == build_demo_data(num_train=300, num_eval=50, num_preference=40, max_operand=30, seed=3)
    question = lambda r: r["messages"][0]["content"]  # noqa: E731
    train_questions = {question(r).split("?")[0].split("is ")[-1].strip(".") for r in first["sft"]}
    eval_facts = [r["messages"][0]["content"][len("What is ") : -1] for r in first["eval"]]
    assert not any(fact in train_questions for fact in eval_facts)
    corpus = " ".join(r["text"] for r in first["corpus"])
    seen = [r for r in first["eval"] if r["in_corpus"]]
    unseen = [r for r in first["eval"] if not r["in_corpus"]]
    assert seen and unseen
    fact = lambda r: f"{r['messages'][0]['content'][len('What is ') : -1]} = {r['messages'][1]['content']}."  # noqa: E731
    assert all(fact(r) in corpus for r in seen) and not any(fact(r) in corpus for r in unseen)


def test_mixture_honours_weights_dedup_and_split(tmp_path, tokenizer):
    rows = lambda tag, n: [{"prompt": f"{tag} {i}", "completion": "ok"} for i in range(n)]  # noqa: E731
    for name, records in (("a", rows("a", 40)), ("b", rows("b", 20) + rows("b", 5))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = DataRecipe(
        sources=[
            SourceSpec(str(tmp_path / "a.jsonl"), weight=0.5, as_chat=True),
            SourceSpec(str(tmp_path / "b.jsonl"), weight=2.0, as_chat=True),
        ],
        pack=False,
        max_length=64,
    )
    splits, report = build_datasets(recipe, tokenizer)
    texts = [tokenizer.decode(ids) for ids in splits["train"]["input_ids"]]
    assert sum("<｜User｜>a " in t for t in texts) == 20 and sum("<｜User｜>b " in t for t in texts) == 40
    assert report.dropped["duplicate"] == 5
    again, _ = build_datasets(recipe, tokenizer)
    assert again["train"]["input_ids"] == splits["train"]["input_ids"]
    held, _ = build_datasets(
        DataRecipe(**{**recipe.__dict__, "eval_fraction": 0.25, "sources": recipe.sources[:1]}), tokenizer
    )
    train = {tuple(x) for x in held["train"]["input_ids"]}
    assert held["eval"].num_rows > 0 and not train & {tuple(x) for x in held["eval"]["input_ids"]}


def test_demo_recipe_packs_above_95_percent_with_two_processes(demo, tokenizer):
    recipe = DataRecipe(
        sources=[SourceSpec(str(demo / "sft.jsonl"))],
        max_length=512,
        num_proc=2,
        eval_sources=[SourceSpec(str(demo / "eval.jsonl"))],
    )
    splits, report = build_datasets(recipe, tokenizer)
    assert report.examples["train"] == 2000 and report.examples["eval"] == 200
    assert report.fill_ratio["train"] >= 0.95
    assert sum(sum(x) for x in splits["train"]["seq_lengths"]) == sum(report.lengths["train"])


def test_cpt_blocks_with_replay(demo, tokenizer):
    recipe = DataRecipe(
        task="cpt",
        sources=[SourceSpec(str(demo / "corpus.txt"))],
        max_length=128,
        replay_sources=[SourceSpec(str(demo / "sft.jsonl"))],
        replay_fraction=0.2,
    )
    splits, report = build_datasets(recipe, tokenizer)
    train = splits["train"]
    blocks = [r for r in train if len(r["seq_lengths"]) == 1 and r["seq_lengths"][0] == 128]
    assert 0.7 <= len(blocks) / len(train) <= 0.85
    text = tokenizer.decode(blocks[0]["input_ids"])
    assert " = " in text and "<｜User｜>" not in text
    assert all(len(r["input_ids"]) == 128 for r in train)


def test_cpt_plain_text_completions_train_the_completion_only(demo, tokenizer, tmp_path):
    recipe = DataRecipe(
        task="cpt", sources=[SourceSpec(str(demo / "facts.jsonl"), format="text_completion")], max_length=64
    )
    splits, report = build_datasets(recipe, tokenizer)
    facts = [json.loads(line) for line in (demo / "facts.jsonl").read_text().splitlines()]
    assert report.examples["train"] == len(facts) and 0.9 <= report.fill_ratio["train"] <= 1.0
    row = splits["train"][0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]  # samples, then the padding's own run
    assert len(row["seq_lengths"]) >= 5 and len(starts) - len(row["seq_lengths"]) in (0, 1)  # several facts a row
    for start, length in zip(starts, row["seq_lengths"]):
        ids, labels = row["input_ids"][start : start + length], row["labels"][start : start + length]
        assert row["position_ids"][start : start + length] == list(range(length))
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        prompt = tokenizer.decode(ids[1 : labels.index(next(x for x in labels if x != -100))])
        completion = tokenizer.decode([x for x in labels if x != -100][:-1])
        assert any(f["prompt"] == prompt and f["completion"] == completion for f in facts)  # no chat template
        a, b = prompt.split(" = ")[0].split(" + ")
        assert int(completion) == int(a) + int(b)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1 = ", "completion": "2"}\n{"prompt": "1 + 2 = "}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2: field .completion.: missing field"):
        build_datasets(DataRecipe(task="cpt", sources=[SourceSpec(str(bad), format="text_completion")]), tokenizer)


def test_streaming_sft(demo, tokenizer):
    recipe = DataRecipe(sources=[SourceSpec(str(demo / "sft.jsonl"))], max_length=512, streaming=True)
    splits, _ = build_datasets(recipe, tokenizer)
    rows = list(splits["train"])
    assert isinstance(splits["train"], datasets.IterableDataset)
    assert sum(len(r["seq_lengths"]) for r in rows) == 2000 and all(len(r["input_ids"]) == 512 for r in rows)


def test_dpo_and_kto_columns_for_trl(demo, tokenizer, tmp_path):
    splits, _ = build_datasets(
        DataRecipe(task="dpo", sources=[SourceSpec(str(demo / "preference.jsonl"))], max_length=128), tokenizer
    )
    row = splits["train"][0]
    assert tokenizer.decode(row["prompt_ids"]).endswith("<｜Assistant｜>")
    assert row["chosen_ids"][-1] == 1 and row["chosen_ids"] != row["rejected_ids"]
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "2+2?", "completion": "4", "label": True}) + "\n")
    splits, _ = build_datasets(DataRecipe(task="kto", sources=[SourceSpec(str(kto))], max_length=64), tokenizer)
    assert splits["train"][0]["label"] is True and splits["train"][0]["completion_ids"][-1] == 1


def test_cli_prepare_validate_and_one_line_error(demo, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "task": "sft",
                    "max_length": 512,
                    "eval_fraction": 0.1,
                    "tokenizer": None,
                    "sources": [{"path": str(demo / "sft.jsonl")}],
                }
            }
        )
    )
    assert load_recipe(recipe).eval_fraction == 0.1
    assert main(["prepare", str(recipe), "--output", str(tmp_path / "out"), "--json"]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["fill_ratio"]["train"] >= 0.95 and stats["examples"]["eval"] > 0
    assert datasets.load_from_disk(str(tmp_path / "out" / "train")).column_names == [
        "input_ids",
        "labels",
        "position_ids",
        "seq_lengths",
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text((demo / "sft.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    capsys.readouterr()
    assert main(["validate", str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}:2: invalid JSON" in captured.out
    result = subprocess.run([sys.executable, "-m", "data_tools", "stats", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: invalid JSON")
    assert "Traceback" not in result.stderr


def test_sft_with_plain_text_replay(demo, tokenizer):
    """SFT rows with plain-text prompt/completion replay rows mixed in (against forgetting what the Base knows):
    the asked share of rows, replay samples without the chat template and with loss on the completion only."""
    recipe = DataRecipe(
        sources=[SourceSpec(str(demo / "sft.jsonl"))],
        max_length=64,
        replay_sources=[SourceSpec(str(demo / "facts.jsonl"), format="text_completion")],
        replay_fraction=0.2,
    )
    splits, report = build_datasets(recipe, tokenizer)
    train = splits["train"]
    user = tokenizer.convert_tokens_to_ids("<｜User｜>")
    replay = [r for r in train if user not in r["input_ids"]]
    assert report.rows["replay"] == len(replay) and abs(len(replay) / len(train) - 0.2) < 0.01
    assert all(user in r["input_ids"] for r in train if r not in replay)  # chat rows hold chats only
    row = replay[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    for start, length in zip(starts, row["seq_lengths"]):
        ids, labels = row["input_ids"][start : start + length], row["labels"][start : start + length]
        trained = [x for x in labels if x != -100]
        prompt = tokenizer.decode(ids[1 : len(ids) - len(trained)])
        a, b = prompt.split(" = ")[0].split(" + ")
        assert int(tokenizer.decode(trained[:-1])) == int(a) + int(b) and trained[-1] == tokenizer.eos_token_id
    unpacked = DataRecipe(**{**recipe.__dict__, "pack": False})
    with pytest.raises(DataError, match=r"replay_sources in sft need packed rows \(pack: true\)"):
        build_datasets(unpacked, tokenizer)
    with pytest.raises(DataError, match="replay_fraction must be in"):
        DataRecipe.from_dict({"sources": ["x.jsonl"], "replay_sources": ["y.jsonl"], "replay_fraction": 1.0})
    with pytest.raises(DataError, match="only the sft and cpt tasks"):
        DataRecipe.from_dict({"task": "dpo", "sources": ["x.jsonl"], "replay_sources": ["y.jsonl"]})


def test_segments_train_exactly_the_labelled_spans(tokenizer, tmp_path):
    """axolotl's template-free input_output records: the texts as they are, each tokenized alone, loss on the
    segments labelled true (and on the eos when the last one is), for sft and for cpt (packed, samples apart)."""
    segments = [
        {"text": "12 + 7 = ", "label": False},
        {"text": "19", "label": True},
        {"text": "\n3 + 4 = ", "label": False},
        {"text": "7", "label": True},
    ]
    path = tmp_path / "segments.jsonl"
    path.write_text(json.dumps({"segments": segments}) + "\n" + json.dumps({"segments": segments[:3]}) + "\n")
    want_ids = [tokenizer.bos_token_id]
    want_labels = [-100]
    for segment in segments:
        ids = tokenizer.encode(segment["text"], add_special_tokens=False)
        want_ids += ids
        want_labels += ids if segment["label"] else [-100] * len(ids)
    for task in ("sft", "cpt"):
        splits, report = build_datasets(
            DataRecipe(task=task, sources=[SourceSpec(str(path))], max_length=64), tokenizer
        )
        row = splits["train"][0]
        n = len(want_ids) + 1
        assert row["input_ids"][:n] == want_ids + [tokenizer.eos_token_id], task
        assert row["labels"][:n] == want_labels + [tokenizer.eos_token_id], task
        # the second record ends on an unlabelled segment: its eos is not trained
        start = n
        m = len(tokenizer.encode("".join(s["text"] for s in segments[:3]), add_special_tokens=False)) + 2
        assert row["labels"][start + m - 1] == -100
        assert report.examples["train"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"segments": [{"text": "x", "label": False}]})
        + "\n"
        + json.dumps({"segments": [{"text": "x", "label": "yes"}]})
        + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'segments': no segment with label true"):
        build_datasets(DataRecipe(task="sft", sources=[SourceSpec(str(bad))]), tokenizer)
    one = tmp_path / "one.jsonl"
    one.write_text(bad.read_text().splitlines()[1] + "\n")
    with pytest.raises(DataError, match=r"one.jsonl:1: field 'segments\[0\].label': label must be true or false"):
        build_datasets(DataRecipe(task="sft", sources=[SourceSpec(str(one))]), tokenizer)
