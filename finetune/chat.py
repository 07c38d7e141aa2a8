"""Talk to a checkpoint in the terminal, in the DeepSeek-V3 chat format; replies stream as they are generated.

dsv3-finetune chat --model outputs/quickstart/chat [--adapter DIR] [--system TEXT] [--temperature 0.7]
dsv3-finetune chat --model DIR --prompt "Hello" [--prompt "And then?"]   # one reply per prompt, no prompt loop

Generation is the model's generate() with its latent KV cache (greedy unless --temperature > 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from data_tools import ChatTokenizer, load_tokenizer

from .evaluate import generate_tokens, load_chat_model


@torch.no_grad()
def reply(
    model, chat: ChatTokenizer, messages: list[dict], max_new_tokens: int, temperature: float, stream: bool = False
) -> str:
    """One assistant turn for the conversation so far (printed token by token when `stream`)."""
    ids = torch.tensor([chat.tokenize_prompt(messages)])
    streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    tokens = generate_tokens(model, ids, chat.eos_id, max_new_tokens, temperature, streamer)[0]
    return chat.tokenizer.decode(tokens, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dsv3-finetune chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder, or an adapter folder")
    parser.add_argument("--adapter", help="LoRA adapter to merge into --model")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else the packaged one)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--prompt", action="append", help="a user turn to answer without the prompt loop (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    tokenizer = load_tokenizer(args.tokenizer or (str(model_dir) if (model_dir / "tokenizer.json").is_file() else None))
    chat = ChatTokenizer(tokenizer)
    model = load_chat_model(model_dir, args.adapter, progress=True)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = iter(args.prompt) if args.prompt else None
    if turns is None:
        print("Type a message; an empty line or Ctrl-D ends the chat.")
    while True:
        if turns is not None:
            text = next(turns, "")
            if text:
                print(f"you> {text}")
        else:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        answer = reply(model, chat, messages, args.max_new_tokens, args.temperature, stream=True)
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    from .cli import run_stage

    run_stage(main)
