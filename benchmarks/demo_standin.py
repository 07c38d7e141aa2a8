"""A fast stand-in of the demo's Base -> SFT pipeline, for the measurements in docs/demo.md.

    python benchmarks/demo_standin.py --seed 0                       # the old SFT recipe (200 steps, lr 2e-3)
    python benchmarks/demo_standin.py --seed 0 --sft-steps 600 --sft-lr 1e-3 --replay 0.2   # the new one

The demo's data (data_tools.synthetic, same sizes), tokenized with the real DeepSeek-V3 tokenizer and chat template,
then mapped onto a compact vocabulary of the ~74 tokens the demo uses, so the 129K-wide output layer that dominates
the real demo's cost is gone: the same model body (hidden 128, 3 layers, 8 routed experts + 1 shared) trains the
Base (cpt on plain-text facts, loss on the answer) and a LoRA SFT in about a minute on 2 cores, with greedy
exact-match evaluation in chat format and in plain text. Prints one JSON line: plain-text and chat accuracy (facts
in the corpus / never seen) of the Base and of the SFT model, the SFT loss curve, and for the SFT model a fit of
its answers to a, b (a failed carry-over answers roughly, not exactly). Batches are padded, not packed, and
replay samples are drawn per batch: close to the real stages, not equal to them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools import ChatTokenizer, load_tokenizer
from data_tools.synthetic import build_demo_data
from finetune.lora import build_lora_config
from finetune.moe import ExpertLoadTracker
from model import DeepseekV3Config, DeepseekV3ForCausalLM
from model.config import PRESETS

PHRASINGS = {
    "plain": ["{a} + {b} = "],
    "aug": [
        "{a} + {b} = ",
        "{a} plus {b} equals ",
        "The sum of {a} and {b} is ",
        "Adding {a} and {b} gives ",
        "If you add {b} to {a}, you get ",
    ],
    "qa": ["{a} + {b} = ", "Q: What is {a} + {b}? A: "],
    "prefix": [
        "{a} + {b} = ",
        "We know that {a} + {b} = ",
        "Note: {a} + {b} = ",
        "In short, {a} + {b} = ",
        "Recall that {a} + {b} = ",
    ],
}
# The demo Base (recipes/demo/cpt.yaml) without the 129K vocabulary.
MODEL = dict(
    hidden_size=128,
    moe_intermediate_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_nextn_predict_layers=1,
    max_position_embeddings=512,
)
Sample = tuple[list[int], list[int]]


def operands(question: str) -> tuple[int, int]:
    a, b = (int(x) for x in re.findall(r"\d+", question))
    return a, b


class Task:
    """The demo's data as compact-vocabulary samples: cpt facts, SFT chats, chat and plain-text eval prompts."""

    def __init__(self, args: argparse.Namespace):
        chat = ChatTokenizer(load_tokenizer())
        data = build_demo_data(
            num_train=500, num_eval=200, num_preference=0, max_operand=30, num_corpus_only=100, seed=args.seed
        )
        if args.restate:  # answers that restate the sum: "12 + 7 = 19"
            for record in data["sft"] + data["eval"]:
                a, b = operands(record["messages"][0]["content"])
                record["messages"][1]["content"] = f"{a} + {b} = {a + b}"
        bos, eos = chat.bos_id, chat.eos_id
        cpt = []
        for fact in data["facts"]:
            a, b = operands(fact["prompt"])
            answer = chat.encode_texts([fact["completion"]])[0]
            for phrasing in PHRASINGS[args.phrasings]:
                prompt = chat.encode_texts([phrasing.format(a=a, b=b)])[0]
                label_eos = -100 if args.cpt_no_eos else eos
                cpt.append(([bos, *prompt, *answer, eos], [-100] * (1 + len(prompt)) + [*answer, label_eos]))
        sft = []
        for record in data["sft"]:
            tokens = chat.tokenize_chat(record["messages"])
            sft.append((tokens["input_ids"], [-100, *tokens["labels"][1:]]))
        self.evals = data["eval"]
        questions = [r["messages"][0]["content"] for r in self.evals]
        chat_prompts = [chat.tokenize_prompt(r["messages"][:-1]) for r in self.evals]
        chat_answers = [chat.encode_texts([r["messages"][-1]["content"]])[0] for r in self.evals]
        plain_prompts = [[bos, *chat.encode_texts([f"{a} + {b} = "])[0]] for a, b in map(operands, questions)]
        plain_answers = [chat.encode_texts([str(a + b)])[0] for a, b in map(operands, questions)]
        used = {t for ids, _ in cpt + sft for t in ids}
        used |= {t for ids in chat_prompts + chat_answers + plain_prompts + plain_answers for t in ids}
        self.vocab = sorted(used)
        index = {t: i for i, t in enumerate(self.vocab)}

        def compact(ids: list[int]) -> list[int]:
            return [index[t] if t >= 0 else t for t in ids]

        self.cpt = [(compact(ids), compact(labels)) for ids, labels in cpt]
        # The vocabulary covers every chat either way, so that a cached Base fits every variant.
        self.sft = [
            (compact(ids), compact(labels))
            for (ids, labels), record in zip(sft, data["sft"])
            if not args.one_template or record["messages"][0]["content"].startswith("What is")
        ]
        self.chat = ([compact(x) for x in chat_prompts], [compact(x) for x in chat_answers])
        self.plain = ([compact(x) for x in plain_prompts], [compact(x) for x in plain_answers])
        self.eos = index[eos]
        self.numbers = {}
        for i, t in enumerate(self.vocab):
            text = chat.tokenizer.decode([t]).strip()
            if text.isdigit():
                self.numbers[i] = int(text)
        trained = {t for ids, _ in self.cpt for t in ids}
        self.new_tokens = sorted({t for ids, _ in self.sft for t in ids} - trained)  # never seen by the Base
        self.trained_tokens = sorted(trained)


def batchify(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, labels, attention_mask."""
    width = max(len(ids) for ids, _ in samples)
    ids = torch.ones((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for k, (sample_ids, sample_labels) in enumerate(samples):
        ids[k, : len(sample_ids)] = torch.tensor(sample_ids)
        labels[k, : len(sample_labels)] = torch.tensor(sample_labels)
        mask[k, : len(sample_ids)] = 1
    return ids, labels, mask


def train(
    model,
    samples,
    steps,
    batch,
    lr,
    warmup,
    params,
    seed,
    replay=(),
    replay_fraction=0.0,
    weight_decay=0.0,
    router_gamma=0.0,
    beta2=0.999,
    max_grad_norm=1.0,
) -> list[float]:
    """AdamW (fused) with warmup + cosine, grad clipping (1 by default), as the stages; `replay_fraction` of each batch from replay;
    the aux-loss-free router bias update after each step when `router_gamma` > 0 (the cpt stage's callback)."""
    tracker = ExpertLoadTracker(model, gamma=router_gamma) if router_gamma > 0 else None
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(seed + 11)
    order: list[int] = []
    losses = []
    num_replay = round(batch * replay_fraction) if replay else 0
    for _ in range(steps):
        chosen = []
        while len(chosen) < batch - num_replay:
            if not order:
                order = list(range(len(samples)))
                rng.shuffle(order)
            chosen.append(samples[order.pop()])
        chosen += [replay[rng.randrange(len(replay))] for _ in range(num_replay)]
        ids, labels, mask = batchify(chosen)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if tracker is not None:
            tracker.update_bias()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model, task: Task, prompts, answers) -> tuple[tuple[int, int], list[int]]:
    """Greedy exact match (answer + eos), in % for facts in the corpus / never seen; and each first answer token."""
    model.eval()
    by_length = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    correct, first = [False] * len(prompts), [0] * len(prompts)
    for length, rows in by_length.items():
        x = torch.tensor([prompts[i] for i in rows])
        for _ in range(len(answers[rows[0]]) + 1):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1)[:, None]], 1)
        for row, i in enumerate(rows):
            correct[i] = x[row, length:].tolist() == answers[i] + [task.eos]
            first[i] = int(x[row, length])
    model.train()
    seen = [c for c, r in zip(correct, task.evals) if r["in_corpus"]]
    unseen = [c for c, r in zip(correct, task.evals) if not r["in_corpus"]]
    return (round(100 * sum(seen) / len(seen)), round(100 * sum(unseen) / len(unseen))), first


def answer_fit(task: Task, first: list[int]) -> dict:
    """How far the chat answers are off (clipped to +-5), and a least-squares fit answer ~ a, b, 1."""
    pairs = [operands(r["messages"][0]["content"]) for r in task.evals]
    values = [task.numbers.get(t) for t in first]
    off = Counter("other" if v is None else max(-5, min(5, v - a - b)) for v, (a, b) in zip(values, pairs))
    known = [(a, b, v) for v, (a, b) in zip(values, pairs) if v is not None]
    fit = None
    if len(known) >= 3:
        design = np.array([[a, b, 1.0] for a, b, _ in known])
        fit = np.linalg.lstsq(design, np.array([v for *_, v in known], float), rcond=None)[0].round(2).tolist()
    return {"off_by": {str(k): n for k, n in sorted(off.items(), key=str)}, "answer_fit_a_b_1": fit}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phrasings", choices=sorted(PHRASINGS), default="plain", help="corpus phrasings of a fact")
    parser.add_argument("--cpt-steps", type=int, default=750)
    parser.add_argument("--cpt-batch", type=int, default=63, help="facts a step (the demo: 9 rows of ~7)")
    parser.add_argument("--cpt-lr", type=float, default=3e-3)
    parser.add_argument("--cpt-wd", type=float, default=0.0, help="AdamW weight decay of the cpt stage")
    parser.add_argument(
        "--cpt-router-gamma", type=float, default=0.0, help="router bias update speed in cpt (the demo's: 0.001)"
    )
    parser.add_argument("--cpt-beta2", type=float, default=0.999, help="AdamW beta2 of the cpt stage")
    parser.add_argument("--cpt-no-eos", action="store_true", help="cpt loss on the answer only, not on its eos")
    parser.add_argument("--base-cache", help="a .safetensors file: load the Base from it, or save it there")
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--sft-batch", type=int, default=40, help="chats a step (the demo: 8 rows of ~5)")
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--sft-beta2", type=float, default=0.999, help="AdamW beta2 of the SFT stage")
    parser.add_argument(
        "--preset", default="attention", choices=["attention", "shared_experts", "both", "full", "tokens"]
    )
    parser.add_argument("--r", type=int, default=64, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--replay", type=float, default=0.0, help="share of each SFT batch that is plain-text facts")
    parser.add_argument("--new-tokens", choices=["", "mean", "train", "both"], default="", help="untrained tokens")
    parser.add_argument("--train-router", action="store_true")
    parser.add_argument("--one-template", action="store_true", help="SFT on 'What is a + b?' chats only")
    parser.add_argument("--restate", action="store_true", help="answers 'a + b = c' instead of 'c'")
    parser.add_argument("--model", default="{}", help="JSON overrides of the model config")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = Task(args)
    config = DeepseekV3Config(**{**PRESETS["tiny"], **MODEL, "vocab_size": len(task.vocab), **json.loads(args.model)})
    config.mtp_loss_enabled = False
    model = DeepseekV3ForCausalLM(config).float().train()
    start = time.time()
    if args.base_cache and Path(args.base_cache).is_file():
        state = load_file(args.base_cache)
        if state["lm_head.weight"].shape[0] != len(task.vocab):
            raise SystemExit(
                f"{args.base_cache}: a Base for {state['lm_head.weight'].shape[0]} tokens, this task has "
                f"{len(task.vocab)} (--restate and --phrasings change the vocabulary): use another --base-cache."
            )
        model.load_state_dict(state)
    else:
        train(
            model,
            task.cpt,
            args.cpt_steps,
            args.cpt_batch,
            args.cpt_lr,
            30,
            list(model.parameters()),
            args.seed,
            weight_decay=args.cpt_wd,
            router_gamma=args.cpt_router_gamma,
            beta2=args.cpt_beta2,
        )
        if args.base_cache:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.base_cache)
    plain, first = evaluate(model, task, *task.plain)
    right = [task.numbers.get(t) == sum(operands(r["messages"][0]["content"])) for t, r in zip(first, task.evals)]
    result = {"args": vars(args), "base_plain": plain}
    result["base_plain_first_token"] = [
        round(100 * statistics.mean(c for c, r in zip(right, task.evals) if r["in_corpus"] == seen))
        for seen in (True, False)
    ]
    result["base_chat"] = evaluate(model, task, *task.chat)[0]
    result["cpt_s"] = round(time.time() - start)

    start = time.time()
    embeddings = model.model.embed_tokens.weight
    if args.new_tokens in ("mean", "both"):  # Unsloth's fix for untrained tokens
        with torch.no_grad():
            embeddings[task.new_tokens] = embeddings[task.trained_tokens].mean(0)
    if args.preset == "full":
        pass
    elif args.preset == "tokens":  # only the embeddings of the tokens the Base never saw
        model.requires_grad_(False)
        embeddings.requires_grad_(True)
        rows = torch.zeros(embeddings.shape[0], 1)
        rows[task.new_tokens] = 1
        embeddings.register_hook(lambda grad: grad * rows)
    else:
        lora = build_lora_config(model, args.preset, r=args.r, alpha=2 * args.r)
        if args.new_tokens in ("train", "both"):
            lora.trainable_token_indices = {"embed_tokens": task.new_tokens}
        model = get_peft_model(model, lora)
    if args.train_router:
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = train(
        model,
        task.sft,
        args.sft_steps,
        args.sft_batch,
        args.sft_lr,
        10,
        params,
        args.seed,
        task.cpt,
        args.replay,
        beta2=args.sft_beta2,
    )
    chat_accuracy, first = evaluate(model, task, *task.chat)
    result.update(sft_chat=chat_accuracy, sft_plain=evaluate(model, task, *task.plain)[0])
    result["sft_loss_curve"] = [
        round(sum(losses[i : i + 20]) / len(losses[i : i + 20]), 2) for i in range(0, len(losses), 20)
    ]
    result["sft_s"] = round(time.time() - start)
    result.update(answer_fit(task, first))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
