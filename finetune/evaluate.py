"""Evaluate a checkpoint: held-out loss and perplexity, generation, exact match, preference accuracy.

dsv3-finetune evaluate --model DIR [--adapter DIR] [--data RECIPE.yaml | FILE ...] [--prompts FILE --out FILE]
                       [--questions FILE] [--preferences FILE] [--lm-eval TASK ... [--lm-eval-include DIR]]

--data: loss and perplexity per trained token, on a stage recipe's eval split (its eval_sources, or the rows its
        eval_fraction holds out; all its sources when it has neither) or on data files in any format data_tools reads;
--prompts: greedy (or sampled) replies to each record's prompt (chat messages, prompt, or text), written as JSONL;
--questions: exact-match accuracy of greedy answers on chats whose last message is the answer;
--preferences: how often the chosen answer gets a higher log-probability than the rejected one;
--lm-eval: lm-evaluation-harness tasks by name, or local task YAMLs with --lm-eval-include DIR.
The result is printed as JSON (a measure with no records is null).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from data_tools import ChatTokenizer, load_tokenizer
from model import DeepseekV3ForCausalLM

from .lora import install_peft_guard


def load_chat_model(
    path: str | Path, adapter: str | Path | None = None, progress: bool = False
) -> DeepseekV3ForCausalLM:
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
    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, progress=progress)
    if adapter is not None:
        from peft import PeftModel

        install_peft_guard()
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


@torch.no_grad()
def generate_tokens(
    model: DeepseekV3ForCausalLM,
    ids: torch.Tensor,
    eos_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    streamer: Any = None,
) -> list[list[int]]:
    """The new tokens of each row of `ids` [B, S] (up to its eos) from the model's generate() with its latent KV
    cache: greedy, or sampled at `temperature` > 0; `streamer` (transformers') sees them as they come."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),  # no padding: prompts of equal length (generate warns otherwise)
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        streamer=streamer,
    )
    rows = out[:, ids.shape[1] :].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def generate(model: DeepseekV3ForCausalLM, prompts: list[list[int]], eos_id: int, max_new_tokens: int = 8) -> list:
    """Greedy completions (token ids, eos excluded); prompts of equal length run as one batch (no padding, so
    batching changes nothing)."""
    results: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    for indices in by_length.values():
        rows = generate_tokens(model, torch.tensor([prompts[i] for i in indices]), eos_id, max_new_tokens)
        for i, row in zip(indices, rows):
            results[i] = row
    return results


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def operands(question: str) -> tuple[int, int]:
    """The two numbers of a demo question ("What is 12 + 7?", "Add 12 and 7.", ...)."""
    numbers = re.findall(r"\d+", question)
    if len(numbers) != 2:
        raise ValueError(f"expected a question with two numbers, got {question!r}")
    return int(numbers[0]), int(numbers[1])


def starts_with(tokens: list[int], chat: ChatTokenizer, text: str) -> bool:
    """The generated `tokens` begin with the tokens of `text` (what follows does not matter: a Base continues)."""
    want = chat.encode_texts([text])[0]
    return tokens[: len(want)] == want


def chat_accuracy(model: DeepseekV3ForCausalLM, chat: ChatTokenizer, records: list[dict[str, Any]]) -> dict:
    """Exact-match accuracy of greedy answers (overall, facts in the Base's corpus, facts never seen); for the demo's
    sums also how often the answer starts with the right sum in any form (`sum_accuracy`) and how often a right sum
    comes in another form than the expected answer (`wordy`: e.g. with a period)."""
    prompts = [chat.tokenize_prompt(r["messages"][:-1]) for r in records]
    answers = generate(model, prompts, chat.eos_id, max_new_tokens=16)
    texts = [chat.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    correct = [t == r["messages"][-1]["content"].strip() for t, r in zip(texts, records)]

    def rate(flags: list[bool]) -> float:
        return sum(flags) / len(flags) if flags else float("nan")

    result = {
        "accuracy": rate(correct),
        "accuracy_seen": rate([c for c, r in zip(correct, records) if r.get("in_corpus")]),
        "accuracy_unseen": rate([c for c, r in zip(correct, records) if not r.get("in_corpus", True)]),
    }
    try:
        sums = [sum(operands(r["messages"][0]["content"])) for r in records]
    except ValueError:
        return result
    right_sum = [starts_with(a, chat, str(c)) for a, c in zip(answers, sums)]
    result["sum_accuracy"] = rate(right_sum)
    result["wordy"] = rate([s and not c for s, c in zip(right_sum, correct)])
    return result


def plain_text_accuracy(
    model: DeepseekV3ForCausalLM,
    chat: ChatTokenizer,
    records: list[dict[str, Any]],
    before: str = "",
    after: str = " = ",
) -> dict:
    """How often the greedy continuation of each question's sum as plain text ("a + b = ", no chat template) starts
    with the right sum's tokens: what the Base learned from its corpus (whatever it writes after the sum).
    `before` and `after` change the text around "a + b" (benchmarks/base_anchoring.py)."""
    prompts, sums = [], []
    for r in records:
        a, b = operands(r["messages"][0]["content"])
        prompts.append([chat.bos_id, *chat.encode_texts([f"{before}{a} + {b}{after}"])[0]])
        sums.append(a + b)
    outputs = generate(model, prompts, chat.eos_id, max_new_tokens=3)
    correct = [starts_with(o, chat, str(c)) for o, c in zip(outputs, sums)]
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


@torch.no_grad()
def heldout_loss(model: DeepseekV3ForCausalLM, data: list[str], tokenizer: Any, batch_size: int = 8) -> dict:
    """Mean loss per trained token and its perplexity over a data recipe's eval split (or its sources) or files."""
    import math

    from tqdm.auto import tqdm

    from data_tools import DataCollator, build_datasets

    recipe = data_recipe_for(data)
    splits, _ = build_datasets(recipe, tokenizer)
    split = "eval" if "eval" in splits else "train"
    dataset = splits[split]
    collate = DataCollator(pad_id=tokenizer.eos_token_id)
    total, count = 0.0, 0
    rows = list(dataset)
    for start in tqdm(range(0, len(rows), batch_size), desc="loss", unit="batch", leave=False):
        batch = collate(rows[start : start + batch_size])
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
        out = model(**inputs, labels=labels, num_items_in_batch=1, return_logits=False)
        total += float(out.lm_loss if out.lm_loss is not None else out.loss)
        count += int(_trained_tokens(labels, batch.get("position_ids")))
    loss = total / count if count else float("nan")
    perplexity = math.exp(loss) if count else float("nan")
    return {"loss": loss, "perplexity": perplexity, "tokens": count, "rows": len(rows), "split": split}


def _trained_tokens(labels: torch.Tensor, position_ids: torch.Tensor | None) -> int:
    """Targets the LM loss counts: the next label is trained and in the same packed sample."""
    from model.modeling import shifted_targets

    segments = None
    if position_ids is not None:
        segments = (position_ids == 0).cumsum(-1)
    return int((shifted_targets(labels, segments, 1) != -100).sum())


def data_recipe_for(data: list[str]):
    """A stage recipe's data section (its eval split when it has one), or data files read as chats or text."""
    import yaml

    from data_tools import DataRecipe

    if len(data) == 1 and data[0].endswith((".yaml", ".yml")):
        values = yaml.safe_load(Path(data[0]).read_text()) or {}
        section = dict(values.get("data", values))
        if section.get("eval_sources"):  # the eval sources alone, as the split to score
            section["sources"], section["eval_sources"], section["eval_fraction"] = section["eval_sources"], [], 0.0
        # else an eval_fraction keeps its hash split: the rows training held out become the "eval" split
        section.pop("replay_sources", None)
        section.update(replay_fraction=0.0, pack=False)
        return DataRecipe.from_dict(section)
    return DataRecipe.from_dict({"sources": list(data), "pack": False, "max_length": 4096})


@torch.no_grad()
def generate_replies(
    model: DeepseekV3ForCausalLM, chat: ChatTokenizer, records: list[dict], max_new_tokens: int, temperature: float
) -> list[dict]:
    """One reply per record (`messages` up to the last user turn, `prompt` as text or messages, or `text`), through
    the model's generate() with its latent KV cache."""
    from tqdm.auto import tqdm

    results = []
    for number, record in enumerate(tqdm(records, desc="generate", unit="prompt", leave=False), 1):
        messages = prompt_messages(record, number)
        ids = torch.tensor([chat.tokenize_prompt(messages)])
        tokens = generate_tokens(model, ids, chat.eos_id, max_new_tokens, temperature)[0]
        results.append({"prompt": messages, "response": chat.tokenizer.decode(tokens, skip_special_tokens=True)})
    return results


def prompt_messages(record: dict, number: int) -> list[dict]:
    """The conversation to answer: a record's messages without a final assistant turn, or its prompt or text."""
    if isinstance(record.get("messages"), list):
        messages = list(record["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if messages:
            return messages
    prompt = record.get("prompt", record.get("text", record.get("instruction")))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return prompt
    raise ValueError(f"prompts line {number}: expected messages, prompt, text or instruction")


def lm_eval_tasks(
    model: DeepseekV3ForCausalLM,
    tokenizer: Any,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-evaluation-harness tasks on our model, through lm_eval's Hugging Face wrapper (HFLM) around the loaded
    model: its tasks by name, or task YAMLs in `include_path` (a local dataset works: dataset_path json)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FileNotFoundError("--lm-eval needs the lm-eval package: pip install 'lm-eval==0.4.13'") from None
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise FileNotFoundError(f"lm-eval has no task {', '.join(unknown)} among its tasks{where}")
    result = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples, bootstrap_iters=0
    )
    out = {"results": result["results"]}
    if log_samples:
        out["samples"] = result["samples"]
    return out


def finite(value: Any) -> Any:
    """NaN (a measure over no records) -> None, so the printed result is valid JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dsv3-finetune evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder, or an adapter folder")
    parser.add_argument("--adapter", help="LoRA adapter to merge into --model")
    parser.add_argument("--data", nargs="+", help="a stage recipe YAML, or data files: held-out loss and perplexity")
    parser.add_argument("--prompts", help="JSONL of prompts to answer (messages, prompt or text)")
    parser.add_argument("--out", help="where --prompts writes its replies (JSONL; default: printed)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="for --prompts")
    parser.add_argument("--temperature", type=float, default=0.0, help="for --prompts; 0 = greedy")
    parser.add_argument("--questions", help="JSONL of chats whose last message is the answer: exact match")
    parser.add_argument("--preferences", help="JSONL of prompt/chosen/rejected pairs: preference accuracy")
    parser.add_argument("--lm-eval", nargs="+", metavar="TASK", help="lm-evaluation-harness tasks (pip lm-eval)")
    parser.add_argument("--lm-eval-include", help="a folder of lm-eval task YAMLs (local tasks) for --lm-eval")
    parser.add_argument("--lm-eval-limit", type=int, help="at most this many documents per lm-eval task")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else the packaged one)")
    args = parser.parse_args(argv)
    if not (args.data or args.prompts or args.questions or args.preferences or args.lm_eval):
        parser.error("nothing to evaluate: give --data, --prompts, --questions, --preferences or --lm-eval")
    model_dir = Path(args.model)
    tokenizer = load_tokenizer(args.tokenizer or (str(model_dir) if (model_dir / "tokenizer.json").is_file() else None))
    chat = ChatTokenizer(tokenizer)
    model = load_chat_model(model_dir, args.adapter, progress=True)
    result: dict[str, Any] = {}
    if args.data:
        result["heldout"] = heldout_loss(model, args.data, tokenizer)
    if args.questions:
        questions = read_jsonl(args.questions)
        accuracy = chat_accuracy(model, chat, questions)
        if not any("in_corpus" in r for r in questions):  # the split by corpus is the demo's
            accuracy = {"accuracy": accuracy["accuracy"]}
        result.update(accuracy)
    if args.preferences:
        result["preference_accuracy"] = preference_accuracy(model, chat, read_jsonl(args.preferences))
    if args.lm_eval:
        result["lm_eval"] = lm_eval_tasks(model, tokenizer, args.lm_eval, args.lm_eval_include, args.lm_eval_limit)[
            "results"
        ]
    if args.prompts:
        try:
            replies = generate_replies(model, chat, read_jsonl(args.prompts), args.max_new_tokens, args.temperature)
        except ValueError as err:
            raise FileNotFoundError(f"{args.prompts}: {err}") from None
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in replies)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(lines, encoding="utf-8")
            result["generations"] = {"file": args.out, "records": len(replies)}
        else:
            result["generations"] = replies
    print(json.dumps(finite(result), indent=2, ensure_ascii=False, allow_nan=False))


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
