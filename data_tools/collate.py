"""Collators: packed rows or unpacked examples -> torch batches for the trainers."""

from dataclasses import dataclass
from typing import Any

import torch

from data_tools.packing import build_cu_seqlens
from data_tools.template import IGNORE_INDEX


@dataclass
class DataCollator:
    """Batches for causal-LM training.

    - packed rows (with position_ids): stacked as they are, [B, max_length]; no attention_mask, the model derives
      the block-diagonal mask from position_ids restarting at 0;
    - unpacked examples: right-padded to the longest, with attention_mask and position_ids;
    - padding_free=True: every sample of the batch concatenated into one row [1, T], padding dropped, positions
      restarting per sample.
    With return_cu_seqlens, `cu_seqlens` (int32, over the flattened batch) and `max_seqlen` are added for varlen
    attention kernels.
    """

    pad_id: int = 1
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    return_cu_seqlens: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return self.collate_padding_free(examples)
        if "position_ids" in examples[0]:
            return self.collate_packed(examples)
        return self.collate_padded(examples)

    def collate_packed(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack packed rows of equal length."""
        batch = {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels", "position_ids")}
        if self.return_cu_seqlens:
            width = batch["input_ids"].shape[1]
            lengths = [n for e in examples for n in self.runs(e, width)]
            self.add_cu_seqlens(batch, lengths)
        elif bool((batch["position_ids"] == torch.arange(batch["position_ids"].shape[1])).all()):
            # Every row one run (corpus blocks): plain causal attention, decided here on the host, so that the model
            # on an accelerator does not build a mask it cannot ask about (model.attention.build_attention_mask).
            del batch["position_ids"]
        return batch

    def collate_padded(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad unpacked examples to the longest."""
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_id)
        labels = torch.full((len(examples), width), IGNORE_INDEX)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e.get("labels", e["input_ids"]))
            attention_mask[row, :n] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if bool(attention_mask.all()):  # no padding: plain causal attention (see collate_packed)
            return {"input_ids": input_ids, "labels": labels}
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }

    def collate_padding_free(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Concatenate the real tokens of every sample into one row."""
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        lengths: list[int] = []
        for e in examples:
            sample_lengths = e.get("seq_lengths") or [len(e["input_ids"])]
            used = sum(sample_lengths)  # packed rows: what follows the samples is padding
            sample_labels = e.get("labels", e["input_ids"])
            input_ids.extend(e["input_ids"][:used])
            labels.extend(sample_labels[:used])
            for length in sample_lengths:
                position_ids.extend(range(length))
            lengths.extend(sample_lengths)
        starts = build_cu_seqlens(lengths)[:-1]
        for start in starts:
            labels[start] = IGNORE_INDEX  # never train a sample's first token on the previous sample
        batch = {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([position_ids]),
        }
        if self.return_cu_seqlens:
            self.add_cu_seqlens(batch, lengths)
        return batch

    @staticmethod
    def runs(example: dict[str, Any], width: int) -> list[int]:
        """Lengths of the position runs of a packed row: its samples, then the padding."""
        lengths = list(example.get("seq_lengths") or [width])
        if sum(lengths) < width:
            lengths.append(width - sum(lengths))
        return lengths

    @staticmethod
    def add_cu_seqlens(batch: dict[str, torch.Tensor], lengths: list[int]) -> None:
        """cu_seqlens and max_seqlen over the flattened batch."""
        batch["cu_seqlens"] = torch.tensor(build_cu_seqlens(lengths), dtype=torch.int32)
        batch["max_seqlen"] = torch.tensor(max(lengths))


def collate_preference(examples: list[dict[str, Any]], pad_id: int = 1) -> dict[str, torch.Tensor]:
    """DPO batch like trl's DataCollatorForPreference: chosen rows then rejected rows, with completion_mask."""
    sequences = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + [
        e["prompt_ids"] + e["rejected_ids"] for e in examples
    ]
    masks = [[0] * len(e["prompt_ids"]) + [1] * len(e["chosen_ids"]) for e in examples] + [
        [0] * len(e["prompt_ids"]) + [1] * len(e["rejected_ids"]) for e in examples
    ]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        completion_mask[row, : len(seq)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
