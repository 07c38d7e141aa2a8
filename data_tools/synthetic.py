"""Demo data made by code (deterministic from a seed): arithmetic chat SFT, held-out eval questions, preference
pairs and a small plain-text domain corpus, so the demo needs no download."""

import json
import random
from pathlib import Path
from typing import Any

QUESTION_TEMPLATES = ("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "Add {a} and {b}.")
RAMBLING = "Let me think about it. Adding numbers can be tricky, and there are many ways to do it. Perhaps {c}?"
# The demo's SFT data answers one template (chatty_template) in this form, with a period: a format flaw SFT copies
# and DPO removes (the answer's format, not its sum; the period is one token the Base has never seen).
CHATTY = "{c}."


def build_pairs(max_operand: int, seed: int) -> list[tuple[int, int]]:
    """Every (a, b) with 0 <= a, b < max_operand, in a seeded order."""
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(pairs)
    return pairs


def build_chat(a: int, b: int, template: str, answer: str = "{c}") -> dict[str, Any]:
    """One arithmetic question and its answer as a chat."""
    return {
        "messages": [
            {"role": "user", "content": template.format(a=a, b=b)},
            {"role": "assistant", "content": answer.format(c=a + b)},
        ]
    }


def fact_segments(pairs: list[tuple[int, int]], rng: random.Random, records: int, max_facts: int) -> list[dict]:
    """Plain-text records of 1 to `max_facts` facts "a + b = c", one per line, drawn at random (each record a new
    draw), as segments with the loss on each answer (and on the end of the text after the last one). Facts thus sit
    at every position of a sample and after other text, so the Base's sums do not depend on where a fact starts."""
    out = []
    for _ in range(records):
        segments = []
        for k, (a, b) in enumerate(pairs[rng.randrange(len(pairs))] for _ in range(rng.randint(1, max_facts))):
            if k:
                segments.append({"text": "\n", "label": False})
            segments += [{"text": f"{a} + {b} = ", "label": False}, {"text": str(a + b), "label": True}]
        out.append({"segments": segments})
    return out


def build_demo_data(
    num_train: int = 2000,
    num_eval: int = 200,
    num_preference: int = 500,
    max_operand: int = 100,
    seed: int = 0,
    num_corpus_only: int = 0,
    corpus_records: int = 0,
    max_facts: int = 4,
    eval_templates: str = "first",
    chatty_template: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Records of each demo file: sft, eval (disjoint questions, half of them in the corpus), preference, corpus
    (paragraphs of plain text) and facts (the same facts as plain-text prompt/completion records).

    The corpus states the facts "a + b = c" of the training pairs, of half of the eval pairs and of
    `num_corpus_only` further pairs, so the demo can report accuracy on eval facts seen in the corpus against facts
    never seen.

    `corpus_records` > 0 adds "corpus_segments": that many records of 1 to `max_facts` corpus facts (fact_segments).
    `eval_templates` "all" asks the held-out questions in every template (in turn) instead of the first only.
    `chatty_template` (an index into QUESTION_TEMPLATES) answers the SFT chats of that template in the CHATTY voice.
    """
    pairs = build_pairs(max_operand, seed)
    needed = num_train + num_eval + num_corpus_only
    if needed > len(pairs):
        raise ValueError(f"{needed} distinct sums need max_operand >= {int(needed**0.5) + 1}")
    rng = random.Random(seed + 1)
    train_pairs, eval_pairs = pairs[:num_train], pairs[num_train : num_train + num_eval]
    corpus_only = pairs[num_train + num_eval : needed]
    sft = []
    for a, b in train_pairs:
        k = rng.randrange(len(QUESTION_TEMPLATES))
        sft.append(build_chat(a, b, QUESTION_TEMPLATES[k], CHATTY if k == chatty_template else "{c}"))
    seen = set(eval_pairs[: num_eval // 2])
    evaluation = []
    for i, (a, b) in enumerate(eval_pairs):
        template = QUESTION_TEMPLATES[(i // 2) % len(QUESTION_TEMPLATES) if eval_templates == "all" else 0]
        evaluation.append({**build_chat(a, b, template), "in_corpus": (a, b) in seen})
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
    data = {"sft": sft, "eval": evaluation, "preference": preference, "corpus": corpus, "facts": completions}
    if corpus_records:
        data["corpus_segments"] = fact_segments(corpus_pairs, random.Random(seed + 2), corpus_records, max_facts)
    return data


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
    names = ("sft", "eval", "preference", "facts", "corpus_segments")
    paths = {name: folder / f"{name}.jsonl" for name in names if name in data}
    for name, path in paths.items():
        save_jsonl(data[name], path)
    paths["corpus"] = folder / "corpus.txt"
    paths["corpus"].write_text("\n\n".join(r["text"] for r in data["corpus"]) + "\n", encoding="utf-8")
    return paths
