"""Greedy tokens from vLLM (run with the vLLM venv's python): `python vllm_generate.py REQUEST.json RESULT.json`.

REQUEST: {"model": dir, "dtype": "float32", "prompts": [[ids]], "max_tokens": n, "texts": [str],
          "lora": dir or null, "lora_rank": r, "mtp_speculative": draft tokens or null}
RESULT:  {"tokens": [[ids]], "encoded": [[ids]], "lora_tokens": [[ids]] or null, "draft_tokens": n,
          "accepted_tokens": n (with mtp_speculative)}
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from vllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    request = json.load(open(sys.argv[1]))
    lora = request.get("lora")
    options = dict(max_lora_rank=request.get("lora_rank", 8), max_loras=1) if lora else {}
    if request.get("mtp_speculative"):
        # The checkpoint's own MTP layer as the draft model (DeepSeek-V3's self-speculative decoding).
        options["speculative_config"] = {"method": "mtp", "num_speculative_tokens": request["mtp_speculative"]}
    llm = LLM(
        model=request["model"],
        dtype=request.get("dtype", "float32"),
        max_model_len=256,
        enforce_eager=True,
        max_num_seqs=4,
        enable_lora=bool(lora),
        seed=0,
        disable_log_stats=not request.get("mtp_speculative"),
        **options,
    )
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    if request.get("mtp_speculative"):
        counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        result["draft_tokens"] = counters.get("vllm:spec_decode_num_draft_tokens")
        result["accepted_tokens"] = counters.get("vllm:spec_decode_num_accepted_tokens")
    tokenizer = llm.get_tokenizer()
    result["encoded"] = [tokenizer.encode(text) for text in request.get("texts", [])]
    result["lora_tokens"] = None
    if lora:
        from vllm.lora.request import LoRARequest

        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=LoRARequest("adapter", 1, lora))
        result["lora_tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
