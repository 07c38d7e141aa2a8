import json
import random

import torch
from datasets import Dataset

from data_tools.collate import DataCollator, collate_preference
from data_tools.packing import build_bins, compute_fill_ratio, pack_dataset


def build_samples(chat, count=60, seed=0):
    rng = random.Random(seed)
    chats = []
    for _ in range(count):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [
                {"role": "user", "content": "q " * rng.randint(1, 30), "tool_calls": None},
                {"role": "assistant", "content": "a " * rng.randint(1, 40), "tool_calls": None},
            ]
        chats.append(turns)
    return chat.tokenize_chats(chats)


def test_bins_are_best_fit_decreasing():
    lengths = [5, 4, 3, 3, 2, 2, 1]
    bins = build_bins(lengths, 8)
    assert sorted(sum(lengths[i] for i in b) for b in bins) == [4, 8, 8]
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))


def test_packed_row_gives_each_sample_back(chat):
    samples = build_samples(chat)
    max_length = 256
    packed = pack_dataset(Dataset.from_list(samples), max_length)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == max_length
        start = 0
        for length in row["seq_lengths"]:
            piece = slice(start, start + length)
            seen.append((row["input_ids"][piece], row["labels"][piece]))
            assert row["position_ids"][piece] == list(range(length))
            start += length
        assert row["labels"][start:] == [-100] * (max_length - start)
        assert row["position_ids"][start:] == list(range(max_length - start))
    expected = sorted((s["input_ids"], s["labels"]) for s in samples)
    assert sorted(seen) == expected
    assert compute_fill_ratio(packed, max_length) == sum(len(s["input_ids"]) for s in samples) / (
        len(packed) * max_length
    )


def test_collator_packed_padded_and_padding_free(chat):
    samples = build_samples(chat, count=6)
    packed = pack_dataset(Dataset.from_list(samples), 256)
    rows = list(packed)
    batch = DataCollator(return_cu_seqlens=True)(rows)
    assert batch["input_ids"].shape == batch["position_ids"].shape == (len(rows), 256)
    assert int(batch["cu_seqlens"][-1]) == 256 * len(rows)
    padded = DataCollator()(samples[:3])
    width = max(len(s["input_ids"]) for s in samples[:3])
    assert padded["input_ids"].shape == (3, width)
    assert padded["attention_mask"].sum().item() == sum(len(s["input_ids"]) for s in samples[:3])
    assert (padded["labels"][padded["attention_mask"] == 0] == -100).all()
    free = DataCollator(padding_free=True)(rows)
    total = sum(len(s["input_ids"]) for s in samples)
    assert free["input_ids"].shape == (1, total)
    assert (free["position_ids"] == 0).sum().item() == len(samples)
    assert sorted(free["input_ids"][0].tolist()) == sorted(t for s in samples for t in s["input_ids"])


def test_preference_collator_matches_trl(chat):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [
        {"prompt_ids": [0, 5, 6], "chosen_ids": [7, 1], "rejected_ids": [8, 9, 1]},
        {"prompt_ids": [0, 5], "chosen_ids": [7, 1], "rejected_ids": [1]},
    ]
    ours = collate_preference(examples)
    theirs = DataCollatorForPreference(pad_token_id=1)(examples)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key])
    json.dumps(examples)
