"""Tokenize + pack throughput: data_tools against trl's own SFT preprocessing, on the same demo data.

    .venv/bin/python benchmarks/data_prep.py [--num-train 20000] [--max-length 512] [--num-proc 1]

Both start from the same JSONL file of chats and end with packed rows of max_length (BFD). Ours renders the
DeepSeek-V3 format with assistant-only labels; trl renders the same template with apply_chat_template (it cannot
mask assistant turns with this template, which has no {% generation %} markers). Prints tokens/s, the ratio and
our fill ratio.
"""

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
from trl import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from data_tools.pipeline import DataRecipe, build_datasets
from data_tools.sources import SourceSpec
from data_tools.synthetic import build_demo_data, save_jsonl
from data_tools.tokenizer import load_tokenizer


def run_ours(path: Path, tokenizer, max_length: int, num_proc: int) -> tuple[float, int, float]:
    """Seconds, real tokens and fill ratio of data_tools' read+check+tokenize+pack."""
    recipe = DataRecipe(sources=[SourceSpec(str(path))], max_length=max_length, num_proc=num_proc, dedup=False)
    start = time.perf_counter()
    splits, report = build_datasets(recipe, tokenizer)
    seconds = time.perf_counter() - start
    return seconds, sum(report.lengths["train"]), report.fill_ratio["train"]


def run_trl(path: Path, tokenizer, max_length: int, num_proc: int) -> tuple[float, int]:
    """Seconds and real tokens of trl's SFTTrainer._prepare_dataset (load, tokenize, pack with bfd)."""
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_length=max_length,
            packing=True,
            packing_strategy="bfd",
            dataset_num_proc=num_proc if num_proc > 1 else None,
            report_to=[],
            use_cpu=True,
            bf16=False,
        )
    # _prepare_dataset only needs these attributes of the trainer.
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=False)
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    ds = SFTTrainer._prepare_dataset(trainer, ds, tokenizer, args, True, None, "train")
    seconds = time.perf_counter() - start
    return seconds, sum(sum(lengths) for lengths in ds["seq_lengths"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the packaged one)")
    options = parser.parse_args()
    datasets.disable_caching()  # measure the work, not the cache
    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(options.tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sft.jsonl"
        max_operand = int((options.num_train + 200) ** 0.5) + 2
        save_jsonl(build_demo_data(num_train=options.num_train, max_operand=max_operand)["sft"], path)
        datasets.load_dataset("json", data_files=str(path), split="train")  # warm the raw-file cache for both
        datasets.load_dataset("text", data_files=str(path), split="train", encoding_errors="replace")
        ours_s, ours_tokens, fill = run_ours(path, tokenizer, options.max_length, options.num_proc)
        trl_s, trl_tokens = run_trl(path, tokenizer, options.max_length, options.num_proc)
    ours_rate, trl_rate = ours_tokens / ours_s, trl_tokens / trl_s
    print(f"examples: {options.num_train}, max_length {options.max_length}, num_proc {options.num_proc}")
    print(f"data_tools: {ours_tokens} tokens in {ours_s:.2f}s = {ours_rate:,.0f} tokens/s, fill ratio {fill:.2%}")
    print(f"trl       : {trl_tokens} tokens in {trl_s:.2f}s = {trl_rate:,.0f} tokens/s")
    print(f"ratio (data_tools / trl): {ours_rate / trl_rate:.2f}x")


if __name__ == "__main__":
    main()
