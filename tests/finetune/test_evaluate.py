"""The demo's evaluation helpers against direct computations on a tiny random model."""

import torch

from finetune.evaluate import completion_logps, generate
from model import DeepseekV3Config, DeepseekV3ForCausalLM


def tiny_model() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    config = DeepseekV3Config.from_preset("tiny", vocab_size=50, num_hidden_layers=2)
    return DeepseekV3ForCausalLM(config).float().eval()


def test_batched_completion_logps_equal_one_full_forward_per_pair():
    model = tiny_model()
    rng = torch.Generator().manual_seed(1)
    # three shapes, one of them split over two batches (batch_size 2)
    shapes = [(5, 1), (5, 1), (5, 1), (7, 3), (4, 2), (7, 3)]
    pairs = [
        (torch.randint(0, 50, (p,), generator=rng).tolist(), torch.randint(0, 50, (c,), generator=rng).tolist())
        for p, c in shapes
    ]
    got = completion_logps(model, pairs, batch_size=2)
    for (prompt, completion), value in zip(pairs, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()  # every position
        logp = logits.log_softmax(-1)
        want = sum(float(logp[len(prompt) - 1 + k, token]) for k, token in enumerate(completion))
        assert abs(value - want) < 1e-4 * max(1.0, abs(want)), (value, want)


def test_generate_is_greedy_and_stops_at_eos():
    model = tiny_model()
    prompts = [[3, 4, 5], [6, 7, 8], [9, 10]]  # the first two share a batch

    def one_by_one(prompt: list[int], eos: int) -> list[int]:
        ids, out = list(prompt), []
        with torch.no_grad():
            for _ in range(5):
                token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if token == eos:
                    break
                out.append(token)
                ids.append(token)
        return out

    free = one_by_one(prompts[0], eos=-1)
    # The first prompt stops at its first greedy token after the first that it has not produced before.
    stop = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    eos = free[stop]
    want = [one_by_one(p, eos) for p in prompts]
    assert len(want[0]) == stop
    assert generate(model, prompts, eos_id=eos, max_new_tokens=5) == want


LM_EVAL_TASK = """task: dsv3_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_harness_runs_our_model_and_matches_a_direct_count(tmp_path):
    """lm-evaluation-harness on our model through its HF wrapper, on a local task: every log-likelihood it reports
    equals log p(continuation | context) computed here, and its accuracy equals the direct argmax count."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from data_tools import load_tokenizer
    from finetune.evaluate import lm_eval_tasks

    data = Path(__file__).parent / "fixtures/lm_eval/mc.jsonl"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/task.yaml").write_text(LM_EVAL_TASK.format(data=data))
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("mini")).float().eval()
    tokenizer = load_tokenizer()
    out = lm_eval_tasks(model, tokenizer, ["dsv3_local_mc"], str(tmp_path / "tasks"), log_samples=True)
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    correct = 0
    for sample in out["samples"]["dsv3_local_mc"]:
        doc = docs[sample["doc_id"]]
        context = tokenizer.encode(doc["question"], add_special_tokens=False)
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(doc["question"] + " " + choice, add_special_tokens=False)
            scores += completion_logps(model, [(whole[: len(context)], whole[len(context) :])])
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(scores, abs=1e-4), (got, scores)
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert out["results"]["dsv3_local_mc"]["acc,none"] == pytest.approx(correct / len(docs))

    # the same through the command line, printed as valid JSON
    model.save_pretrained(tmp_path / "model")
    command = [sys.executable, "-m", "finetune.evaluate", "--model", str(tmp_path / "model"), "--lm-eval"]
    command += ["dsv3_local_mc", "--lm-eval-include", str(tmp_path / "tasks")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout)
    assert printed["lm_eval"]["dsv3_local_mc"]["acc,none"] == pytest.approx(correct / len(docs))


def test_heldout_data_comes_from_a_recipes_eval_split_or_its_sources(tmp_path):
    from pathlib import Path

    from finetune.evaluate import data_recipe_for

    root = Path(__file__).resolve().parents[2]
    recipe = data_recipe_for([str(root / "recipes/tiny/sft/full.yaml")])  # no eval split: its sources, unpacked
    assert [s.path for s in recipe.sources] == ["examples/data/chats.jsonl"] and not recipe.pack
    assert recipe.max_length == 128 and not recipe.replay_sources
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  sources: [train.jsonl]\n  eval_sources: [held_out.jsonl]\n  eval_fraction: 0.1\n")
    recipe = data_recipe_for([str(path)])
    assert [s.path for s in recipe.sources] == ["held_out.jsonl"] and recipe.eval_fraction == 0.0
    path.write_text("data:\n  sources: [train.jsonl]\n  eval_fraction: 0.1\n")  # the rows training holds out
    recipe = data_recipe_for([str(path)])
    assert [s.path for s in recipe.sources] == ["train.jsonl"] and recipe.eval_fraction == 0.1
    files = data_recipe_for(["a.jsonl", "b.parquet"])
    assert [s.path for s in files.sources] == ["a.jsonl", "b.parquet"]
