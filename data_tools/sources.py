"""Readers: JSONL, JSON, Parquet, CSV and text files, folders of them and datasets saved to disk -> canonical rows.

Every row keeps `_file` and `_line` (1-based line for JSONL, CSV and text lines; 1-based record number for JSON
arrays, Parquet and saved datasets) so that any later error can name the record. Bad records become rows with an
`_error`; `validate.drop_bad_records` raises or counts them.
"""

import codecs
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, IterableDataset

from data_tools.errors import DataError, RecordError
from data_tools.formats import FORMAT_KINDS, build_features, detect_format, empty_example, to_canonical

LINE_FILES = (".jsonl", ".ndjson")
RECORD_FILES = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_FILES = (".txt", ".md")
DATA_SUFFIXES = LINE_FILES + tuple(RECORD_FILES) + TEXT_FILES


@dataclass
class SourceSpec:
    """One data source of a recipe."""

    path: str
    format: str | None = None  # detected from the first record when None
    weight: float = 1.0  # multiplier on the source's size: 0.5 takes a seeded half, 2.0 repeats it twice
    split: str | None = None  # "train", "train[:80%]", "test[100:200]"; default: the whole file, or "train"
    sample_by: str = "paragraph"  # for .txt/.md: one document per "line", "paragraph" or "document"

    @classmethod
    def from_value(cls, value: str | dict[str, Any]) -> "SourceSpec":
        """A spec from a recipe entry: a path or a mapping of the fields."""
        if isinstance(value, str):
            return cls(path=value)
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"unknown source keys {sorted(unknown)}")
        return cls(**value)


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
    """Whether `path` is a folder written by `save_to_disk`."""
    path = Path(path)
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


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
    kind: str, file: str, line: int, example: dict[str, Any] | None = None, error: RecordError | None = None
) -> dict[str, Any]:
    """A canonical row, or an error row holding the placeholder example."""
    row = dict(example) if example is not None else empty_example(kind)
    row.update(_file=file, _line=line, _error=None, _field=None, _reason=None)
    if error is not None:
        row.update(_error=str(error), _field=error.field, _reason=error.reason)
    return row


def rows_to_batch(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, list]:
    """A column batch from row dicts."""
    return {c: [row[c] for row in rows] for c in columns}


def canonicalize_lines(
    batch: dict[str, list], indices: list[int], file: str, fmt: str, invalid_lines: set[int]
) -> dict[str, list]:
    """JSONL lines -> canonical rows (invalid UTF-8, invalid JSON and bad records become error rows)."""
    kind = FORMAT_KINDS[fmt]
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
            rows.append(
                build_row(
                    kind, file, number, error=RecordError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
                )
            )
            continue
        rows.append(canonicalize_record(record, kind, fmt, file, number))
    return rows_to_batch(rows, list(build_features(kind)))


def canonicalize_record(record: Any, kind: str, fmt: str, file: str, number: int) -> dict[str, Any]:
    """One parsed record -> a canonical row or an error row."""
    if not isinstance(record, dict):
        return build_row(kind, file, number, error=RecordError("bad_type", "record is not a JSON object"))
    try:
        return build_row(kind, file, number, to_canonical(record, fmt))
    except RecordError as e:
        return build_row(kind, file, number, error=e)


def canonicalize_records(
    batch: dict[str, list], indices: list[int], file: str, fmt: str, first_line: int
) -> dict[str, list]:
    """Rows of a JSON/Parquet/CSV/saved dataset -> canonical rows."""
    kind = FORMAT_KINDS[fmt]
    columns = [c for c in batch if c not in ("_file", "_line")]
    rows = []
    for index, values in zip(indices, zip(*(batch[c] for c in columns))):
        record = {c: v for c, v in zip(columns, values) if v is not None}
        rows.append(canonicalize_record(record, kind, fmt, file, index + first_line))
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
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON: {e.msg}", str(path), number, reason="invalid_json") from None
    raise DataError("file has no records", str(path), reason="empty_file")


def resolve_format(declared: str | None, record: dict[str, Any], file: str, kind: str | None) -> str:
    """The declared format or the detected one, checked against the kind the task needs."""
    if declared is not None:
        if declared not in FORMAT_KINDS:
            raise DataError(f"unknown format {declared!r}; known: {sorted(FORMAT_KINDS)}", file)
        fmt = declared
    else:
        try:
            fmt = detect_format(record)
        except RecordError as e:
            raise DataError(str(e), file, 1, reason=e.reason) from None
    if kind == "text" and FORMAT_KINDS[fmt] == "text_completion":
        return fmt  # the cpt task takes plain text or plain-text prompt/completion
    if kind is not None and FORMAT_KINDS[fmt] != kind:
        raise DataError(f"format {fmt!r} gives {FORMAT_KINDS[fmt]} examples, this task needs {kind}", file)
    return fmt


def map_options(ds: Dataset | IterableDataset, num_proc: int, desc: str) -> dict[str, Any]:
    """map() keyword arguments valid for both map-style and streaming datasets."""
    if isinstance(ds, IterableDataset):
        return {}
    return {"num_proc": num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None, "desc": desc}


def load_file(
    path: Path, spec: SourceSpec, kind: str | None, streaming: bool = False, num_proc: int = 1
) -> Dataset | IterableDataset:
    """Canonical rows of one data file."""
    file = str(path)
    suffix = path.suffix.lower()
    if suffix in LINE_FILES or suffix in TEXT_FILES:
        invalid = find_invalid_utf8_lines(path)
        sample_by = "line" if suffix in LINE_FILES else spec.sample_by
        # "replace" keeps loading past invalid bytes; the lines found above are reported as errors.
        raw = datasets.load_dataset(
            "text", data_files=file, split="train", streaming=streaming, sample_by=sample_by, encoding_errors="replace"
        )
        if suffix in TEXT_FILES:
            if spec.format not in (None, "text") or kind not in (None, "text"):
                raise DataError("plain-text files hold raw text (task cpt)", file)
            return raw.map(
                canonicalize_texts,
                batched=True,
                with_indices=True,
                remove_columns=["text"],
                features=build_features("text"),
                fn_kwargs={"file": file, "by_line": sample_by == "line", "invalid_lines": invalid},
                **map_options(raw, num_proc, f"Reading {path.name}"),
            )
        fmt = resolve_format(spec.format, read_first_record(path), file, kind)
        return raw.map(
            canonicalize_lines,
            batched=True,
            with_indices=True,
            remove_columns=["text"],
            features=build_features(FORMAT_KINDS[fmt]),
            fn_kwargs={"file": file, "fmt": fmt, "invalid_lines": invalid},
            **map_options(raw, num_proc, f"Reading {path.name}"),
        )
    if suffix not in RECORD_FILES:
        raise DataError(f"unsupported file type {suffix!r}; known: {', '.join(DATA_SUFFIXES)}", file)
    try:
        raw = datasets.load_dataset(RECORD_FILES[suffix], data_files=file, split="train", streaming=streaming)
    except Exception as e:  # noqa: BLE001 - the loaders raise many types; the user needs the file and the cause
        raise DataError(f"cannot read: {locate_json_error(path) or e}", file, reason="unreadable") from None
    first_line = 2 if suffix == ".csv" else 1  # CSV: line 1 is the header
    return canonicalize_dataset(raw, spec, kind, file, first_line, num_proc)


def locate_json_error(path: Path) -> str | None:
    """The position of a JSON syntax error in a .json file, if that is why it failed to load."""
    if path.suffix.lower() != ".json":
        return None
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
    except (UnicodeDecodeError, OSError):
        return "invalid UTF-8"
    return None


def canonicalize_dataset(
    raw: Dataset | IterableDataset,
    spec: SourceSpec,
    kind: str | None,
    file: str,
    first_line: int = 1,
    num_proc: int = 1,
) -> Dataset | IterableDataset:
    """Canonical rows of an already loaded dataset (records as columns)."""
    first = next(iter(raw), None)
    if first is None:
        raise DataError("source has no records", file, reason="empty_file")
    fmt = resolve_format(spec.format, first, file, kind)  # all columns: a null in row 1 is still a column
    columns = raw.column_names if raw.column_names is not None else list(first)
    return raw.map(
        canonicalize_records,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        features=build_features(FORMAT_KINDS[fmt]),
        fn_kwargs={"file": file, "fmt": fmt, "first_line": first_line},
        **map_options(raw, num_proc, f"Reading {Path(file).name}"),
    )


def load_source(
    spec: SourceSpec, kind: str | None = None, streaming: bool = False, num_proc: int = 1
) -> Dataset | IterableDataset:
    """Canonical rows (with `_error` rows for bad records) of a file, a folder or a dataset saved to disk."""
    name, start, stop = parse_split(spec.split) if spec.split else ("train", None, None)
    if is_saved_dataset(spec.path):
        saved = datasets.load_from_disk(spec.path)
        if isinstance(saved, DatasetDict):
            if name not in saved:
                raise DataError(f"no split {name!r}; it has {list(saved)}", spec.path)
            saved = saved[name]
        if streaming:
            saved = saved.to_iterable_dataset()
        ds = canonicalize_dataset(select_split(saved, start, stop), spec, kind, spec.path, 1, num_proc)
        return ds
    parts = [load_file(path, spec, kind, streaming, num_proc) for path in find_data_files(spec.path)]
    kinds = {tuple(p.features) for p in parts if p.features is not None}
    if len(kinds) > 1:
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
