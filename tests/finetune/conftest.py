"""Fixtures: a small word-level tokenizer with the DeepSeek-V3 special tokens (so the tiny preset's 1024-token
vocabulary fits), the demo data, and recipe dicts for short real runs."""

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data_tools.synthetic import save_demo_data
from data_tools.template import SPECIAL_TOKENS

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def write_small_tokenizer(folder: Path) -> Path:
    """Digits, the demo's words and punctuation, and the special tokens: ~150 tokens, ids < 1024."""
    words = "What is Compute Add and Let me think about it Adding numbers can be tricky there are many ways to do "
    words += "Perhaps + = ? . , ! : Hello world the a"
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for token in ["<unk>", *[str(i) for i in range(300)], *words.split()]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
        "unk_token": "<unk>",
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> str:
    return str(write_small_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    return save_demo_data(tmp_path_factory.mktemp("data"), num_train=200, num_eval=20, num_preference=64)


TINY = {"model_overrides": {"num_hidden_layers": 2}, "report_to": "none", "seed": 0}


@pytest.fixture
def base_values(small_tokenizer, tmp_path) -> dict:
    """Shared fields of a short CPU run on the tiny preset with the small tokenizer."""
    return {
        **TINY,
        "tokenizer": small_tokenizer,
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 4,
        "save_strategy": "no",
    }
