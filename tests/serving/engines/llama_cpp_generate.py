"""Greedy tokens from llama.cpp (run with the llama.cpp venv's python):
`python llama_cpp_generate.py REQUEST.json RESULT.json`.

REQUEST: {"gguf": file, "prompts": [[ids]], "max_tokens": n, "texts": [str], "teacher": [[ids]] or null}
RESULT:  {"tokens": [[ids]], "encoded": [[ids]], "teacher_argmax": [[ids]] or null}
Greedy is an argmax over llama.cpp's logits, one token at a time, so no sampler setting can change it.
"""

import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    request = json.load(open(sys.argv[1]))
    llm = Llama(model_path=request["gguf"], n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
    tokens = []
    for ids in request["prompts"]:
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(request["max_tokens"]):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        tokens.append(out)
    result = {"tokens": tokens}
    result["encoded"] = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in request.get("texts", [])]
    result["teacher_argmax"] = None
    if request.get("teacher"):
        # Teacher forcing: the argmax at every position of prompt + reference continuation, in one batch.
        result["teacher_argmax"] = []
        for ids in request["teacher"]:
            llm.reset()
            llm.eval(ids)
            result["teacher_argmax"].append([int(np.argmax(llm.scores[i])) for i in range(len(ids))])
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
