"""Packing with sample masking: whole samples packed into fixed-length rows by best-fit decreasing.

A packed row holds `input_ids`, `labels` and `position_ids` of length max_length, and `seq_lengths` (the samples'
lengths; padding, if any, is the rest of the row). position_ids restart at 0 for each sample and for the padding,
which is how the model knows where one sample ends: it attends within runs of increasing positions only.
Every sample's first label is -100, so no token is ever trained to follow another sample.
"""

from bisect import bisect_left, insort
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset, IterableDataset

from data_tools.template import IGNORE_INDEX


def build_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into bins of at most max_length tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    open_bins: list[tuple[int, int]] = []  # (free space, bin), sorted: the best fit is the first with enough space
    bins: list[list[int]] = []
    for i in order:
        length = lengths[i]
        if length > max_length:
            raise ValueError(f"sample of {length} tokens does not fit in max_length {max_length}")
        pos = bisect_left(open_bins, (length, -1))
        if pos < len(open_bins):
            space, b = open_bins.pop(pos)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        space -= length
        if space > 0:
            insort(open_bins, (space, b))
    return bins


def build_packed_row(
    samples: list[tuple[list[int], list[int]]], max_length: int, pad_id: int, pad: bool = True
) -> dict[str, list[int]]:
    """One row from (input_ids, labels) samples; padded to max_length when `pad`."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ids, sample_labels in samples:
        input_ids.extend(ids)
        labels.extend([IGNORE_INDEX, *sample_labels[1:]])
        position_ids.extend(range(len(ids)))
    seq_lengths = [len(ids) for ids, _ in samples]
    if pad and len(input_ids) < max_length:
        rest = max_length - len(input_ids)
        input_ids.extend([pad_id] * rest)
        labels.extend([IGNORE_INDEX] * rest)
        position_ids.extend(range(rest))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lengths": seq_lengths}


def pack_batch(batch: dict[str, list], max_length: int, pad_id: int, pad: bool) -> dict[str, list]:
    """Batched map function: a batch of tokenized samples -> packed rows."""
    bins = build_bins([len(ids) for ids in batch["input_ids"]], max_length)
    rows = [
        build_packed_row([(batch["input_ids"][i], batch["labels"][i]) for i in b], max_length, pad_id, pad)
        for b in bins
    ]
    return {key: [row[key] for row in rows] for key in ("input_ids", "labels", "position_ids", "seq_lengths")}


def pack_dataset(
    ds: Dataset | IterableDataset,
    max_length: int,
    pad_id: int = 1,
    pad: bool = True,
    num_proc: int = 1,
    batch_size: int = 20_000,
) -> Dataset | IterableDataset:
    """Pack a tokenized dataset (input_ids, labels) into rows; each map batch of `batch_size` samples is packed
    on its own, so streaming works and several processes can pack in parallel."""
    columns = ds.column_names if ds.column_names is not None else ["input_ids", "labels"]
    kwargs: dict[str, Any] = {}
    if isinstance(ds, Dataset):
        kwargs = {"num_proc": num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None, "desc": "Packing"}
    return ds.map(
        pack_batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=columns,
        fn_kwargs={"max_length": max_length, "pad_id": pad_id, "pad": pad},
        **kwargs,
    )


def compute_fill_ratio(ds: Dataset, max_length: int) -> float:
    """Share of the rows' capacity holding real tokens."""
    if len(ds) == 0:
        return 0.0
    real = pc.sum(pc.list_flatten(ds.with_format("arrow")["seq_lengths"])).as_py() or 0
    return real / (len(ds) * max_length)


def build_cu_seqlens(seq_lengths: list[int], total: int | None = None) -> list[int]:
    """Cumulative sequence boundaries [0, l1, l1+l2, ...], ending at `total` (the padding as a last run)."""
    bounds = [0]
    for length in seq_lengths:
        bounds.append(bounds[-1] + length)
    if total is not None and bounds[-1] < total:
        bounds.append(total)
    return bounds
