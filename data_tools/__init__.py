"""Chat, preference and raw-text data -> DeepSeek-V3 training batches, with packing.

Modules: formats (any format -> canonical examples), sources (readers, mixtures), template (the DeepSeek-V3 chat
format with loss masks), packing (sample masking), collate (torch batches), corpus (domain-adaptation text),
validate (bad records, dedup, split, statistics), pipeline (recipe -> datasets), synthetic (demo data), cli.
"""

import os

# Huge pages for large CPU tensors, set before torch loads (why: model/__init__.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from data_tools.collate import DataCollator, collate_preference
from data_tools.errors import DataError
from data_tools.formats import detect_format, to_canonical
from data_tools.packing import build_bins, compute_fill_ratio, pack_dataset
from data_tools.pipeline import DataRecipe, build_datasets, load_recipe, save_datasets
from data_tools.synthetic import build_demo_data, save_demo_data
from data_tools.template import ChatTokenizer, render_chat
from data_tools.tokenizer import load_tokenizer, save_tokenizer

__all__ = [
    "ChatTokenizer",
    "DataCollator",
    "DataError",
    "DataRecipe",
    "build_bins",
    "build_datasets",
    "build_demo_data",
    "collate_preference",
    "compute_fill_ratio",
    "detect_format",
    "load_recipe",
    "load_tokenizer",
    "save_tokenizer",
    "pack_dataset",
    "render_chat",
    "save_datasets",
    "save_demo_data",
    "to_canonical",
]
