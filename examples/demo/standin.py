"""The demo's Base -> LoRA SFT on a compact vocabulary: the fast variant of the robustness check.

    python examples/demo/standin.py --seed 0 [--threads 1]

The demo's own data (finetune.demo.DATA through data_tools.synthetic) and its recipes' settings (recipes/demo/
cpt.yaml and sft.yaml: steps, learning rates, batch sizes, warmup, replay share, LoRA rank), tokenized with the real
DeepSeek-V3 tokenizer and chat template, then mapped onto the ~70 tokens the demo uses, so the 129K-wide output layer
that dominates the real demo's cost is gone: the same model body trains the Base and the SFT adapter in about a
minute. Batches hold the same number of samples as the real stages' packed rows on average (padded, not packed), so
this is close to the real pipeline, not equal to it. Prints one JSON line: the Base's plain-text accuracy and
chat-format accuracy, and the SFT model's right-sum rate in chat format (facts in the corpus / never seen, %), which
is what decides whether the Base's knowledge carried over into the chat format.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_standin import train as standin_train  # noqa: E402  (benchmarks/demo_standin.py)

from data_tools import ChatTokenizer, load_tokenizer  # noqa: E402
from data_tools.synthetic import build_demo_data  # noqa: E402
from finetune.demo import DATA  # noqa: E402
from finetune.evaluate import operands  # noqa: E402
from finetune.lora import build_lora_config  # noqa: E402
from model import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from model.config import PRESETS  # noqa: E402

Sample = tuple[list[int], list[int]]


def recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "recipes/demo" / name).read_text())


def build(seed: int):
    """The demo's samples in the real tokenizer's ids: cpt segment records, SFT chats, eval prompts and answers."""
    chat = ChatTokenizer(load_tokenizer())
    data = build_demo_data(**DATA, seed=seed)
    cpt = []
    for record in data["corpus_segments"]:
        ids, labels = [chat.bos_id], [-100]
        for segment in record["segments"]:
            tokens = chat.encode_texts([segment["text"]])[0]
            ids += tokens
            labels += tokens if segment["label"] else [-100] * len(tokens)
        cpt.append((ids + [chat.eos_id], labels + [chat.eos_id]))
    sft = []
    for record in data["sft"]:
        tokens = chat.tokenize_chat(record["messages"])
        sft.append((tokens["input_ids"], [-100, *tokens["labels"][1:]]))
    evals = data["eval"]
    chat_prompts = [chat.tokenize_prompt(r["messages"][:-1]) for r in evals]
    sums = [chat.encode_texts([str(sum(operands(r["messages"][0]["content"])))])[0] for r in evals]
    plain = [
        [chat.bos_id, *chat.encode_texts(["{} + {} = ".format(*operands(r["messages"][0]["content"]))])[0]]
        for r in evals
    ]
    return chat, cpt, sft, evals, chat_prompts, plain, sums


def compact_all(chat, cpt, sft, chat_prompts, plain, sums):
    used = {t for ids, _ in cpt + sft for t in ids} | {t for x in chat_prompts + plain + sums for t in x}
    used.add(chat.eos_id)
    index = {t: i for i, t in enumerate(sorted(used))}

    def c(ids: list[int]) -> list[int]:
        return [index[t] if t >= 0 else t for t in ids]

    return (
        len(index),
        index[chat.eos_id],
        [(c(i), c(label)) for i, label in cpt],
        [(c(i), c(label)) for i, label in sft],
        [c(x) for x in chat_prompts],
        [c(x) for x in plain],
        [c(x) for x in sums],
    )


def train(model, samples, values, batch, params, seed, replay=(), replay_fraction=0.0, gamma=0.0) -> list[float]:
    """The first rounds' stand-in training loop (AdamW fused, warmup + cosine, clipping, the router bias update when
    gamma > 0) with a recipe's settings."""
    return standin_train(
        model,
        samples,
        int(values["max_steps"]),
        batch,
        float(values["learning_rate"]),
        int(values.get("warmup_steps", 0)) or 1,
        params,
        seed,
        replay,
        replay_fraction,
        weight_decay=float(values.get("weight_decay", 0)),
        router_gamma=gamma,
        max_grad_norm=float(values.get("max_grad_norm", 1.0)),
    )


@torch.no_grad()
def first_tokens_right(model, prompts, answers, evals, eos=None) -> list[int]:
    """% of prompts whose greedy continuation starts with the answer (then eos when `eos` is given), facts in the
    corpus / never seen."""
    model.eval()
    right = []
    for prompt, answer in zip(prompts, answers):
        want = answer + ([eos] if eos is not None else [])
        x = torch.tensor([prompt])
        for _ in range(len(want)):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1)[:, None]], 1)
        right.append(x[0, len(prompt) :].tolist() == want)
    model.train()
    seen = [c for c, r in zip(right, evals) if r["in_corpus"]]
    unseen = [c for c, r in zip(right, evals) if not r["in_corpus"]]
    return [round(100 * sum(seen) / len(seen)), round(100 * sum(unseen) / len(unseen))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    chat, cpt, sft, evals, chat_prompts, plain, sums = build(args.seed)
    vocab, eos, cpt, sft, chat_prompts, plain, sums = compact_all(chat, cpt, sft, chat_prompts, plain, sums)
    cpt_recipe, sft_recipe = recipe("cpt.yaml"), recipe("sft.yaml")
    base = {**PRESETS[cpt_recipe["model_name_or_path"].split(":", 1)[1]], "vocab_size": vocab}
    config = DeepseekV3Config(**base)
    config.mtp_loss_enabled = False
    model = DeepseekV3ForCausalLM(config).float().train()
    start = time.time()
    # The real cpt packs ~64-token rows of records: about 3 records a row, per_device_train_batch_size rows a step.
    cpt_batch = int(cpt_recipe["per_device_train_batch_size"]) * 3
    train(model, cpt, cpt_recipe, cpt_batch, list(model.parameters()), args.seed, gamma=cpt_recipe["router_bias_gamma"])
    result = {"seed": args.seed, "base_plain": first_tokens_right(model, plain, sums, evals)}
    result["base_chat"] = first_tokens_right(model, chat_prompts, sums, evals, eos)
    result["cpt_s"] = round(time.time() - start)
    start = time.time()
    r = int(sft_recipe["lora_r"])
    model = get_peft_model(
        model, build_lora_config(model, sft_recipe["lora_preset"], r=r, alpha=sft_recipe["lora_alpha"])
    )
    params = [p for p in model.parameters() if p.requires_grad]
    # ~5 chats a 64-token row in the real SFT stage
    sft_batch = int(sft_recipe["per_device_train_batch_size"]) * 5
    replay = float(sft_recipe["data"].get("replay_fraction", 0.0))
    losses = train(model, sft, sft_recipe, sft_batch, params, args.seed, cpt, replay)
    result["sft_sum_chat"] = first_tokens_right(model, chat_prompts, sums, evals)
    result["sft_plain"] = first_tokens_right(model, plain, sums, evals)
    result["sft_loss"] = [
        round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 2) for i in range(0, len(losses), 100)
    ]
    result["sft_s"] = round(time.time() - start)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
