"""Demo data made by code (deterministic from a seed): arithmetic chat SFT, held-out eval questions, preference
pairs and a small plain-text domain corpus, so the demo needs no download."""

import json
import random
from pathlib import Path
from typing import Any

QUESTION_TEMPLATES = ("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "Add {a} and {b}.")
RAMBLING = "Let me think about it. Adding numbers can be tricky, and there are many ways to do it. Perhaps {c}?"


def build_pairs(max_operand: int, seed: int) -> list[tuple[int, int]]:
    """Every (a, b) with 0 <= a, b < max_operand, in a seeded order."""
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(pairs)
    return pairs


def build_chat(a: int, b: int, template: str) -> dict[str, Any]:
    """One arithmetic question and its answer as a chat."""
    return {
        "messages": [
            {"role": "user", "content": template.format(a=a, b=b)},
            {"role": "assistant", "content": str(a + b)},
        ]
    }


def build_demo_data(
    num_train: int = 2000,
    num_eval: int = 200,
    num_preference: int = 500,
    max_operand: int = 100,
    seed: int = 0,
    num_corpus_only: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Records of each demo file: sft, eval (disjoint questions, half of them in the corpus), preference, corpus
    (paragraphs of plain text) and facts (the same facts as plain-text prompt/completion records).

    The corpus states the facts "a + b = c" of the training pairs, of half of the eval pairs and of
    `num_corpus_only` further pairs, so the demo can report accuracy on eval facts seen in the corpus against facts
    never seen.
    """
    pairs = build_pairs(max_operand, seed)
    needed = num_train + num_eval + num_corpus_only
    if needed > len(pairs):
        raise ValueError(f"{needed} distinct sums need max_operand >= {int(needed**0.5) + 1}")
    rng = random.Random(seed + 1)
    train_pairs, eval_pairs = pairs[:num_train], pairs[num_train : num_train + num_eval]
    corpus_only = pairs[num_train + num_eval : needed]
    sft = [build_chat(a, b, rng.choice(QUESTION_TEMPLATES)) for a, b in train_pairs]
    seen = set(eval_pairs[: num_eval // 2])
    evaluation = [{**build_chat(a, b, QUESTION_TEMPLATES[0]), "in_corpus": (a, b) in seen} for a, b in eval_pairs]
    preference = []
    for i in range(num_preference):
        a, b = train_pairs[i % len(train_pairs)]
        wrong = a + b + rng.choice([-2, -1, 1, 2, 10])
        rejected = str(wrong) if i % 2 == 0 else RAMBLING.format(c=wrong)
        preference.append(
            {
                "prompt": [{"role": "user", "content": rng.choice(QUESTION_TEMPLATES).format(a=a, b=b)}],
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    corpus_pairs = train_pairs + sorted(seen) + corpus_only
    rng.shuffle(corpus_pairs)
    facts = [f"{a} + {b} = {a + b}." for a, b in corpus_pairs]
    corpus = [{"text": " ".join(facts[i : i + 8])} for i in range(0, len(facts), 8)]
    # The prompt ends with the space, so prompt + completion tokenizes as the plain sentence does.
    completions = [{"prompt": f"{a} + {b} = ", "completion": str(a + b)} for a, b in corpus_pairs]
    return {"sft": sft, "eval": evaluation, "preference": preference, "corpus": corpus, "facts": completions}


def save_jsonl(records: list[dict[str, Any]], path: str | Path) -> None:
    """Write records as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def save_demo_data(folder: str | Path, **options: Any) -> dict[str, Path]:
    """Write sft.jsonl, eval.jsonl, preference.jsonl, facts.jsonl (plain-text prompt/completion, for the cpt task
    with `format: text_completion`) and corpus.txt (paragraphs) to `folder`; options go to build_demo_data."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = build_demo_data(**options)
    paths = {name: folder / f"{name}.jsonl" for name in ("sft", "eval", "preference", "facts")}
    for name, path in paths.items():
        save_jsonl(data[name], path)
    paths["corpus"] = folder / "corpus.txt"
    paths["corpus"].write_text("\n\n".join(r["text"] for r in data["corpus"]) + "\n", encoding="utf-8")
    return paths
