"""Held-out evaluation: exact-match accuracy on chat questions and preference accuracy on chosen/rejected pairs.

python -m finetune.evaluate --model DIR [--adapter DIR] --questions eval.jsonl [--preferences pairs.jsonl]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from data_tools import ChatTokenizer, load_tokenizer
from model import DeepseekV3ForCausalLM

from .lora import install_peft_guard


def load_chat_model(path: str | Path, adapter: str | Path | None = None) -> DeepseekV3ForCausalLM:
    """A checkpoint folder in fp32, with a LoRA adapter merged in when given (the folder may itself be an adapter)."""
    path = Path(path)
    if adapter is None and (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base is None:
            raise FileNotFoundError(f"{path}: the adapter does not name its base model; pass the base with --adapter")
        adapter, path = path, Path(base)
    if adapter is not None:
        # The export's checks first: an adapter made for another base is one sentence, not peft's state_dict error.
        from .export import check_base, resolve_adapter

        config, _, _, base = check_base(path)
        resolve_adapter(adapter, config, base, str(path))
    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, progress=False)
    if adapter is not None:
        from peft import PeftModel

        install_peft_guard()
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


@torch.no_grad()
def generate(model: DeepseekV3ForCausalLM, prompts: list[list[int]], eos_id: int, max_new_tokens: int = 8) -> list:
    """Greedy completions (token ids, eos excluded); prompts of equal length run as one batch."""
    results: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    for indices in by_length.values():
        ids = torch.tensor([prompts[i] for i in indices])  # [B, S]
        done = torch.zeros(len(indices), dtype=torch.bool)
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]  # [B, V]
            token = logits.argmax(-1)
            for row, i in enumerate(indices):
                if not done[row] and int(token[row]) != eos_id:
                    results[i].append(int(token[row]))
            done |= token == eos_id
            if done.all():
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
    return results


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def chat_accuracy(model: DeepseekV3ForCausalLM, chat: ChatTokenizer, records: list[dict[str, Any]]) -> dict:
    """Exact-match accuracy of greedy answers (overall, facts in the Base's corpus, facts never seen)."""
    prompts = [chat.tokenize_prompt(r["messages"][:-1]) for r in records]
    answers = generate(model, prompts, chat.eos_id)
    correct = [
        chat.tokenizer.decode(a, skip_special_tokens=True).strip() == r["messages"][-1]["content"].strip()
        for a, r in zip(answers, records)
    ]

    def rate(flags: list[bool]) -> float:
        return sum(flags) / len(flags) if flags else float("nan")

    return {
        "accuracy": rate(correct),
        "accuracy_seen": rate([c for c, r in zip(correct, records) if r.get("in_corpus")]),
        "accuracy_unseen": rate([c for c, r in zip(correct, records) if not r.get("in_corpus", True)]),
    }


def plain_text_accuracy(
    model: DeepseekV3ForCausalLM,
    chat: ChatTokenizer,
    records: list[dict[str, Any]],
    before: str = "",
    after: str = " = ",
) -> dict:
    """Exact-match accuracy of greedy completions of the questions as plain text ("a + b = "), no chat template:
    what the Base learned from its corpus. Records are chats "What is a + b?" -> "c". `before` and `after` change
    the text around "a + b" (benchmarks/base_anchoring.py)."""
    prompts, answers = [], []
    for r in records:
        question = r["messages"][0]["content"]
        if not (question.startswith("What is ") and question.endswith("?")):
            raise ValueError(f"plain-text accuracy needs 'What is a + b?' questions, got {question!r}")
        prompts.append([chat.bos_id, *chat.encode_texts([before + question[len("What is ") : -1] + after])[0]])
        answers.append(r["messages"][-1]["content"].strip())
    outputs = generate(model, prompts, chat.eos_id, max_new_tokens=4)
    correct = [chat.tokenizer.decode(o, skip_special_tokens=True).strip() == a for o, a in zip(outputs, answers)]
    seen = [c for c, r in zip(correct, records) if r.get("in_corpus")]
    unseen = [c for c, r in zip(correct, records) if not r.get("in_corpus", True)]
    return {
        "plain_accuracy_seen": sum(seen) / len(seen) if seen else float("nan"),
        "plain_accuracy_unseen": sum(unseen) / len(unseen) if unseen else float("nan"),
    }


@torch.no_grad()
def completion_logps(
    model: DeepseekV3ForCausalLM, pairs: list[tuple[list[int], list[int]]], batch_size: int = 64
) -> list[float]:
    """Sum of log p(completion | prompt) for each (prompt, completion); pairs of the same lengths share a forward,
    with logits only at the completion's positions."""
    results = [0.0] * len(pairs)
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (prompt, completion) in enumerate(pairs):
        by_shape[len(prompt), len(completion)].append(i)
    for (prompt_len, completion_len), indices in by_shape.items():
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            ids = torch.tensor([pairs[i][0] + pairs[i][1] for i in rows])  # [B, P + C]
            logits = model(input_ids=ids, logits_to_keep=completion_len + 1).logits[:, :-1].float()  # [B, C, V]
            scores = logits.log_softmax(-1).gather(2, ids[:, prompt_len:, None]).squeeze(-1).sum(-1)  # [B]
            for row, i in enumerate(rows):
                results[i] = float(scores[row])
    return results


def preference_accuracy(model: DeepseekV3ForCausalLM, chat: ChatTokenizer, records: list[dict[str, Any]]) -> float:
    """Fraction of pairs where the model gives the chosen answer a higher log-probability than the rejected one."""
    pairs = []
    for r in records:
        pairs += chat.tokenize_completions([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
    scores = completion_logps(model, pairs)
    return sum(chosen > rejected for chosen, rejected in zip(scores[::2], scores[1::2])) / len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder, or an adapter folder")
    parser.add_argument("--adapter", help="LoRA adapter to merge into --model")
    parser.add_argument("--questions", required=True, help="JSONL of chats whose last message is the answer")
    parser.add_argument("--preferences", help="JSONL of prompt/chosen/rejected pairs")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else the packaged one)")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    tokenizer = load_tokenizer(args.tokenizer or (str(model_dir) if (model_dir / "tokenizer.json").is_file() else None))
    chat = ChatTokenizer(tokenizer)
    model = load_chat_model(model_dir, args.adapter)
    result = chat_accuracy(model, chat, read_jsonl(args.questions))
    if args.preferences:
        result["preference_accuracy"] = preference_accuracy(model, chat, read_jsonl(args.preferences))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
