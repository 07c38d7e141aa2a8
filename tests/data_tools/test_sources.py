"""Users' own data from the tools they migrate from: LLaMA-Factory's dataset_info.json, trl's dataset types, Hub
schemas and OpenAI fine-tuning files (fixtures/ holds records in their exact schemas; fixtures/README.md says where
each came from and what its tool makes of it). Token ids are checked against the official chat template's string
(conversational data) or against trl's tokenization of the raw strings (standard data)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from data_tools.cli import main as cli_main
from data_tools.errors import DataError
from data_tools.formats import TASK_KINDS
from data_tools.pipeline import DataRecipe, build_datasets
from data_tools.sources import SourceSpec, load_source
from data_tools.validate import DataReport, drop_bad_records

FIXTURES = Path(__file__).with_name("fixtures")
LF = FIXTURES / "llamafactory"
ROOT = Path(__file__).resolve().parents[2]


def rows(spec, task: str) -> list[dict]:
    """Canonical rows of one source, bad ones raised."""
    ds = load_source(SourceSpec.from_value(spec), TASK_KINDS[task])
    return list(drop_bad_records(ds, DataReport(), skip_invalid=False))


def roles(messages) -> list[str]:
    return [m["role"] for m in messages]


def lf(name: str) -> dict:
    return {"dataset_info": str(LF), "name": name}


@pytest.fixture(scope="module")
def official(tokenizer):
    template = _compile_jinja_template(tokenizer.chat_template)

    def render(messages, add_generation_prompt=False):
        messages = [{k: v for k, v in m.items() if k != "train"} for m in messages]
        return template.render(
            messages=messages, bos_token=tokenizer.bos_token, add_generation_prompt=add_generation_prompt
        )

    return render


def sft_examples(spec, tokenizer, **recipe) -> list[dict]:
    recipe = DataRecipe(sources=[SourceSpec.from_value(spec)], pack=False, dedup=False, max_length=4096, **recipe)
    splits, _ = build_datasets(recipe, tokenizer)
    return list(splits["train"])


# --- LLaMA-Factory -------------------------------------------------------------------------------------------------


def test_llamafactory_alpaca_joins_instruction_and_input_with_one_newline():
    examples = rows(lf("alpaca_en_demo"), "sft")
    assert len(examples) == 3 and all(roles(e["messages"]) == ["user", "assistant"] for e in examples)
    record = json.loads((LF / "alpaca_en_demo.json").read_text())[2]
    assert examples[2]["messages"][0]["content"] == record["instruction"] + "\n" + record["input"]
    assert examples[2]["messages"][1]["content"] == record["output"]


def test_llamafactory_history_and_system_columns_become_turns():
    first = rows(lf("alpaca_history_demo"), "sft")[0]["messages"]
    record = json.loads((LF / "alpaca_history_demo.json").read_text())[0]
    assert roles(first) == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert first[0]["content"] == record["system"]
    assert [m["content"] for m in first[1:5]] == [text for pair in record["history"] for text in pair]
    assert first[-1]["content"] == record["output"]


def test_llamafactory_sharegpt_tools_function_calls_and_observations(tokenizer, official):
    examples = rows(lf("glaive_toolcall_en_demo"), "sft")
    record = json.loads((LF / "glaive_toolcall_en_demo.json").read_text())[0]
    messages = examples[0]["messages"]
    turns = record["conversations"]
    assert roles(messages) == [
        "system",
        *(
            {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}[t["from"]]
            for t in turns
        ),
    ]
    assert json.loads(messages[0]["content"].splitlines()[1]) == json.loads(record["tools"])[0]
    at = [t["from"] for t in turns].index("function_call") + 1  # + the system turn
    call = json.loads(turns[at - 1]["value"])
    assert messages[at]["content"] is None and messages[at]["tool_calls"][0]["function"]["name"] == call["name"]
    assert json.loads(messages[at]["tool_calls"][0]["function"]["arguments"]) == call["arguments"]
    assert messages[at + 1]["content"] == turns[at]["value"]
    assert roles(examples[1]["messages"])[0] == "user"  # "tools": "[]" is no tools, not an empty system text
    # The ids are the official template's string, tokenized.
    expected = tokenizer(official(messages), add_special_tokens=False)["input_ids"]
    assert expected in [e["input_ids"] for e in sft_examples(lf("glaive_toolcall_en_demo"), tokenizer)]


def test_llamafactory_ranking_and_kto():
    pairs = rows(lf("dpo_en_demo"), "dpo")
    assert len(pairs) == 2 and roles(pairs[1]["prompt"]) == ["system", "user"]
    record = json.loads((LF / "dpo_en_demo.json").read_text())[0]
    assert pairs[0]["chosen"][0]["content"] == record["chosen"]["value"]
    assert pairs[0]["rejected"][0]["content"] == record["rejected"]["value"]
    ranked = rows(lf("alpaca_ranking_demo"), "dpo")[0]
    source = json.loads((LF / "alpaca_ranking_demo.json").read_text())[0]
    assert ranked["prompt"][0]["content"] == source["instruction"] + "\n" + source["input"]
    assert ranked["chosen"][0]["content"] == source["chosen"]
    kto = rows(lf("kto_en_demo"), "kto")
    assert [e["label"] for e in kto] == [r["label"] for r in json.loads((LF / "kto_en_demo.json").read_text())]
    assert all(roles(e["completion"]) == ["assistant"] for e in kto)


def test_llamafactory_text_images_and_bad_names():
    documents = rows(lf("wiki_demo"), "cpt")
    assert [d["text"] for d in documents] == (LF / "wiki_demo.txt").read_text().splitlines()  # one per line
    with pytest.raises(DataError, match=r"mllm_demo.json:1: field 'images': .*reads text only"):
        rows(lf("mllm_demo"), "sft")
    with pytest.raises(DataError, match="pick a dataset with name: one of alpaca_en_demo"):
        rows(str(LF), "sft")
    with pytest.raises(DataError, match="no dataset 'alpaca_demo' \\(did you mean 'alpaca_en_demo'\\?\\)"):
        rows(lf("alpaca_demo"), "sft")
    assert rows({"path": str(LF / "dataset_info.json"), "name": "openai_style_demo"}, "sft")[0]["messages"][0] == {
        "role": "system",
        "content": "You are a helpful assistant.",
        "tool_calls": None,
        "train": None,
    }


def test_llamafactory_columns_replace_the_defaults_and_unmapped_fields_are_reported(tmp_path, tokenizer):
    # As LLaMA-Factory's parser does: an entry that lists columns sets the unlisted ones to None, so `input` and
    # `history` below are not read; the report says so instead of dropping them in silence.
    (tmp_path / "data.json").write_text(
        json.dumps([{"instruction": "q", "input": "ctx", "output": "a", "history": []}])
    )
    entry = {"mine": {"file_name": "data.json", "columns": {"prompt": "instruction", "response": "output"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(entry))
    recipe = DataRecipe(sources=[SourceSpec.from_value({"dataset_info": str(tmp_path), "name": "mine"})], pack=False)
    splits, report = build_datasets(recipe, tokenizer)
    assert report.ignored_by_file() == {str(tmp_path / "data.json"): {"input": 1}}
    assert "fields not used (records): input (1)" in report.format()
    assert tokenizer.decode(splits["train"][0]["input_ids"]).count("ctx") == 0


# --- trl's dataset types ---------------------------------------------------------------------------------------------


def trl_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "trl" / f"{name}.jsonl").read_text().splitlines()]


def test_trl_standard_language_modelling_and_prompt_completion_are_raw_text(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for example, record in zip(
        sft_examples(str(FIXTURES / "trl/language_modeling_standard.jsonl"), tokenizer),
        trl_rows("language_modeling_standard"),
    ):
        assert example["input_ids"] == [bos, *encode(record["text"]), eos]
        assert example["labels"] == [-100, *encode(record["text"]), eos]
    for example, record in zip(
        sft_examples(str(FIXTURES / "trl/prompt_completion_standard.jsonl"), tokenizer),
        trl_rows("prompt_completion_standard"),
    ):
        # trl: tokenize prompt and prompt + completion + eos; the loss starts where they first differ.
        full = [bos, *encode(record["prompt"] + record["completion"]), eos]
        prompt = [bos, *encode(record["prompt"])]
        cut = next(i for i, (a, b) in enumerate(zip(prompt + [None], full)) if a != b)
        assert example["input_ids"] == full and example["labels"] == [-100] * cut + full[cut:]
    # as_chat puts the same records in the chat template instead.
    chat = sft_examples({"path": str(FIXTURES / "trl/prompt_completion_standard.jsonl"), "as_chat": True}, tokenizer)
    assert tokenizer.decode(chat[0]["input_ids"]).startswith(
        "<｜begin▁of▁sentence｜><｜User｜>The sky is<｜Assistant｜>"
    )


@pytest.mark.parametrize("name", ["language_modeling_conversational", "prompt_completion_conversational"])
def test_trl_conversational_types_get_the_official_template(name, tokenizer, official):
    for example, record in zip(sft_examples(str(FIXTURES / f"trl/{name}.jsonl"), tokenizer), trl_rows(name)):
        messages = record.get("messages") or record["prompt"] + record["completion"]
        assert example["input_ids"] == tokenizer(official(messages), add_special_tokens=False)["input_ids"]


def test_trl_preference_types(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def pairs(name):
        splits, _ = build_datasets(
            DataRecipe(task="dpo", sources=[SourceSpec(str(FIXTURES / f"trl/{name}.jsonl"))], dedup=False), tokenizer
        )
        return list(splits["train"])

    for name in ("preference_standard", "preference_implicit_standard"):
        for pair, record in zip(pairs(name), trl_rows(name)):
            prompt = record.get("prompt", "")
            if not prompt:  # trl's extract_prompt: the longest common prefix, less a space before the split
                n = next(i for i, (a, b) in enumerate(zip(record["chosen"], record["rejected"])) if a != b)
                n -= record["chosen"][n - 1] == " "
                prompt = record["chosen"][:n]
                record = {"chosen": record["chosen"][n:], "rejected": record["rejected"][n:]}
            chosen = [bos, *encode(prompt + record["chosen"]), eos]
            assert pair["prompt_ids"] + pair["chosen_ids"] == chosen
            assert pair["prompt_ids"] + pair["rejected_ids"] == [bos, *encode(prompt + record["rejected"]), eos]
    explicit, implicit = pairs("preference_conversational"), pairs("preference_implicit_conversational")
    assert explicit == implicit and tokenizer.decode(explicit[0]["chosen_ids"]) == "It is blue.<｜end▁of▁sentence｜>"


def test_trl_unpaired_and_preference_data_feed_kto(tokenizer):
    def kto(spec):
        splits, _ = build_datasets(
            DataRecipe(task="kto", sources=[SourceSpec.from_value(spec)], dedup=False), tokenizer
        )
        return list(splits["train"])

    assert [r["label"] for r in kto(str(FIXTURES / "trl/unpaired_preference_standard.jsonl"))] == [True, False]
    assert len(kto(str(FIXTURES / "trl/unpaired_preference_conversational.jsonl"))) == 2
    # Preference pairs are unpaired (as trl's unpair_preference_dataset): one true and one false row per pair.
    unpaired = kto(str(FIXTURES / "trl/preference_conversational.jsonl"))
    assert sorted(r["label"] for r in unpaired) == [False, False, True, True]


def test_mixing_standard_and_conversational_sources_is_one_sentence(tokenizer):
    recipe = DataRecipe(
        sources=[
            SourceSpec(str(FIXTURES / "trl/prompt_completion_standard.jsonl")),
            SourceSpec(str(FIXTURES / "trl/language_modeling_conversational.jsonl")),
        ]
    )
    with pytest.raises(DataError, match="the sources mix plain-text prompt/completion records .* with conversations"):
        build_datasets(recipe, tokenizer)


# --- Hub schemas and OpenAI files ------------------------------------------------------------------------------------


def test_hub_schemas():
    hub = FIXTURES / "hub"
    feedback = rows(str(hub / "ultrafeedback_binarized.jsonl"), "dpo")
    record = json.loads((hub / "ultrafeedback_binarized.jsonl").read_text().splitlines()[0])
    assert feedback[0]["prompt"][0]["content"] == record["prompt"] and roles(feedback[0]["chosen"]) == ["assistant"]
    assert feedback[0]["chosen"][0]["content"] == record["chosen"][-1]["content"]
    hh = rows(str(hub / "hh_rlhf.jsonl"), "dpo")
    assert hh[0]["prompt"].startswith("\n\nHuman: ") and hh[0]["prompt"].endswith("\n\nAssistant:")
    assert rows(str(hub / "ultrachat_200k.jsonl"), "sft")[0]["messages"][0]["role"] == "user"
    hermes = rows(str(hub / "openhermes_2_5.jsonl"), "sft")
    assert roles(hermes[1]["messages"]) == ["system", "user", "assistant"]
    with pytest.raises(DataError, match="flat message rows of a conversation tree"):
        rows(str(hub / "oasst1.jsonl"), "cpt")
    with pytest.raises(DataError, match=r"map it with columns: \{messages: conversation\}"):
        rows(str(hub / "capybara.jsonl"), "sft")


def test_openai_weight_zero_turns_are_context_and_a_tool_call_can_be_the_target(tokenizer, official):
    openai = FIXTURES / "openai"
    examples = sft_examples(str(openai / "chat_weight.jsonl"), tokenizer)
    [example] = [e for e in examples if "France" in tokenizer.decode(e["input_ids"])]
    trained = tokenizer.decode([t for t in example["labels"] if t != -100])
    record = json.loads((openai / "chat_weight.jsonl").read_text().splitlines()[0])
    weights = [(m["content"], m["weight"]) for m in record["messages"] if m["role"] == "assistant"]
    assert [w for _, w in weights] == [0, 1]
    assert trained == weights[1][0] + "<｜end▁of▁sentence｜>"  # the weight-0 answer is context only
    calls = rows(str(openai / "tool_calling.jsonl"), "sft")
    assert roles(calls[0]["messages"]) == ["system", "user", "assistant"]  # tools, question, the call to learn
    assert calls[0]["messages"][-1]["tool_calls"][0]["function"]["name"] == "get_current_weather"


def test_hub_source_through_load_dataset_on_a_local_repo_layout(tmp_path):
    # The same code path as a Hub repo of parquet files (datasets.load_dataset), offline on a local folder.
    (tmp_path / "data").mkdir()
    records = [json.loads(line) for line in (FIXTURES / "hub/ultrachat_200k.jsonl").read_text().splitlines()]
    pd.DataFrame(records).to_parquet(tmp_path / "data" / "train_sft-00000-of-00001.parquet")
    examples = rows({"hub": str(tmp_path), "split": "train_sft"}, "sft")
    assert [e["messages"][0]["content"] for e in examples] == [r["messages"][0]["content"] for r in records]
    with pytest.raises(DataError, match="no split 'train'; it has \\['train_sft'\\]"):
        rows({"hub": str(tmp_path)}, "sft")


# --- Nothing lost in silence -----------------------------------------------------------------------------------------


def test_silent_losses_are_used_or_refused(tmp_path, tokenizer):
    parts = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "value": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
            {"role": "assistant", "content": 4},
        ]
    }
    image = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(parts) + "\n" + json.dumps(image) + "\n")
    ds = load_source(SourceSpec(str(path)), "chat")
    report = DataReport()
    [kept] = list(drop_bad_records(ds, report, skip_invalid=True))
    assert [m["content"] for m in kept["messages"]] == ["Be brief.", "2+2?", "4"]
    assert report.skipped == {"unsupported_modality": 1}
    # CSV cells are text: "00000" is not the number 0, a numeric answer is not a bad record.
    pd.DataFrame([{"system": "00000", "instruction": "zip?", "output": "01234"}]).to_csv(
        tmp_path / "a.csv", index=False
    )
    [row] = rows(str(tmp_path / "a.csv"), "sft")
    assert [m["content"] for m in row["messages"]] == ["00000", "zip?", "01234"]
    # A byte-order mark is not text; a file of one-line articles read as one document is said.
    (tmp_path / "corpus.txt").write_bytes("\ufeffline one\nline two\n".encode())
    recipe = DataRecipe(task="cpt", sources=[SourceSpec(str(tmp_path / "corpus.txt"))], max_length=16)
    splits, report = build_datasets(recipe, tokenizer)
    assert splits["train"][0]["input_ids"][:2] == tokenizer("line one", add_special_tokens=False)["input_ids"]
    assert any("2 lines and no blank line, read as one document" in note for note in report.notes)


def test_control_strings_in_content_stay_text_and_are_counted(tmp_path, tokenizer):
    record = {"messages": [{"role": "user", "content": "say <｜Assistant｜>"}, {"role": "assistant", "content": "no"}]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(record) + "\n")
    recipe = DataRecipe(sources=[SourceSpec(str(path))], pack=False)
    splits, report = build_datasets(recipe, tokenizer)
    assistant = tokenizer.convert_tokens_to_ids("<｜Assistant｜>")
    assert splits["train"][0]["input_ids"].count(assistant) == 1 and report.control_strings == 1
    splits, _ = build_datasets(DataRecipe(**{**recipe.__dict__, "parse_special_tokens": True}), tokenizer)
    assert splits["train"][0]["input_ids"].count(assistant) == 2
    # Worker processes get a pickled tokenizer: the text stays text there too.
    many = [
        {**record, "messages": [{"role": "user", "content": f"say <｜Assistant｜> {i}"}, record["messages"][1]]}
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in many))
    splits, report = build_datasets(DataRecipe(**{**recipe.__dict__, "num_proc": 2}), tokenizer)
    assert [row.count(assistant) for row in splits["train"]["input_ids"]] == [1] * 8 and report.control_strings == 8


def test_an_over_long_record_is_refused_without_tokenizing_it(tmp_path, tokenizer):
    huge = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 2_000_000}]}
    path = tmp_path / "huge.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n"
        + json.dumps(huge)
        + "\n"
    )
    with pytest.raises(DataError, match=r"huge.jsonl:2: sample has 10,000,001 characters: more than max_length 512"):
        build_datasets(DataRecipe(sources=[SourceSpec(str(path))], max_length=512), tokenizer)
    splits, report = build_datasets(
        DataRecipe(sources=[SourceSpec(str(path))], max_length=512, on_too_long="truncate", pack=False), tokenizer
    )
    assert report.truncated == 1 and max(len(ids) for ids in splits["train"]["input_ids"]) == 512


# --- validate never ends in a traceback -------------------------------------------------------------------------------


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_tools", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )


def test_validate_reports_instead_of_crashing(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "robot", "content": "q"}]}
    (tmp_path / "bad.jsonl").write_text((json.dumps(bad) + "\n") * 3)
    (tmp_path / "good.jsonl").write_text(json.dumps(good) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.jsonl").write_text(json.dumps(good) + "\n")
    (folder / "empty.jsonl").write_text("")
    recipes = {
        "mixture": {"sources": [str(tmp_path / "good.jsonl"), str(tmp_path / "bad.jsonl")]},
        "eval_all": {"sources": [str(tmp_path / "good.jsonl")], "eval_fraction": 1.0},
        "train_on": {"sources": [str(tmp_path / "good.jsonl")], "train_on": "first"},
    }
    for name, recipe in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(json.dumps(recipe))
    cases = [
        ([str(tmp_path / "bad.jsonl")], 1, "error: 3 bad records"),
        ([str(tmp_path / "bad.jsonl"), "--skip-invalid"], 1, "unknown role 'robot'"),
        ([str(folder)], 0, "empty.jsonl: empty file (0 bytes), skipped"),
        ([str(tmp_path / "mixture.yaml")], 1, "error: 3 bad records"),
        ([str(tmp_path / "eval_all.yaml")], 1, "eval_fraction must be in [0, 1)"),
        ([str(tmp_path / "train_on.yaml")], 1, "train_on must be 'all'"),
    ]
    for args, code, message in cases:
        result = run_cli("validate", *args)
        out = result.stdout + result.stderr
        assert result.returncode == code and message in out and "Traceback" not in out, (args, out[-2000:])
    with pytest.raises(DataError, match="no train examples left: 3 records read, skipped \\{'unknown_role': 3\\}"):
        cli_prepare = DataRecipe(sources=[SourceSpec(str(tmp_path / "bad.jsonl"))], skip_invalid=True)
        build_datasets(cli_prepare)
    assert cli_main(["validate", str(tmp_path / "good.jsonl")]) == 0


def test_an_over_long_preference_pair_is_truncated_when_asked(tmp_path, tokenizer):
    long = "word " * 100_000
    for name, record in {
        "standard": {"prompt": "q", "chosen": long, "rejected": "no"},
        "conversational": {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": long}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
    }.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        recipe = DataRecipe(task="dpo", sources=[SourceSpec(str(path))], max_length=128, on_too_long="truncate")
        splits, report = build_datasets(recipe, tokenizer)
        [pair] = list(splits["train"])
        assert report.truncated == 1 and len(pair["prompt_ids"]) + len(pair["chosen_ids"]) == 128, name
