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
