"""Talk to a checkpoint in the terminal (greedy or sampled), in the DeepSeek-V3 chat format.

python -m finetune.chat --model outputs/demo/chat [--adapter DIR] [--system TEXT] [--temperature 0.7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data_tools import ChatTokenizer, load_tokenizer

from .evaluate import load_chat_model


@torch.no_grad()
def reply(model, chat: ChatTokenizer, messages: list[dict], max_new_tokens: int, temperature: float) -> str:
    """One assistant turn for the conversation so far."""
    ids = torch.tensor([chat.tokenize_prompt(messages)])
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        token = (
            int(torch.multinomial((logits / temperature).softmax(-1), 1)) if temperature > 0 else int(logits.argmax())
        )
        if token == chat.eos_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return chat.tokenizer.decode(out, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder, or an adapter folder")
    parser.add_argument("--adapter", help="LoRA adapter to merge into --model")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else the packaged one)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    tokenizer = load_tokenizer(args.tokenizer or (str(model_dir) if (model_dir / "tokenizer.json").is_file() else None))
    chat = ChatTokenizer(tokenizer)
    model = load_chat_model(model_dir, args.adapter)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; an empty line or Ctrl-D ends the chat.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        answer = reply(model, chat, messages, args.max_new_tokens, args.temperature)
        print(f"model> {answer}")
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
