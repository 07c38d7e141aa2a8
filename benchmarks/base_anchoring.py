"""How far a demo Base's plain-text arithmetic survives text before or around the fact.

    python benchmarks/base_anchoring.py --model outputs/demo/seed0/base --questions outputs/demo/seed0/data/eval.jsonl

For each held-out question "What is a + b?" the Base completes `a + b = ` greedily (exact match, as
`finetune.evaluate.plain_text_accuracy`), then the same with a prefix before the fact or another ending. The measurement
behind docs/demo.md (sixth round): the demo's Bases answered 91.5% as is and 20% after a single newline, so the chat
format's four tokens before the first operand are something SFT has to re-route, not only the answer token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools import ChatTokenizer, load_tokenizer
from finetune.evaluate import generate, load_chat_model, read_jsonl

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
    facts, answers = [], []
    for r in records:
        question = r["messages"][0]["content"]
        if not (question.startswith("What is ") and question.endswith("?")):
            raise SystemExit(f"{args.questions}: expected 'What is a + b?' questions, got {question!r}")
        facts.append(question[len("What is ") : -1])
        answers.append(r["messages"][-1]["content"].strip())
    result = {}
    for name, (before, after) in VARIANTS.items():
        prompts = [[chat.bos_id, *chat.encode_texts([before + fact + after])[0]] for fact in facts]
        outputs = generate(model, prompts, chat.eos_id, max_new_tokens=4)
        right = sum(chat.tokenizer.decode(o, skip_special_tokens=True).strip() == a for o, a in zip(outputs, answers))
        result[name] = right / len(answers)
        print(f"{name:36s} {100 * result[name]:5.1f}%")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
