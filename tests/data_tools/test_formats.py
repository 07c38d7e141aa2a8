import json

import datasets
import pandas as pd
import pytest

from data_tools.errors import DataError
from data_tools.formats import TASK_KINDS, FormatOptions, detect_format, resolve_kind, to_canonical
from data_tools.pipeline import DataRecipe, build_datasets
from data_tools.sources import SourceSpec, load_source
from data_tools.validate import DataReport, drop_bad_records

CANONICAL = {
    "messages": [
        {"role": "system", "content": "Be brief.", "tool_calls": None, "train": None},
        {"role": "user", "content": "What is 2 + 3?", "tool_calls": None, "train": None},
        {"role": "assistant", "content": "5", "tool_calls": None, "train": None},
    ]
}
RECORDS = {
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"},
        ]
    },
    "sharegpt": {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "5"}],
    },
    "alpaca": {"system": "Be brief.", "instruction": "What is 2 + 3?", "input": "", "output": "5"},
    "prompt_completion": {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
        "completion": [{"role": "assistant", "content": "5"}],
    },
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_every_chat_format_gives_the_same_canonical_example(fmt):
    record = RECORDS[fmt]
    assert detect_format(record) == fmt
    assert to_canonical(record, fmt) == CANONICAL


def test_preference_forms_agree():
    expected = {
        "prompt": [{"role": "user", "content": "2+2?", "tool_calls": None, "train": None}],
        "chosen": [{"role": "assistant", "content": "4", "tool_calls": None, "train": None}],
        "rejected": [{"role": "assistant", "content": "5", "tool_calls": None, "train": None}],
    }
    strings = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    lists = {k: v for k, v in expected.items()}
    implicit = {
        "chosen": expected["prompt"] + expected["chosen"],
        "rejected": expected["prompt"] + expected["rejected"],
    }
    for record in (lists, implicit):
        assert detect_format(record) == "preference"
        assert resolve_kind("preference", record, TASK_KINDS["dpo"], FormatOptions()) == "preference"
        assert to_canonical(record, "preference") == expected
    # Plain strings are trl's standard type (raw text), unless the source asks for the chat template.
    assert resolve_kind("preference", strings, TASK_KINDS["dpo"], FormatOptions()) == "text_preference"
    assert to_canonical(strings, "preference", "text_preference") == strings
    assert resolve_kind("preference", strings, TASK_KINDS["dpo"], FormatOptions(as_chat=True)) == "preference"
    assert to_canonical(strings, "preference", "preference", FormatOptions(as_chat=True)) == expected


def test_kto_and_text_and_tool_calls():
    kto = to_canonical({"prompt": "q", "completion": "a", "label": 1}, "kto", "kto", FormatOptions(as_chat=True))
    assert kto["label"] is True and kto["completion"][0]["role"] == "assistant"
    assert to_canonical({"prompt": "q", "completion": "a", "label": 0}, "kto", "text_kto") == {
        "prompt": "q",
        "completion": "a",
        "label": False,
    }
    assert to_canonical({"text": "raw"}, detect_format({"text": "raw"})) == {"text": "raw"}
    record = {
        "messages": [
            {"role": "user", "content": "w"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
            },
            {"role": "tool", "content": "r"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    message = to_canonical(record, "messages")["messages"][1]
    assert message["content"] is None and message["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
BAD_RECORDS = {
    "invalid_json": ('{"messages": [', "invalid JSON", None),
    "missing_field": (json.dumps({"messages": None}), "missing field", "messages"),
    "unknown_role": (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role", "messages[0]"),
    "empty_conversation": (json.dumps({"messages": []}), "empty conversation", "messages"),
    "non_alternating": (
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}),
        "expected assistant",
        "messages[1]",
    ),
    "invalid_utf8": (b'{"messages": "\xff\xfe"}', "invalid UTF-8", None),
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_bad_record_is_one_error_with_file_and_line(tmp_path, reason):
    line, message, field = BAD_RECORDS[reason]
    path = write_lines(tmp_path / "data.jsonl", [GOOD, "", line, GOOD])
    ds = load_source(SourceSpec(str(path)), "chat")
    with pytest.raises(DataError) as info:
        drop_bad_records(ds, DataReport(), skip_invalid=False)
    error = info.value
    assert (error.file, error.line, error.reason, error.field) == (str(path), 3, reason, field)
    assert str(error).startswith(f"{path}:3: ") and message in str(error)
    report = DataReport()
    kept = drop_bad_records(ds, report, skip_invalid=True)
    assert len(kept) == 2 and report.skipped == {reason: 1}


def test_chosen_equals_rejected_and_too_long(tmp_path, tokenizer):
    path = write_lines(
        tmp_path / "pref.jsonl",
        [
            json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}),
            json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}),
        ],
    )
    recipe = DataRecipe(task="dpo", sources=[SourceSpec(str(path))], max_length=64)
    with pytest.raises(DataError, match=r"pref.jsonl:2: field 'rejected': chosen and rejected are identical"):
        build_datasets(recipe, tokenizer)
    splits, report = build_datasets(DataRecipe(**{**recipe.__dict__, "skip_invalid": True}), tokenizer)
    assert len(splits["train"]) == 1 and report.skipped == {"chosen_equals_rejected": 1}
    assert set(splits["train"].column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}

    long = json.dumps({"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "a"}]})
    sft = write_lines(tmp_path / "sft.jsonl", [GOOD, long])
    recipe = DataRecipe(sources=[SourceSpec(str(sft))], max_length=32)
    with pytest.raises(DataError, match=r"sft.jsonl:2: sample has \d+ tokens, more than max_length 32"):
        build_datasets(recipe, tokenizer)
    for policy, skipped, dropped, truncated in (
        ("drop", {}, {"too_long": 1}, 0),
        ("truncate", {}, {"no_target": 1}, 0),
    ):
        _, report = build_datasets(DataRecipe(**{**recipe.__dict__, "on_too_long": policy}), tokenizer)
        assert (dict(report.skipped), dict(report.dropped), report.truncated) == (skipped, dropped, truncated)
    _, report = build_datasets(DataRecipe(**{**recipe.__dict__, "skip_invalid": True}), tokenizer)
    assert report.skipped == {"too_long": 1}
    long_answer = json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "w " * 99}]}
    )
    write_lines(sft, [GOOD, long_answer])
    splits, report = build_datasets(
        DataRecipe(**{**recipe.__dict__, "on_too_long": "truncate", "pack": False}), tokenizer
    )
    assert report.truncated == 1 and max(len(ids) for ids in splits["train"]["input_ids"]) == 32


def test_readers_json_parquet_csv_folder_and_saved(tmp_path):
    records = [RECORDS["alpaca"], {**RECORDS["alpaca"], "output": "five"}]
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(folder / "b.parquet")
    pd.DataFrame(records).to_csv(folder / "c.csv", index=False)
    ds = drop_bad_records(load_source(SourceSpec(str(folder))), DataReport(), False)
    assert len(ds) == 6 and ds[0]["messages"] == CANONICAL["messages"]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    saved = load_source(SourceSpec(str(tmp_path / "saved"), split="train[1:]"))
    assert len(saved) == 1 and saved[0]["messages"][-1]["content"] == "five"
    bad_csv = tmp_path / "bad.csv"
    pd.DataFrame([{"instruction": "q", "output": None}]).to_csv(bad_csv, index=False)
    with pytest.raises(DataError, match=r"bad.csv:2: field 'output': missing field"):
        drop_bad_records(load_source(SourceSpec(str(bad_csv))), DataReport(), False)
