"""How far a demo Base's plain-text arithmetic survives text before or around the fact.

    python benchmarks/base_anchoring.py --model outputs/demo/seed0/base --questions outputs/demo/seed0/data/eval.jsonl

For each held-out question "What is a + b?" the Base completes `a + b = ` greedily
(`finetune.evaluate.plain_text_accuracy`), then the same with text before the fact or another ending; prints the
accuracy on facts in the corpus / never seen (docs/demo.md quotes their mean: the demo's 100 + 100 questions). The
measurement behind docs/demo.md (sixth round): the demo's Bases answered 91.5% as is and 20% after a single newline,
so the chat format's four tokens before the first operand are something SFT has to re-route, not only the answer token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools import ChatTokenizer, load_tokenizer
from finetune.evaluate import load_chat_model, plain_text_accuracy, read_jsonl

# name: (text before "a + b", text after it)
VARIANTS = {
    "as trained: a + b = ": ("", " = "),
    "one newline first": ("\n", " = "),
    "three newlines first (one token)": ("\n\n\n", " = "),
    "another fact first": ("3 + 4 = 7\n", " = "),
    "'What is ' first": ("What is ", " = "),
    "'?' instead of ' = '": ("", "?"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Base (or any checkpoint) folder")
    parser.add_argument("--questions", required=True, help="the demo's eval.jsonl ('What is a + b?' chats)")
    args = parser.parse_args(argv)
    chat = ChatTokenizer(load_tokenizer())
    records = read_jsonl(args.questions)
    model = load_chat_model(args.model)
    result = {}
    for name, (before, after) in VARIANTS.items():
        rates = plain_text_accuracy(model, chat, records, before, after)
        result[name] = rates
        print(f"{name:36s} {100 * rates['plain_accuracy_seen']:5.1f}% / {100 * rates['plain_accuracy_unseen']:5.1f}%")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
