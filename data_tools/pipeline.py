"""Recipe -> training datasets: read, check, deduplicate, split, mix, tokenize and pack.

A data recipe is YAML (a top-level `data:` section of a training recipe works too):

    task: sft                  # sft | dpo | kto | cpt
    sources:
      - {path: data/demo/sft.jsonl, weight: 1.0}
      - {path: data/more, format: sharegpt, weight: 0.5, split: "train[:90%]"}
    eval_fraction: 0.05        # deterministic, by content hash
    max_length: 2048
"""

import difflib
import json
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
import yaml
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

from data_tools.corpus import build_corpus_blocks
from data_tools.errors import DataError, RecordError
from data_tools.formats import TASK_KINDS
from data_tools.packing import compute_fill_ratio, pack_dataset
from data_tools.sources import KIND_NAMES, SourceSpec, apply_weight, build_stream_mixture, load_source
from data_tools.template import ChatTokenizer
from data_tools.tokenizer import load_tokenizer
from data_tools.validate import (
    DataReport,
    add_hashes,
    drop_bad_records,
    read_column,
    remove_duplicates,
    split_by_hash,
)

ON_TOO_LONG = ("error", "drop", "truncate")


@dataclass
class DataRecipe:
    """Everything that decides what the training data is."""

    task: str = "sft"
    sources: list[SourceSpec] = field(default_factory=list)
    eval_sources: list[SourceSpec] = field(default_factory=list)  # used whole as eval data
    # Mixed into the train rows against forgetting: for cpt chat data, for sft plain text (text or text_completion)
    replay_sources: list[SourceSpec] = field(default_factory=list)
    replay_fraction: float = 0.0  # share of the train rows that are replay

    eval_fraction: float = 0.0
    max_length: int = 2048
    pack: bool = True  # sft: pack samples into rows of max_length
    train_on: str = "all"  # sft: "all" assistant turns or the "last"
    on_too_long: str = "error"  # "error" (or skip with skip_invalid), "drop" (counted), "truncate"
    skip_invalid: bool = False
    dedup: bool = True
    fix_tool_calls: bool = False
    parse_special_tokens: bool = False  # true: control-token strings typed inside content become control tokens
    seed: int = 0
    num_proc: int = 1
    streaming: bool = False
    tokenizer: str | None = None  # a tokenizer folder; default: the packaged DeepSeek-V3 tokenizer

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataRecipe":
        """A recipe from a mapping (a `data:` section is unwrapped); unknown keys are an error."""
        values = dict(values.get("data", values))
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(values) - set(known))
        if unknown:
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)"
                if (close := difflib.get_close_matches(key, known, n=1))
                else repr(key)
                for key in unknown
            ]
            raise DataError(f"unknown recipe keys {', '.join(hints)}; known: {', '.join(known)}")
        for key in ("sources", "eval_sources", "replay_sources"):
            values[key] = [SourceSpec.from_value(v) for v in values.get(key) or []]
        recipe = cls(**values)
        if recipe.task not in TASK_KINDS:
            raise DataError(f"unknown task {recipe.task!r}; known: {sorted(TASK_KINDS)}")
        if recipe.replay_sources and recipe.task not in ("sft", "cpt"):
            raise DataError(f"replay_sources: only the sft and cpt tasks mix in replay, not {recipe.task!r}")
        if not 0.0 <= recipe.replay_fraction < 1.0:
            raise DataError(f"replay_fraction must be in [0, 1), got {recipe.replay_fraction}")
        if recipe.on_too_long not in ON_TOO_LONG:
            raise DataError(f"on_too_long must be one of {ON_TOO_LONG}, got {recipe.on_too_long!r}")
        if recipe.train_on not in ("all", "last"):
            raise DataError(f"train_on must be 'all' (every assistant turn) or 'last', got {recipe.train_on!r}")
        if not 0.0 <= recipe.eval_fraction < 1.0:
            raise DataError(f"eval_fraction must be in [0, 1) (1 leaves nothing to train), got {recipe.eval_fraction}")
        if not isinstance(recipe.max_length, int) or recipe.max_length < 2:
            raise DataError(f"max_length must be an integer of at least 2, got {recipe.max_length!r}")
        if not recipe.sources:
            raise DataError("the recipe has no sources")
        return recipe


def load_recipe(path: str | Path) -> DataRecipe:
    """Read a data recipe YAML."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    try:
        return DataRecipe.from_dict(values)
    except DataError as e:
        raise DataError(str(e), str(path)) from None


def error_columns(errors: list[RecordError | None]) -> dict[str, list]:
    """The `_error`, `_field`, `_reason` columns of a batch."""
    return {
        "_error": [str(e) if e else None for e in errors],
        "_field": [e.field if e else None for e in errors],
        "_reason": [e.reason if e else None for e in errors],
    }


def too_long_error(length: int, max_length: int) -> RecordError:
    """The error for a sample that does not fit."""
    return RecordError("too_long", f"sample has {length} tokens, more than max_length {max_length}")


def surely_too_long(chars: int, chat: ChatTokenizer, max_length: int) -> RecordError | None:
    """The too-long error for a sample whose text alone proves it longer than max_length, before tokenizing it
    (a 50 MB record is refused without tokenizing 50 MB)."""
    if chars <= char_budget(chat, max_length):
        return None
    return RecordError(
        "too_long", f"sample has {chars:,} characters: more than max_length {max_length} tokens whatever it says"
    )


def char_budget(chat: ChatTokenizer, max_length: int) -> int:
    """Characters that surely hold more than max_length tokens: truncating text there keeps the first max_length."""
    return chat.max_token_chars * (max_length + 64)


def cut_segments(segments: list, budget: int) -> list:
    """Segments with the text after the first `budget` characters left out (for truncation)."""
    out, used = [], 0
    for segment in segments:
        if used >= budget:
            break
        if not segment.special:
            segment = segment._replace(text=segment.text[: budget - used])
            used += len(segment.text)
        out.append(segment)
    return out


def message_texts(messages: list[dict[str, Any]]) -> list[str]:
    """The text a list of canonical messages holds."""
    texts = []
    for m in messages:
        texts.append(m.get("content") or "")
        texts += [c["function"]["name"] + c["function"]["arguments"] for c in m.get("tool_calls") or []]
    return texts


def tokenize_sft_batch(
    batch: dict[str, list], chat: ChatTokenizer, max_length: int, train_on: str, on_too_long: str
) -> dict[str, list]:
    """Batched map function: canonical chats -> input_ids, labels (with error rows for what cannot be used)."""
    errors: list[RecordError | None] = [None] * len(batch["messages"])
    control = []
    segments = []
    for i, messages in enumerate(batch["messages"]):
        texts = message_texts(messages)
        control.append(any(chat.has_control(t) for t in texts))
        try:
            row = chat.segments(messages, train_on=train_on)
        except RecordError as e:
            errors[i] = e
            row = []
        chars = sum(len(t) for t in texts)
        if errors[i] is None and (error := surely_too_long(chars, chat, max_length)) is not None:
            if on_too_long == "truncate":
                row = cut_segments(row, char_budget(chat, max_length))
            else:
                errors[i], row = error, []
        segments.append(row)
    out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": [], "_control": control}
    for i, (ids, trained) in enumerate(chat.encode_segments(segments)):
        truncated = False
        if errors[i] is None and len(ids) > max_length:
            if on_too_long == "truncate":
                ids, trained, truncated = ids[:max_length], trained[:max_length], True
                if not any(trained[1:]):
                    errors[i] = RecordError("no_target", "nothing left to train after truncation")
            else:
                errors[i] = too_long_error(len(ids), max_length)
        if errors[i] is None and not any(trained[1:]):
            errors[i] = RecordError("no_target", "no assistant turn to train (every answer has weight 0)")
        labels = [t if flag else -100 for t, flag in zip(ids, trained)]
        if labels:
            labels[0] = -100
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_truncated"].append(truncated)
    return {**out, **error_columns(errors)}


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share (trl's common_prefix_length)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_standard(chat: ChatTokenizer, prompts: list[str], completions: list[list[str]]) -> list[list[list[int]]]:
    """trl's tokenization of standard (plain-text) records: bos + prompt, and bos + prompt + completion + eos for
    each completion, the prompt ending where they first differ (tokens may merge across the boundary)."""
    n = len(completions[0]) if completions else 0
    texts = [p for p in prompts] + [p + c for p, cs in zip(prompts, completions) for c in cs]
    encoded = chat.encode_texts(texts)
    prompt_ids = [[chat.bos_id, *ids] for ids in encoded[: len(prompts)]]
    full = [[chat.bos_id, *ids, chat.eos_id] for ids in encoded[len(prompts) :]]
    rows = []
    for i, prompt in enumerate(prompt_ids):
        answers = full[i * n : (i + 1) * n]
        cut = min(common_prefix_length(prompt, a) for a in answers)
        rows.append([prompt[:cut], *(a[cut:] for a in answers)])
    return rows


def standard_too_long(batch: dict[str, list], fields: list[str], chat: ChatTokenizer, max_length: int) -> list:
    """Per row: the too-long error its characters alone prove, else None."""
    rows = zip(*(batch[f] for f in fields))
    return [surely_too_long(sum(len(v) for v in values), chat, max_length) for values in rows]


def fit_labelled(
    ids: list[int], labels: list[int], max_length: int, on_too_long: str
) -> tuple[list[int], list[int], bool, RecordError | None]:
    """A tokenized sample within max_length: as it is, cut (truncate; an error when nothing trained is left), or the
    too-long error. Returns ids, labels, whether it was cut, and the error."""
    if len(ids) <= max_length:
        return ids, labels, False, None
    if on_too_long != "truncate":
        return ids, labels, False, too_long_error(len(ids), max_length)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == -100 for label in labels):
        return ids, labels, True, RecordError("no_target", "nothing left to train after truncation")
    return ids, labels, True, None


def tokenize_text_completion_batch(
    batch: dict[str, list], chat: ChatTokenizer, max_length: int, on_too_long: str
) -> dict[str, list]:
    """Batched map function: plain-text prompt/completion (trl's standard type; a document is a completion with an
    empty prompt) -> bos + prompt + completion + eos, labels on the completion and eos; no chat template."""
    prompts, completions = list(batch["prompt"]), list(batch["completion"])
    errors: list[RecordError | None] = standard_too_long(batch, ["prompt", "completion"], chat, max_length)
    budget = char_budget(chat, max_length)
    for i, error in enumerate(errors):
        if error is not None and on_too_long == "truncate":
            prompts[i], completions[i] = prompts[i][:budget], completions[i][: max(0, budget - len(prompts[i]))]
            errors[i] = None
        elif error is not None:
            prompts[i], completions[i] = "", ""
    control = [chat.has_control(p) or chat.has_control(c) for p, c in zip(batch["prompt"], batch["completion"])]
    out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": [], "_control": control}
    for i, (prompt, ids) in enumerate(encode_standard(chat, prompts, [[c] for c in completions])):
        ids = prompt + ids
        labels = [-100] * len(prompt) + ids[len(prompt) :]
        truncated = False
        if errors[i] is None:
            ids, labels, truncated, errors[i] = fit_labelled(ids, labels, max_length, on_too_long)
        if labels:
            labels[0] = -100
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_truncated"].append(truncated)
    return {**out, **error_columns(errors)}


def tokenize_segments_batch(
    batch: dict[str, list], chat: ChatTokenizer, max_length: int, on_too_long: str
) -> dict[str, list]:
    """Batched map function: axolotl-style segments -> bos + each segment's tokens + eos, labels on the segments
    labelled true (and on the eos when the last one is). Each segment is tokenized alone, so a boundary is where the
    record puts it; no chat template."""
    rows = list(batch["segments"])
    errors: list[RecordError | None] = [
        None if on_too_long == "truncate" else surely_too_long(sum(len(s["text"]) for s in seg), chat, max_length)
        for seg in rows
    ]
    control = [any(chat.has_control(s["text"]) for s in segments) for segments in rows]
    texts = [s["text"] for i, segments in enumerate(rows) if errors[i] is None for s in segments]
    encoded = iter(chat.encode_texts(texts)) if texts else iter(())
    out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": [], "_control": control}
    for i, segments in enumerate(rows):
        ids, labels = [chat.bos_id], [-100]
        if errors[i] is None:
            for segment in segments:
                tokens = next(encoded)
                ids += tokens
                labels += tokens if segment["label"] else [-100] * len(tokens)
            ids.append(chat.eos_id)
            labels.append(chat.eos_id if segments[-1]["label"] else -100)
        truncated = False
        if errors[i] is None:
            ids, labels, truncated, errors[i] = fit_labelled(ids, labels, max_length, on_too_long)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_truncated"].append(truncated)
    return {**out, **error_columns(errors)}


def fit_completions(
    prompt_ids: list[int], answers: list[list[int]], max_length: int, on_too_long: str
) -> tuple[list[list[int]], bool, RecordError | None]:
    """Completions cut to fit max_length after the prompt (truncate), or the too-long error."""
    length = len(prompt_ids) + max(len(a) for a in answers)
    if length <= max_length:
        return answers, False, None
    room = max_length - len(prompt_ids)
    if on_too_long != "truncate":
        return answers, False, too_long_error(length, max_length)
    if room <= 0:
        return answers, False, RecordError("no_target", "the prompt alone fills max_length")
    return [a[:room] for a in answers], True, None


def conversational_pairs(batch: dict[str, list], chat: ChatTokenizer, answers: list[str]) -> list[list[list[int]]]:
    """[prompt_ids, *answer_ids] per row of conversational prompt / answer messages."""
    columns = [chat.tokenize_completions(batch["prompt"], batch[a]) for a in answers]
    return [[pairs[0][0], *(p[1] for p in pairs)] for pairs in zip(*columns)]


def tokenize_answers(
    batch: dict[str, list], chat: ChatTokenizer, max_length: int, on_too_long: str, answers: list[str]
) -> tuple[dict[str, list], list[RecordError | None]]:
    """prompt_ids and `<answer>_ids` per row (preference: chosen and rejected; kto: completion), either kind."""
    standard = isinstance(batch["prompt"][0], str) if batch["prompt"] else False
    fields = ["prompt", *answers]
    budget = char_budget(chat, max_length)
    if standard:
        errors = standard_too_long(batch, fields, chat, max_length)
        if on_too_long == "truncate":  # cut the text where it surely holds max_length tokens; truncated below
            batch = {**batch, **{f: [v[:budget] if e else v for v, e in zip(batch[f], errors)] for f in fields}}
            errors = [None] * len(errors)
        rows_in = {f: [("" if e else v) for v, e in zip(batch[f], errors)] for f in fields}
        control = [any(chat.has_control(batch[f][i]) for f in ["prompt", *answers]) for i in range(len(errors))]
        rows = encode_standard(chat, rows_in["prompt"], [list(v) for v in zip(*(rows_in[a] for a in answers))])
    else:
        errors = []
        control = []
        batch = {f: list(batch[f]) for f in fields}
        for i, values in enumerate(zip(*(batch[f] for f in fields))):
            texts = [t for messages in values for t in message_texts(messages)]
            control.append(any(chat.has_control(t) for t in texts))
            error = surely_too_long(sum(len(t) for t in texts), chat, max_length)
            if error is not None and on_too_long == "truncate":
                for f in fields:  # each message cut where it surely holds max_length tokens; truncated below
                    batch[f][i] = [
                        {**m, "content": m["content"][:budget]} if m.get("content") else m for m in batch[f][i]
                    ]
                error = None
            errors.append(error)
        keep = [i for i, e in enumerate(errors) if e is None]
        kept = conversational_pairs({f: [batch[f][i] for i in keep] for f in ["prompt", *answers]}, chat, answers)
        rows = [[[], *([] for _ in answers)] for _ in errors]
        for i, row in zip(keep, kept):
            rows[i] = row
    out: dict[str, list] = {
        "prompt_ids": [],
        **{f"{a}_ids": [] for a in answers},
        "_truncated": [],
        "_control": control,
    }
    for i, (prompt_ids, *answer_ids) in enumerate(rows):
        truncated = False
        if errors[i] is None:
            answer_ids, truncated, errors[i] = fit_completions(prompt_ids, answer_ids, max_length, on_too_long)
        out["prompt_ids"].append(prompt_ids)
        for a, ids in zip(answers, answer_ids):
            out[f"{a}_ids"].append(ids)
        out["_truncated"].append(truncated)
    return out, errors


def tokenize_preference_batch(
    batch: dict[str, list], chat: ChatTokenizer, max_length: int, on_too_long: str
) -> dict[str, list]:
    """Batched map function: prompt/chosen/rejected -> trl's prompt_ids, chosen_ids, rejected_ids."""
    out, errors = tokenize_answers(batch, chat, max_length, on_too_long, ["chosen", "rejected"])
    return {**out, **error_columns(errors)}


def tokenize_kto_batch(
    batch: dict[str, list], chat: ChatTokenizer, max_length: int, on_too_long: str
) -> dict[str, list]:
    """Batched map function: prompt/completion/label -> trl's prompt_ids, completion_ids, label."""
    out, errors = tokenize_answers(batch, chat, max_length, on_too_long, ["completion"])
    return {**out, "label": batch["label"], **error_columns(errors)}


# canonical kind -> its tokenizing map function
TOKENIZERS = {
    "chat": tokenize_sft_batch,
    "text_completion": tokenize_text_completion_batch,
    "preference": tokenize_preference_batch,
    "text_preference": tokenize_preference_batch,
    "kto": tokenize_kto_batch,
    "text_kto": tokenize_kto_batch,
    "segments": tokenize_segments_batch,
}


def example_kind(ds: Dataset | IterableDataset) -> str:
    """The canonical kind of a dataset's rows, from its columns and their types."""
    columns = set(ds.column_names or [])
    features = ds.features or {}
    standard = "prompt" in features and getattr(features["prompt"], "dtype", None) == "string"
    if "segments" in columns:
        return "segments"
    if "messages" in columns:
        return "chat"
    if "chosen" in columns:
        return "text_preference" if standard else "preference"
    if "label" in columns:
        return "text_kto" if standard else "kto"
    if "completion" in columns:
        return "text_completion"
    return "text"


def tokenize_examples(
    ds: Dataset | IterableDataset, recipe: DataRecipe, chat: ChatTokenizer, report: DataReport, split: str
) -> Dataset | IterableDataset:
    """Canonical rows -> tokenized rows for the recipe's task (bad or too-long rows raised, skipped or dropped)."""
    kind = example_kind(ds)
    function = TOKENIZERS[kind]
    kwargs: dict[str, Any] = {"max_length": recipe.max_length, "on_too_long": recipe.on_too_long, "chat": chat}
    if kind == "chat":
        kwargs["train_on"] = recipe.train_on
    content = [c for c in (ds.column_names or []) if not c.startswith("_")]
    options: dict[str, Any] = {}
    if isinstance(ds, Dataset):
        use_proc = recipe.num_proc > 1 and len(ds) >= 2 * recipe.num_proc
        options = {
            "num_proc": recipe.num_proc if use_proc else None,
            "desc": f"Tokenizing {split}",
            "load_from_cache_file": False,  # see sources.map_options
            # Never read from the cache, so no need to hash the tokenizer (twice 8 MB) into a fingerprint.
            "new_fingerprint": uuid.uuid4().hex,
        }
    ds = ds.map(function, batched=True, fn_kwargs=kwargs, remove_columns=content, **options)
    drop = frozenset({"no_target"} | ({"too_long"} if recipe.on_too_long == "drop" else set()))
    ds = drop_bad_records(ds, report, recipe.skip_invalid, drop)
    if isinstance(ds, Dataset):
        report.truncated += sum(read_column(ds, "_truncated"))
        report.control_strings += sum(read_column(ds, "_control"))
        report.examples[split] = len(ds)
        report.lengths[split] = measure_lengths(ds)
    return ds.remove_columns(["_truncated", "_control", "_file", "_line"])


def measure_lengths(ds: Dataset) -> list[int]:
    """Token length of each tokenized example (for preference pairs the longer of the two sequences)."""
    columns = ds.column_names
    if "input_ids" in columns:
        return pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_pylist()
    if "chosen_ids" in columns:
        return [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    return [len(p) + len(c) for p, c in zip(ds["prompt_ids"], ds["completion_ids"])]


def load_sources(
    specs: list[SourceSpec], kinds: tuple[str, ...], recipe: DataRecipe, report: DataReport
) -> list[Dataset]:
    """Canonical, checked rows of each source; every source of a recipe gives the same kind of example."""
    parts = []
    for spec in specs:
        ds = load_source(spec, kinds, recipe.streaming, recipe.num_proc, report.notes)
        ds = drop_bad_records(ds, report, recipe.skip_invalid)
        if isinstance(ds, Dataset):
            report.records[spec.where] += len(ds)
        parts.append((spec, ds))
    found = {example_kind(ds): spec for spec, ds in parts}
    if len(found) > 1:
        (kind_a, spec_a), (kind_b, spec_b) = list(found.items())[:2]
        raise DataError(
            f"the sources mix {KIND_NAMES[kind_a]} ({spec_a.where}) with {KIND_NAMES[kind_b]} ({spec_b.where}); "
            "one recipe trains one kind (as_chat: true on a source puts plain strings in the chat template)"
        )
    return [ds for _, ds in parts]


def build_mixture(parts: list[Dataset], specs: list[SourceSpec], recipe: DataRecipe) -> Dataset:
    """Sources weighted and concatenated, in a seeded order."""
    weighted = [apply_weight(ds, spec.weight, recipe.seed + i) for i, (ds, spec) in enumerate(zip(parts, specs))]
    weighted = [ds.remove_columns([c for c in ("_hash",) if c in ds.column_names]) for ds in weighted]
    mixed = datasets.concatenate_datasets(weighted) if len(weighted) > 1 else weighted[0]
    # No flatten_indices: rewriting nested message columns is slow; the tokenizing map reads through the indices.
    return mixed.shuffle(seed=recipe.seed)


def build_datasets(
    recipe: DataRecipe, tokenizer: PreTrainedTokenizerBase | None = None, allow_empty: bool = False
) -> tuple[dict[str, Dataset | IterableDataset], DataReport]:
    """The recipe's train (and eval) datasets, ready for the trainers, and the report of what happened.

    A recipe that leaves no train example is a DataError, unless `allow_empty` (validate and stats report it)."""
    tokenizer = tokenizer or load_tokenizer(recipe.tokenizer)
    chat = ChatTokenizer(tokenizer, recipe.fix_tool_calls, recipe.parse_special_tokens)
    report = DataReport()
    kinds = TASK_KINDS[recipe.task]
    train_parts = load_sources(recipe.sources, kinds, recipe, report)
    eval_parts = load_sources(recipe.eval_sources, kinds, recipe, report)
    if recipe.streaming:
        train = build_stream_mixture(train_parts, [s.weight for s in recipe.sources], recipe.seed)
        splits: dict[str, Any] = {"train": train}
        if eval_parts:
            splits["eval"] = datasets.concatenate_datasets(eval_parts)
    else:
        splits = build_splits(train_parts, eval_parts, recipe, report)
    result: dict[str, Dataset | IterableDataset] = {}
    for split, ds in splits.items():
        if isinstance(ds, Dataset) and len(ds) == 0:
            if split == "train" and not allow_empty:
                raise DataError(f"no train examples left: {report.summary_of_losses()}")
            report.notes.append(f"{split}: no examples left ({report.summary_of_losses()})")
            continue
        if recipe.task == "cpt":
            result[split] = build_cpt_split(ds, recipe, chat, report, split)
            continue
        ds = tokenize_examples(ds, recipe, chat, report, split)
        if recipe.task == "sft" and recipe.pack:
            ds = pack_dataset(ds, recipe.max_length, chat.eos_id, num_proc=recipe.num_proc)
            if split == "train":
                ds = mix_replay(ds, recipe, chat, report)
            if isinstance(ds, Dataset):
                report.rows[split] = len(ds)
                report.fill_ratio[split] = compute_fill_ratio(ds, recipe.max_length)
        elif recipe.task == "sft" and split == "train" and recipe.replay_sources and recipe.replay_fraction > 0:
            raise DataError("replay_sources in sft need packed rows (pack: true)")
        result[split] = ds
    return result, report


def build_splits(
    train_parts: list[Dataset], eval_parts: list[Dataset], recipe: DataRecipe, report: DataReport
) -> dict[str, Dataset]:
    """Deduplicate, hold out eval_fraction of every source, weight and mix."""
    parts = [add_hashes(ds, recipe.num_proc) for ds in train_parts + eval_parts]
    if recipe.dedup:
        # Eval sources first: an example in both stays in eval only.
        parts = parts[len(train_parts) :] + parts[: len(train_parts)]
        parts = remove_duplicates(parts, report)
        parts = parts[len(eval_parts) :] + parts[: len(eval_parts)]
    train_parts, eval_parts = parts[: len(train_parts)], parts[len(train_parts) :]
    if recipe.eval_fraction > 0:
        held = []
        for i, ds in enumerate(train_parts):
            train_parts[i], held_out = split_by_hash(ds, recipe.eval_fraction, recipe.seed)
            held.append(held_out)
        eval_parts = eval_parts + held
    splits = {"train": build_mixture(train_parts, recipe.sources, recipe)}
    if eval_parts:
        evaluation = datasets.concatenate_datasets(eval_parts) if len(eval_parts) > 1 else eval_parts[0]
        splits["eval"] = evaluation.remove_columns(["_hash"])
    return splits


def build_cpt_split(
    ds: Dataset | IterableDataset, recipe: DataRecipe, chat: ChatTokenizer, report: DataReport, split: str
) -> Dataset | IterableDataset:
    """Corpus blocks, with packed replay chat rows mixed in (train only).

    Plain text is cut into blocks across documents, as in pre-training; plain-text prompt/completion records and
    segment records are each their own sample (packed, position_ids restarting, attention within the sample), loss
    on the completion or the labelled segments.
    """
    if {"completion", "segments"} & set(ds.column_names or []):
        blocks = tokenize_examples(ds, recipe, chat, report, split)
        blocks = pack_dataset(blocks, recipe.max_length, chat.eos_id, num_proc=recipe.num_proc)
    else:
        blocks = build_corpus_blocks(ds.remove_columns(["_file", "_line"]), chat, recipe.max_length, recipe.num_proc)
    if split == "train":
        blocks = mix_replay(blocks, recipe, chat, report)
    if isinstance(blocks, Dataset):
        report.rows[split] = len(blocks)
        report.fill_ratio[split] = compute_fill_ratio(blocks, recipe.max_length)
    return blocks


def build_replay_rows(recipe: DataRecipe, chat: ChatTokenizer, report: DataReport) -> Dataset:
    """The replay sources as packed rows: chat data (cpt replay, loss on the assistant turns) or plain text (sft
    replay: prompt/completion records as their own samples, loss on the completion; documents cut into blocks)."""
    task = "sft" if recipe.task == "cpt" else "cpt"
    replay_recipe = DataRecipe(
        **{**recipe.__dict__, "task": task, "sources": recipe.replay_sources, "eval_sources": [], "eval_fraction": 0.0}
    )
    parts = load_sources(recipe.replay_sources, TASK_KINDS[task], replay_recipe, report)
    replay = build_mixture(parts, recipe.replay_sources, replay_recipe)
    if task == "cpt" and not {"completion", "segments"} & set(replay.column_names):
        return build_corpus_blocks(replay.remove_columns(["_file", "_line"]), chat, recipe.max_length, recipe.num_proc)
    replay = tokenize_examples(replay, replay_recipe, chat, report, "replay")
    return pack_dataset(replay, recipe.max_length, chat.eos_id, num_proc=recipe.num_proc)


def mix_replay(
    rows: Dataset | IterableDataset, recipe: DataRecipe, chat: ChatTokenizer, report: DataReport
) -> Dataset | IterableDataset:
    """Train rows with replay rows mixed in so that replay_fraction of the rows are replay (seeded subset or
    repeats of the replay rows), shuffled."""
    if not recipe.replay_sources or recipe.replay_fraction <= 0:
        return rows
    if isinstance(rows, IterableDataset):
        raise DataError("replay mixing needs a map-style dataset (streaming: false)")
    replay = build_replay_rows(recipe, chat, report)
    wanted = round(len(rows) * recipe.replay_fraction / (1 - recipe.replay_fraction))
    replay = apply_weight(replay, wanted / max(len(replay), 1), recipe.seed)
    report.rows["replay"] = len(replay)
    mixed = datasets.concatenate_datasets([rows, replay.cast(rows.features)]).shuffle(seed=recipe.seed)
    return mixed.flatten_indices()


def save_datasets(splits: dict[str, Dataset], report: DataReport, output_dir: str | Path) -> None:
    """Write each split with save_to_disk and the report as stats.json."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for split, ds in splits.items():
        ds.save_to_disk(str(output / split))
    (output / "stats.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
