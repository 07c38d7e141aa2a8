"""Readers: JSONL, JSON, Parquet, CSV and text files, folders of them and datasets saved to disk -> canonical rows.

Every row keeps `_file` and `_line` (1-based line for JSONL, CSV and text lines; 1-based record number for JSON
arrays, Parquet and saved datasets) so that any later error can name the record. Bad records become rows with an
`_error`; `validate.drop_bad_records` raises or counts them.
"""

import codecs
import csv
import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, IterableDataset

from data_tools.errors import DataError, RecordError
from data_tools.formats import (
    DEFAULT_OPTIONS,
    FORMAT_KINDS,
    ROLES,
    FormatOptions,
    build_features,
    detect_format,
    empty_example,
    resolve_kind,
    to_canonical_examples,
)

LINE_FILES = (".jsonl", ".ndjson")
RECORD_FILES = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_FILES = (".txt", ".md")
DATA_SUFFIXES = LINE_FILES + tuple(RECORD_FILES) + TEXT_FILES


@dataclass
class SourceSpec:
    """One data source of a recipe."""

    path: str | None = None  # a file, a folder, a save_to_disk folder, or a LLaMA-Factory dataset_info.json (folder)
    format: str | None = None  # detected from the first record when None
    weight: float = 1.0  # multiplier on the source's size: 0.5 takes a seeded half, 2.0 repeats it twice
    split: str | None = None  # "train", "train[:80%]", "test[100:200]"; default: the whole file, or "train"
    sample_by: str = "paragraph"  # for .txt/.md: one document per "line", "paragraph" or "document"
    hub: str | None = None  # a Hub dataset name (or a local folder in a Hub repo's layout), via datasets.load_dataset
    subset: str | None = None  # the Hub dataset's configuration
    name: str | None = None  # the dataset's name in a LLaMA-Factory dataset_info.json
    columns: dict[str, str] | None = None  # canonical key -> the record's key, e.g. {messages: conversation}
    roles: dict[str, str] | None = None  # the records' role names -> system | user | assistant | tool
    as_chat: bool = False  # plain-string prompt/completion/preference records get the chat template (not trl's raw)

    @classmethod
    def from_value(cls, value: str | dict[str, Any]) -> "SourceSpec":
        """A spec from a recipe entry: a path or a mapping of the fields."""
        if isinstance(value, str):
            return cls(path=value)
        if not isinstance(value, dict):
            raise DataError(f"a source is a path or a mapping, got {value!r}")
        value = dict(value)
        if "dataset_info" in value:  # LLaMA-Factory's own word for it
            value["path"] = value.pop("dataset_info")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"unknown source keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        spec = cls(**value)
        if (spec.path is None) == (spec.hub is None):
            raise DataError(f"a source needs exactly one of path or hub: {value}")
        if spec.sample_by not in ("line", "paragraph", "document"):
            raise DataError(f"sample_by must be line, paragraph or document, got {spec.sample_by!r}")
        for key in ("columns", "roles"):
            mapping = getattr(spec, key)
            if mapping is not None and not (
                isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
            ):
                raise DataError(f"source {key} must map names to names, got {mapping!r}")
        bad_roles = sorted(v for v in (spec.roles or {}).values() if v not in (*ROLES, "function_call"))
        if bad_roles:
            raise DataError(f"roles map to system, user, assistant, tool or function_call, not {bad_roles}")
        return spec

    @property
    def where(self) -> str:
        """How errors name this source."""
        if self.hub is not None:
            return self.hub
        return f"{self.path}[{self.name}]" if self.name else str(self.path)

    def options(self) -> FormatOptions:
        """How this source's records are read."""
        return FormatOptions(self.columns, self.roles, self.as_chat)


def find_data_files(path: str | Path) -> list[Path]:
    """The data files at `path`: the file itself, or every data file under a folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("no such file or folder", str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DataError(f"no data files ({', '.join(DATA_SUFFIXES)}) in folder", str(path))
    return files


def is_saved_dataset(path: str | Path) -> bool:
    """Whether `path` is a folder written by `save_to_disk` (not a LLaMA-Factory data folder)."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def llamafactory_info(path: str | Path) -> Path | None:
    """The LLaMA-Factory dataset_info.json that `path` is or holds, if it is one."""
    path = Path(path)
    info = path / "dataset_info.json" if path.is_dir() else path
    if info.name != "dataset_info.json" or not info.is_file() or is_saved_dataset(info.parent):
        return None
    return info


def parse_split(spec: str) -> tuple[str, str | None, str | None]:
    """("train", "10%", "90%") from "train[10%:90%]"; bounds are None when absent."""
    match = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*", spec)
    if not match:
        raise DataError(f"bad split {spec!r}; expected name or name[start:stop] (ints or percents)")
    return match.group(1), match.group(2), match.group(3)


def select_split(ds: Dataset | IterableDataset, start: str | None, stop: str | None) -> Dataset | IterableDataset:
    """Rows start:stop of a dataset; percents of its length (map-style only)."""
    if start is None and stop is None:
        return ds

    def bound(value: str | None, default: int) -> int:
        if value is None:
            return default
        if value.endswith("%"):
            if isinstance(ds, IterableDataset):
                raise DataError("percent slices need a map-style dataset (not streaming)")
            return round(len(ds) * int(value[:-1]) / 100)
        return int(value)

    if isinstance(ds, IterableDataset):
        begin = bound(start, 0)
        ds = ds.skip(begin)
        return ds if stop is None else ds.take(bound(stop, 0) - begin)
    begin, end = slice(bound(start, 0), bound(stop, len(ds))).indices(len(ds))[:2]
    return ds.select(range(begin, max(begin, end)))


def find_invalid_utf8_lines(path: Path) -> set[int]:
    """1-based numbers of the lines that are not valid UTF-8 (one fast pass when the file is clean)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        return set()
    except UnicodeDecodeError:
        pass
    bad = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.add(number)
    return bad


def build_row(
    kind: str,
    file: str,
    line: int,
    example: dict[str, Any] | None = None,
    error: RecordError | None = None,
    ignored: list[str] | None = None,
) -> dict[str, Any]:
    """A canonical row, or an error row holding the placeholder example."""
    row = dict(example) if example is not None else empty_example(kind)
    row.update(_file=file, _line=line, _error=None, _field=None, _reason=None, _ignored=ignored or [])
    if error is not None:
        row.update(_error=str(error), _field=error.field, _reason=error.reason)
    return row


def rows_to_batch(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, list]:
    """A column batch from row dicts."""
    return {c: [row[c] for row in rows] for c in columns}


def canonicalize_lines(
    batch: dict[str, list],
    indices: list[int],
    file: str,
    fmt: str,
    kind: str,
    options: FormatOptions,
    invalid_lines: set[int],
) -> dict[str, list]:
    """JSONL lines -> canonical rows (invalid UTF-8, invalid JSON and bad records become error rows)."""
    rows = []
    for index, line in zip(indices, batch["text"]):
        number = index + 1
        if number in invalid_lines:
            rows.append(build_row(kind, file, number, error=RecordError("invalid_utf8", "invalid UTF-8")))
            continue
        if not line.strip():
            rows.append(build_row(kind, file, number, error=RecordError("blank", "blank line")))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            error = RecordError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
            rows.append(build_row(kind, file, number, error=error))
            continue
        rows.extend(canonicalize_record(record, kind, fmt, file, number, options))
    return rows_to_batch(rows, list(build_features(kind)))


def explain(record: dict[str, Any], fmt: str, error: RecordError, options: FormatOptions) -> RecordError:
    """The error, or a clearer one when the record is in another format than the source's first record."""
    if error.reason in ("unsupported_modality", "mixed_kinds"):
        return error
    try:
        other = detect_format(options.rename(record))
    except RecordError:
        return error
    same = {other, fmt} <= {"messages", "sharegpt"}
    if other != fmt and not same:
        return RecordError(
            "mixed_formats",
            f"this record is {other} (keys {sorted(record)}), the source's first record is {fmt}; "
            "one source holds one format",
        )
    return error


def canonicalize_record(
    record: Any, kind: str, fmt: str, file: str, number: int, options: FormatOptions
) -> list[dict[str, Any]]:
    """One parsed record -> its canonical rows (two for an unpaired preference), or one error row."""
    if not isinstance(record, dict):
        return [build_row(kind, file, number, error=RecordError("bad_type", "record is not a JSON object"))]
    try:
        renamed = options.rename(record)
        examples = to_canonical_examples(renamed, fmt, kind, options)
    except RecordError as e:
        return [build_row(kind, file, number, error=explain(record, fmt, e, options))]
    ignored = renamed.ignored()
    return [build_row(kind, file, number, example, ignored=ignored) for example in examples]


def canonicalize_records(
    batch: dict[str, list],
    indices: list[int],
    file: str,
    fmt: str,
    kind: str,
    options: FormatOptions,
    first_line: int,
) -> dict[str, list]:
    """Rows of a JSON/Parquet/CSV/saved dataset -> canonical rows."""
    columns = [c for c in batch if c not in ("_file", "_line")]
    rows = []
    for index, values in zip(indices, zip(*(batch[c] for c in columns))):
        record = {c: v for c, v in zip(columns, values) if v is not None}
        rows.extend(canonicalize_record(record, kind, fmt, file, index + first_line, options))
    return rows_to_batch(rows, list(build_features(kind)))


def canonicalize_texts(
    batch: dict[str, list], indices: list[int], file: str, by_line: bool, invalid_lines: set[int]
) -> dict[str, list]:
    """Plain-text documents -> canonical text rows (`_line` is the line for line files, else the document)."""
    rows = []
    for index, text in zip(indices, batch["text"]):
        number = index + 1
        if (by_line and number in invalid_lines) or (not by_line and invalid_lines and "\ufffd" in text):
            rows.append(build_row("text", file, number, error=RecordError("invalid_utf8", "invalid UTF-8")))
        elif not text.strip():
            rows.append(build_row("text", file, number, error=RecordError("blank", "blank line")))
        else:
            rows.append(build_row("text", file, number, {"text": text}))
    return rows_to_batch(rows, list(build_features("text")))


def read_first_record(path: Path) -> dict[str, Any]:
    """The first non-blank JSONL record, for format detection."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON: {e.msg}", str(path), number, reason="invalid_json") from None
                if not isinstance(record, dict):
                    raise DataError("record is not a JSON object", str(path), number, reason="bad_type")
                return record
    raise DataError("file has no records", str(path), reason="empty_file")


KIND_NAMES = {
    "chat": "conversations",
    "preference": "conversational preference pairs",
    "kto": "conversational labelled completions",
    "text": "plain-text documents",
    "text_completion": "plain-text prompt/completion records",
    "text_preference": "plain-text preference pairs",
    "text_kto": "plain-text labelled completions",
    "segments": "plain-text segments with loss labels",
}


def resolve_format(
    declared: str | None,
    record: dict[str, Any],
    file: str,
    kinds: tuple[str, ...] | None,
    options: FormatOptions = DEFAULT_OPTIONS,
) -> tuple[str, str]:
    """(format, kind): the declared format or the detected one, and the canonical kind the task reads it as."""
    if declared is not None:
        if declared not in FORMAT_KINDS:
            raise DataError(f"unknown format {declared!r}; known: {sorted(FORMAT_KINDS)}", file)
        fmt = declared
    else:
        try:
            fmt = detect_format(options.rename(record))
        except RecordError as e:
            raise DataError(str(e), file, 1, reason=e.reason) from None
    kind = resolve_kind(fmt, record, kinds, options)
    if kinds is not None and kind not in kinds:
        wanted = " or ".join(KIND_NAMES[k] for k in kinds)
        raise DataError(f"format {fmt!r} gives {KIND_NAMES[kind]}, this task needs {wanted}", file)
    return fmt, kind


def map_options(ds: Dataset | IterableDataset, num_proc: int, desc: str) -> dict[str, Any]:
    """map() keyword arguments valid for both map-style and streaming datasets."""
    if isinstance(ds, IterableDataset):
        return {}
    # Never the cache: datasets fingerprints the map function, not the helpers it calls, so a cached result could
    # come from another version of this code.
    return {
        "num_proc": num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
        "desc": desc,
        "load_from_cache_file": False,
    }


def count_text_layout(path: Path) -> tuple[int, int]:
    """(lines, blank lines) of a text file."""
    lines = blank = 0
    with open(path, "rb") as f:
        for raw in f:
            lines += 1
            blank += not raw.strip()
    return lines, blank


def csv_features(path: Path) -> datasets.Features:
    """Every CSV column as a string: "00000" stays "00000", an answer "42" stays text."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError("file has no header line", str(path), reason="empty_file")
    return datasets.Features({name: datasets.Value("string") for name in header})


def load_file(
    path: Path,
    spec: SourceSpec,
    kinds: tuple[str, ...] | None,
    streaming: bool = False,
    num_proc: int = 1,
    options: FormatOptions | None = None,
    notes: list[str] | None = None,
) -> Dataset | IterableDataset:
    """Canonical rows of one data file."""
    file = str(path)
    options = options or spec.options()
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", file, reason="empty_file")
    if suffix in LINE_FILES or suffix in TEXT_FILES:
        invalid = find_invalid_utf8_lines(path)
        sample_by = "line" if suffix in LINE_FILES else spec.sample_by
        # "replace" keeps loading past invalid bytes; the lines found above are reported as errors. utf-8-sig: a
        # byte-order mark is not text.
        raw = datasets.load_dataset(
            "text",
            data_files=file,
            split="train",
            streaming=streaming,
            sample_by=sample_by,
            encoding="utf-8-sig",
            encoding_errors="replace",
        )
        if suffix in TEXT_FILES:
            if spec.format not in (None, "text") or (kinds is not None and "text" not in kinds):
                raise DataError("plain-text files hold raw documents (task cpt)", file)
            if sample_by == "paragraph" and notes is not None:
                lines, blank = count_text_layout(path)
                if lines > 1 and not blank:
                    notes.append(
                        f"{file}: {lines} lines and no blank line, read as one document (sample_by: paragraph); "
                        "set sample_by: line for one document per line"
                    )
            return raw.map(
                canonicalize_texts,
                batched=True,
                with_indices=True,
                remove_columns=["text"],
                features=build_features("text"),
                fn_kwargs={"file": file, "by_line": sample_by == "line", "invalid_lines": invalid},
                **map_options(raw, num_proc, f"Reading {path.name}"),
            )
        fmt, kind = resolve_format(spec.format, read_first_record(path), file, kinds, options)
        return raw.map(
            canonicalize_lines,
            batched=True,
            with_indices=True,
            remove_columns=["text"],
            features=build_features(kind),
            fn_kwargs={"file": file, "fmt": fmt, "kind": kind, "options": options, "invalid_lines": invalid},
            **map_options(raw, num_proc, f"Reading {path.name}"),
        )
    if suffix not in RECORD_FILES:
        raise DataError(f"unsupported file type {suffix!r}; known: {', '.join(DATA_SUFFIXES)}", file)
    extra: dict[str, Any] = {}
    if suffix == ".csv":
        extra = {"features": csv_features(path), "keep_default_na": False, "na_values": [""], "encoding": "utf-8-sig"}
    try:
        raw = datasets.load_dataset(RECORD_FILES[suffix], data_files=file, split="train", streaming=streaming, **extra)
    except Exception as e:  # noqa: BLE001 - the loaders raise many types; the user needs the file and the cause
        raise DataError(f"cannot read: {locate_json_error(path) or e}", file, reason="unreadable") from None
    first_line = 2 if suffix == ".csv" else 1  # CSV: line 1 is the header
    return canonicalize_dataset(raw, spec, kinds, file, first_line, num_proc, options)


def locate_json_error(path: Path) -> str | None:
    """The position of a JSON syntax error in a .json file, if that is why it failed to load."""
    if path.suffix.lower() != ".json":
        return None
    try:
        json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        return f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
    except (UnicodeDecodeError, OSError):
        return "invalid UTF-8"
    return None


def canonicalize_dataset(
    raw: Dataset | IterableDataset,
    spec: SourceSpec,
    kinds: tuple[str, ...] | None,
    file: str,
    first_line: int = 1,
    num_proc: int = 1,
    options: FormatOptions | None = None,
) -> Dataset | IterableDataset:
    """Canonical rows of an already loaded dataset (records as columns)."""
    options = options or spec.options()
    first = next(iter(raw), None)
    if first is None:
        raise DataError("source has no records", file, reason="empty_file")
    fmt, kind = resolve_format(spec.format, first, file, kinds, options)  # a null in row 1 is still a column
    columns = raw.column_names if raw.column_names is not None else list(first)
    return raw.map(
        canonicalize_records,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        features=build_features(kind),
        fn_kwargs={"file": file, "fmt": fmt, "kind": kind, "options": options, "first_line": first_line},
        **map_options(raw, num_proc, f"Reading {Path(file).name}"),
    )


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_hub(
    spec: SourceSpec,
    kinds: tuple[str, ...] | None,
    streaming: bool,
    num_proc: int,
    options: FormatOptions | None = None,
) -> Dataset | IterableDataset:
    """A Hub dataset (or a local folder in a Hub repo's layout) through datasets.load_dataset: data files only,
    never a loading script."""
    name = spec.hub or spec.path
    split, start, stop = parse_split(spec.split) if spec.split else ("train", None, None)
    try:
        loaded = datasets.load_dataset(name, spec.subset, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, gated, bad layout: one sentence with the cause
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load the Hub dataset: {cause}", name, reason="unreadable") from None
    if split not in loaded:
        raise DataError(f"no split {split!r}; it has {list(loaded)}", name)
    raw = select_split(loaded[split], start, stop)
    return canonicalize_dataset(raw, spec, kinds, name, 1, num_proc, options)


LLAMAFACTORY_KEYS = {
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
    "file_name",
    "formatting",
    "ranking",
    "subset",
    "split",
    "folder",
    "num_samples",
    "columns",
    "tags",
}
# LLaMA-Factory's defaults (data/parser.py): they hold only while the entry has no "columns" (or "tags") object at
# all; an entry that lists some columns sets every other one to None.
LF_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "messages": "conversations",
    "system": None,
    "tools": None,
    "images": None,
    "videos": None,
    "audios": None,
    "chosen": None,
    "rejected": None,
    "kto_tag": None,
}
LF_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}


def read_llamafactory_entry(info: Path, name: str | None) -> dict[str, Any]:
    """The checked entry `name` of a LLaMA-Factory dataset_info.json."""
    try:
        entries = json.loads(info.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"invalid JSON: {e.msg} (column {e.colno})", str(info), e.lineno, reason="invalid_json"
        ) from None
    if not isinstance(entries, dict):
        raise DataError("a dataset_info.json maps dataset names to entries", str(info))
    if name is None:
        raise DataError(
            f"a LLaMA-Factory dataset_info.json: pick a dataset with name: one of {', '.join(sorted(entries))}",
            str(info),
        )
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"no dataset {name!r}{hint}; it has {', '.join(sorted(entries))}", str(info))
    entry = entries[name]
    unknown = sorted(set(entry) - LLAMAFACTORY_KEYS) if isinstance(entry, dict) else None
    if unknown is None or unknown:
        raise DataError(f"entry {name!r}: unknown keys {unknown}; known: {sorted(LLAMAFACTORY_KEYS)}", str(info))
    if "file_name" not in entry and "hf_hub_url" not in entry:
        sources = [k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry]
        raise DataError(f"entry {name!r}: only file_name and hf_hub_url sources can be read, not {sources}", str(info))
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"entry {name!r}: unknown formatting {formatting!r}", str(info))
    return entry


def llamafactory_spec(spec: SourceSpec, info: Path, kinds: tuple[str, ...] | None) -> tuple[SourceSpec, FormatOptions]:
    """Our source for a LLaMA-Factory dataset, read the way LLaMA-Factory's parser and converters read it."""
    entry = read_llamafactory_entry(info, spec.name)
    formatting = entry.get("formatting", "alpaca")
    given = entry.get("columns")
    lf = dict(LF_COLUMNS) if given is None else {name: given.get(name) for name in LF_COLUMNS}
    ranking = bool(entry.get("ranking", False))
    columns: dict[str, str] = {}
    roles: dict[str, str] | None = None
    if formatting == "alpaca":
        if kinds is not None and "text" in kinds and lf["prompt"]:
            fmt = "text"  # pre-training: the prompt column is the document
            columns["text"] = lf["prompt"]
        else:
            fmt = "preference" if ranking else "alpaca"
            for ours, theirs in (("instruction", "prompt"), ("input", "query"), ("history", "history")):
                if lf[theirs]:
                    columns[ours] = lf[theirs]
            if not ranking and lf["response"]:
                columns["output"] = lf["response"]
    else:
        tags_given = entry.get("tags")
        tags = dict(LF_TAGS) if tags_given is None else {tag: tags_given.get(tag) for tag in LF_TAGS}
        fmt = "preference" if ranking else "sharegpt"
        if lf["messages"]:
            columns["messages"] = lf["messages"]
        columns.update(role=tags["role_tag"] or "from", content=tags["content_tag"] or "value")
        roles = {tags[tag]: role for tag, role in TAG_ROLES.items() if tags[tag]}
    for key in ("system", "tools", "images", "videos", "audios", "chosen", "rejected"):
        if lf[key]:
            columns[key] = lf[key]
    if lf["kto_tag"]:
        columns["label"] = lf["kto_tag"]
    split = entry.get("split", "train")
    if entry.get("num_samples") is not None:
        split = f"{split.split('[')[0]}[:{int(entry['num_samples'])}]"
    if spec.split:
        split = spec.split
    options = FormatOptions(
        columns, roles, as_chat=True, join="\n", only_mapped=True, exclusive_roles=roles is not None
    )
    where = str(info.parent / entry.get("folder", "") / entry["file_name"]) if "file_name" in entry else None
    derived = SourceSpec(
        path=where,
        hub=None if where else entry["hf_hub_url"],
        subset=entry.get("subset"),
        format=fmt,
        weight=spec.weight,
        split=split,
        sample_by="line",  # LLaMA-Factory reads text files one line a record
    )
    return derived, options


def load_source(
    spec: SourceSpec,
    kinds: tuple[str, ...] | str | None = None,
    streaming: bool = False,
    num_proc: int = 1,
    notes: list[str] | None = None,
) -> Dataset | IterableDataset:
    """Canonical rows (with `_error` rows for bad records) of a file, a folder, a dataset saved to disk, a
    LLaMA-Factory dataset or a Hub dataset."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    options = None
    if spec.path is not None and (info := llamafactory_info(spec.path)) is not None:
        spec, options = llamafactory_spec(spec, info, kinds)
    elif spec.name is not None:
        raise DataError("name picks a dataset of a LLaMA-Factory dataset_info.json; this is not one", spec.where)
    if spec.hub is not None or (not Path(spec.path).exists() and HUB_NAME.fullmatch(spec.path)):
        return load_hub(spec, kinds, streaming, num_proc, options)
    name, start, stop = parse_split(spec.split) if spec.split else ("train", None, None)
    if is_saved_dataset(spec.path):
        saved = datasets.load_from_disk(spec.path)
        if isinstance(saved, DatasetDict):
            if name not in saved:
                raise DataError(f"no split {name!r}; it has {list(saved)}", spec.path)
            saved = saved[name]
        if streaming:
            saved = saved.to_iterable_dataset()
        return canonicalize_dataset(select_split(saved, start, stop), spec, kinds, spec.path, 1, num_proc, options)
    parts = []
    for path in find_data_files(spec.path):
        if path.stat().st_size == 0 and Path(spec.path).is_dir():
            if notes is not None:
                notes.append(f"{path}: empty file (0 bytes), skipped")
            continue
        parts.append(load_file(path, spec, kinds, streaming, num_proc, options, notes))
    if not parts:
        raise DataError("every data file in the folder is empty", spec.path, reason="empty_file")
    kinds_found = {tuple(p.features) for p in parts if p.features is not None}
    if len(kinds_found) > 1:
        raise DataError("files of one source hold different kinds of examples", spec.path)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return select_split(ds, start, stop)


def apply_weight(ds: Dataset, weight: float, seed: int) -> Dataset:
    """The source repeated `weight` times: whole copies, then a seeded random part for the fraction."""
    if weight < 0:
        raise DataError(f"weight must be >= 0, got {weight}")
    target = round(len(ds) * weight)
    copies, rest = divmod(target, len(ds)) if len(ds) else (0, 0)
    parts = [ds] * copies
    if rest:
        parts.append(ds.shuffle(seed=seed).select(range(rest)))
    if not parts:
        return ds.select([])
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def build_stream_mixture(parts: list[IterableDataset], weights: list[float], seed: int) -> IterableDataset:
    """Streaming sources interleaved with probabilities proportional to their weights (sizes are unknown)."""
    if len(parts) == 1:
        return parts[0]
    total = sum(weights)
    if not total or any(math.isnan(w) or w < 0 for w in weights):
        raise DataError(f"bad weights {weights}")
    return datasets.interleave_datasets(
        parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
    )
