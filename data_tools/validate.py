"""Bad-record handling, exact-duplicate removal, deterministic train/eval split and the statistics we report."""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset

from data_tools.errors import DataError

PRIVATE_COLUMNS = ("_error", "_field", "_reason", "_ignored")


@dataclass
class DataReport:
    """What happened to the data: counts, skips and drops with their reasons, lengths, fill ratio."""

    records: Counter = field(default_factory=Counter)  # source -> records read
    skipped: Counter = field(default_factory=Counter)  # reason -> bad records skipped (skip_invalid)
    dropped: Counter = field(default_factory=Counter)  # reason -> good records left out (duplicates, too long)
    truncated: int = 0
    examples: dict[str, int] = field(default_factory=dict)  # split -> tokenized examples
    rows: dict[str, int] = field(default_factory=dict)  # split -> packed rows or blocks
    lengths: dict[str, list[int]] = field(default_factory=dict)  # split -> token length of each example
    fill_ratio: dict[str, float] = field(default_factory=dict)  # split -> real tokens / row capacity
    first_errors: list[str] = field(default_factory=list)  # a few skipped records, as printed errors
    ignored: Counter = field(default_factory=Counter)  # (file, record key) -> records whose key nothing read
    control_strings: int = 0  # examples with control-token strings inside their text (kept as text)
    notes: list[str] = field(default_factory=list)  # warnings: empty files skipped, texts read as one document

    def summary_of_losses(self) -> str:
        """What removed the records, in one phrase."""
        parts = [f"{sum(self.records.values()) + sum(self.skipped.values())} records read"]
        if self.skipped:
            parts.append(f"skipped {dict(self.skipped)}")
        if self.dropped:
            parts.append(f"dropped {dict(self.dropped)}")
        return ", ".join(parts)

    def warnings(self) -> list[str]:
        """What the data lost or changed that the user should know: unused fields, control strings, notes."""
        lines = []
        for file, keys in self.ignored_by_file().items():
            counts = ", ".join(f"{key} ({count})" for key, count in keys.items())
            lines.append(f"{file}: fields not used (records): {counts}")
        if self.control_strings:
            lines.append(
                f"{self.control_strings} examples hold control-token strings (e.g. <｜Assistant｜>) in their text; "
                "they are trained as text (parse_special_tokens: true makes them control tokens)"
            )
        return lines + self.notes

    def ignored_by_file(self) -> dict[str, dict[str, int]]:
        """file -> {key: records} of the record keys that were not used."""
        out: dict[str, dict[str, int]] = {}
        for (file, key), count in sorted(self.ignored.items()):
            out.setdefault(file, {})[key] = count
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (lengths as percentiles)."""
        return {
            "records": dict(self.records),
            "skipped": dict(self.skipped),
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "examples": self.examples,
            "rows": self.rows,
            "token_lengths": {split: build_percentiles(lengths) for split, lengths in self.lengths.items()},
            "fill_ratio": self.fill_ratio,
            "ignored_fields": self.ignored_by_file(),
            "control_token_strings": self.control_strings,
            "notes": self.notes,
        }

    def format(self) -> str:
        """Human-readable summary, one fact a line."""
        lines = [f"records read: {sum(self.records.values())}"]
        lines += [f"  {source}: {count}" for source, count in self.records.items()]
        lines.append(f"skipped (bad records): {sum(self.skipped.values())} {dict(self.skipped) or ''}".rstrip())
        lines += [f"  {error}" for error in self.first_errors]
        lines.append(f"dropped: {sum(self.dropped.values())} {dict(self.dropped) or ''}".rstrip())
        lines.append(f"truncated: {self.truncated}")
        lines += [f"warning: {warning}" for warning in self.warnings()]
        for split, count in self.examples.items():
            lines.append(f"{split}: {count} examples")
            if self.lengths.get(split):
                stats = build_percentiles(self.lengths[split])
                lines.append("  tokens: " + ", ".join(f"{k} {v:g}" for k, v in stats.items()))
            if split in self.rows:
                lines.append(f"  rows: {self.rows[split]}")
            if split in self.fill_ratio:
                lines.append(f"  fill ratio: {self.fill_ratio[split]:.2%}")
        return "\n".join(lines)


def read_column(ds: Dataset, name: str) -> list:
    """One column as a Python list, read through Arrow (row-by-row formatting is far slower)."""
    return ds.with_format("arrow")[name].to_pylist()


def build_percentiles(lengths: list[int]) -> dict[str, float]:
    """Count, total, mean and p50/p90/p95/p99/max of token lengths."""
    if not lengths:
        return {"count": 0}
    values = np.asarray(lengths)
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {
        "count": len(values),
        "total": int(values.sum()),
        "mean": round(float(values.mean()), 1),
        "p50": float(p50),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
        "max": int(values.max()),
    }


def build_data_error(row: dict[str, Any]) -> DataError:
    """The DataError for a row that carries an error."""
    return DataError(
        row["_error"], row.get("_file"), row.get("_line"), row.get("_field"), row.get("_reason") or "error"
    )


def drop_bad_records(
    ds: Dataset | IterableDataset, report: DataReport, skip_invalid: bool, drop_reasons: frozenset[str] = frozenset()
) -> Dataset | IterableDataset:
    """Raise the first bad record's DataError, or (skip_invalid) drop bad records and count them by reason.

    Rows whose reason is in `drop_reasons` (e.g. too_long when asked to drop) are left out and counted as dropped.
    """
    if isinstance(ds, IterableDataset):

        def keep(row: dict[str, Any]) -> bool:
            for key in row.get("_ignored") or []:
                report.ignored[(row["_file"], key)] += 1
            if row["_error"] is None:
                return True
            if row["_reason"] == "blank":
                return False
            if row["_reason"] in drop_reasons:
                report.dropped[row["_reason"]] += 1
                return False
            if not skip_invalid:
                raise build_data_error(row)
            report.skipped[row["_reason"]] += 1
            if len(report.first_errors) < 5:
                report.first_errors.append(str(build_data_error(row)))
            return False

        # Tokenized streaming rows have no declared features: they carry the error columns but never `_ignored`.
        names = ds.column_names if ds.column_names is not None else PRIVATE_COLUMNS[:3]
        return ds.filter(keep).remove_columns([c for c in PRIVATE_COLUMNS if c in names])
    if "_ignored" in ds.column_names:
        for file, keys in zip(read_column(ds, "_file"), read_column(ds, "_ignored")):
            for key in keys or []:
                report.ignored[(file, key)] += 1
    reasons = read_column(ds, "_reason")
    bad = [i for i, reason in enumerate(reasons) if reason is not None]
    if bad:
        quiet = {i for i in bad if reasons[i] == "blank" or reasons[i] in drop_reasons}
        for i in quiet:
            if reasons[i] != "blank":
                report.dropped[reasons[i]] += 1
        real = [i for i in bad if i not in quiet]
        if real and not skip_invalid:
            raise build_data_error(ds[real[0]])
        for i in real:
            report.skipped[reasons[i]] += 1
        report.first_errors.extend(str(build_data_error(ds[i])) for i in real[: max(0, 5 - len(report.first_errors))])
        bad_set = set(bad)
        ds = ds.select([i for i in range(len(ds)) if i not in bad_set])
    return ds.remove_columns([c for c in PRIVATE_COLUMNS if c in ds.column_names])


def build_example_hash(row: dict[str, Any], columns: list[str]) -> str:
    """Stable hash of a row's content columns (not its location)."""
    payload = json.dumps([row[c] for c in columns], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(payload.encode("utf-8", "surrogatepass")).hexdigest()


def hash_batch(batch: dict[str, list], columns: list[str]) -> dict[str, list]:
    """Batched content hashes for dedup and split."""
    rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
    return {"_hash": [build_example_hash(row, columns) for row in rows]}


def add_hashes(ds: Dataset, num_proc: int = 1) -> Dataset:
    """Add a `_hash` column of the content columns."""
    columns = [c for c in ds.column_names if not c.startswith("_")]
    if len(ds) == 0:
        return ds.add_column("_hash", [])
    return ds.map(hash_batch, batched=True, fn_kwargs={"columns": columns}, num_proc=num_proc, desc="Hashing")


def remove_duplicates(datasets_: list[Dataset], report: DataReport) -> list[Dataset]:
    """Keep the first occurrence of each exact duplicate, within and across datasets that have `_hash`."""
    seen: set[str] = set()
    result = []
    for ds in datasets_:
        keep = []
        for i, digest in enumerate(read_column(ds, "_hash")):
            if digest not in seen:
                seen.add(digest)
                keep.append(i)
        if len(keep) < len(ds):
            report.dropped["duplicate"] += len(ds) - len(keep)
            ds = ds.select(keep)
        result.append(ds)
    return result


def split_by_hash(ds: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, eval): an example goes to eval when its seeded content hash falls below eval_fraction."""
    digests = read_column(ds, "_hash")
    to_eval = [int(hashlib.sha1(f"{seed}:{d}".encode()).hexdigest()[:12], 16) / 16**12 < eval_fraction for d in digests]
    train = [i for i, e in enumerate(to_eval) if not e]
    held = [i for i, e in enumerate(to_eval) if e]
    return ds.select(train), ds.select(held)
