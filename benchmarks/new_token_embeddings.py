"""Copy a demo Base with the embeddings of the tokens its corpus never trained set to the mean trained embedding.

    python benchmarks/new_token_embeddings.py --base outputs/demo/base --data outputs/demo/data --out /tmp/base-mean
    python -m finetune.sft --config recipes/demo/sft.yaml model_name_or_path=/tmp/base-mean ...

Unsloth's fix for untrained tokens, applied by hand for the measurement in docs/demo.md (fourth round): the chat
format brings tokens (`<｜User｜>`, `<｜Assistant｜>`, `What`, ...) that the Base's plain-text corpus never had, whose
embeddings are still at their random init, and LoRA on the attention does not train them. Tokens trained = every
token of the corpus facts (prompt, completion, bos, eos); untrained = the tokens of the SFT chats that are not among
them. Prints both lists' sizes and mean embedding norms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools import ChatTokenizer, load_tokenizer
from finetune.evaluate import read_jsonl

KEY = "model.embed_tokens.weight"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the Base folder (finetune.cpt's output_dir)")
    parser.add_argument("--data", required=True, help="the demo data folder (facts.jsonl and sft.jsonl)")
    parser.add_argument("--out", required=True, help="where to write the edited copy of the Base")
    args = parser.parse_args(argv)
    base, data, out = Path(args.base), Path(args.data), Path(args.out)
    files = sorted(base.glob("*.safetensors"))
    holding = [f for f in files if KEY in load_file(f)]
    if len(holding) != 1:
        raise SystemExit(f"{base}: expected one .safetensors file holding {KEY}, found {len(holding)}")
    for name in ("facts.jsonl", "sft.jsonl"):
        if not (data / name).is_file():
            raise SystemExit(f"{data / name}: not found (the demo writes it under <out>/seed<N>/data)")

    chat = ChatTokenizer(load_tokenizer())
    trained = {chat.bos_id, chat.eos_id}
    for fact in read_jsonl(data / "facts.jsonl"):
        trained.update(t for ids in chat.encode_texts([fact["prompt"], fact["completion"]]) for t in ids)
    used = {t for r in read_jsonl(data / "sft.jsonl") for t in chat.tokenize_chat(r["messages"])["input_ids"]}
    new, old = sorted(used - trained), sorted(trained)

    shutil.copytree(base, out, ignore=shutil.ignore_patterns("checkpoint-*", "runs"), dirs_exist_ok=True)
    target = out / holding[0].name
    state = load_file(target)
    embeddings = state[KEY]
    print(
        json.dumps(
            {
                "untrained_tokens": [chat.tokenizer.decode([t]) for t in new],
                "untrained_norm": round(float(embeddings[new].norm(dim=-1).mean()), 3),
                "trained_tokens": len(old),
                "trained_norm": round(float(embeddings[old].norm(dim=-1).mean()), 3),
            },
            ensure_ascii=False,
        )
    )
    embeddings[new] = embeddings[old].mean(0)
    save_file(state, target, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
