"""Domain-adaptation corpora: raw text -> token ids, each document followed by eos, cut into blocks."""

from typing import Any

from datasets import Dataset, IterableDataset

from data_tools.template import IGNORE_INDEX, ChatTokenizer


def tokenize_text_batch(batch: dict[str, list], chat: ChatTokenizer) -> dict[str, list]:
    """Batched map function: documents -> ids with eos appended."""
    return {"input_ids": [ids + [chat.eos_id] for ids in chat.encode_texts(batch["text"])]}


def build_blocks_batch(batch: dict[str, list], block_size: int, pad_id: int) -> dict[str, list]:
    """Batched map function: concatenate the batch's documents and cut blocks of block_size; the last block of the
    batch is padded rather than dropped. Attention spans documents within a block, as in pre-training."""
    stream = [token for ids in batch["input_ids"] for token in ids]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for start in range(0, len(stream), block_size):
        ids = stream[start : start + block_size]
        rest = block_size - len(ids)
        rows["input_ids"].append(ids + [pad_id] * rest)
        rows["labels"].append([IGNORE_INDEX, *ids[1:]] + [IGNORE_INDEX] * rest)
        rows["position_ids"].append(list(range(len(ids))) + list(range(rest)))
        rows["seq_lengths"].append([len(ids)])
    return rows


def build_corpus_blocks(
    ds: Dataset | IterableDataset, chat: ChatTokenizer, block_size: int, num_proc: int = 1, batch_size: int = 10_000
) -> Dataset | IterableDataset:
    """Text rows ({"text"}) -> blocks {input_ids, labels, position_ids, seq_lengths} of block_size tokens."""
    kwargs: dict[str, Any] = {}
    if isinstance(ds, Dataset):
        kwargs = {
            "num_proc": num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
            "load_from_cache_file": False,
        }
    columns = ds.column_names if ds.column_names is not None else ["text"]
    tokens = ds.map(tokenize_text_batch, batched=True, remove_columns=columns, fn_kwargs={"chat": chat}, **kwargs)
    return tokens.map(
        build_blocks_batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=["input_ids"],
        fn_kwargs={"block_size": block_size, "pad_id": chat.eos_id},
        **kwargs,
    )
