"""Router, experts, balance loss and MTP, each against an independent computation."""

from __future__ import annotations

import itertools

import pytest
import torch

from model import DeepseekV3Config, DeepseekV3ForCausalLM
from model.modeling import DecoderLayer
from model.moe import MoE, RoutedExperts, Router, sequence_balance_loss


def brute_force_route(scores: torch.Tensor, bias: torch.Tensor, config: DeepseekV3Config) -> list[set[int]]:
    """Official routing spelled out per token: best groups by top-2 sum, then best experts inside them."""
    per_group = config.n_routed_experts // config.n_group
    chosen = []
    for s in scores + bias:
        group_score = [sorted(s[g * per_group : (g + 1) * per_group].tolist())[-2:] for g in range(config.n_group)]
        groups = sorted(range(config.n_group), key=lambda g: -sum(group_score[g]))[: config.topk_group]
        allowed = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen.append(set(sorted(allowed, key=lambda e: -s[e].item())[: config.num_experts_per_tok]))
    return chosen


def test_router_matches_brute_force_and_bias_only_selects() -> None:
    config = DeepseekV3Config.from_preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    router = Router(config)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.normal_(0.0, 0.3)
    x = torch.randn(50, config.hidden_size)
    indices, weights, scores = router(x)
    expected = brute_force_route(scores, router.e_score_correction_bias, config)
    assert [set(row.tolist()) for row in indices] == expected
    # Weights come from the sigmoid scores without the bias, normalised, times routed_scaling_factor.
    raw = torch.sigmoid(x @ router.weight.T).gather(1, indices)
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True) * config.routed_scaling_factor)
    # A huge bias on one expert makes every token choose it, yet its weight ignores the bias.
    router.e_score_correction_bias.zero_()
    router.e_score_correction_bias[5] = 100.0
    indices, weights, scores = router(x)
    assert (indices == 5).any(-1).all()
    raw = scores.gather(1, indices)
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True) * config.routed_scaling_factor)


@pytest.mark.parametrize("skewed", [True, False])
def test_fused_experts_equal_per_expert_loop(skewed: bool) -> None:
    config = DeepseekV3Config.from_preset("tiny")
    experts = RoutedExperts(config)
    torch.manual_seed(1)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(30, config.hidden_size, requires_grad=True)
    indices = torch.stack([torch.randperm(config.n_routed_experts)[:2] for _ in range(30)])
    if skewed:
        indices[:, 0] = 3  # one expert takes every token, some take none
    else:
        indices = torch.arange(60).view(30, 2) % config.n_routed_experts  # balanced load
    weights = torch.rand(30, 2)
    out = experts(x, indices, weights)
    inter = config.moe_intermediate_size
    expected = torch.zeros_like(x)
    for t, k in itertools.product(range(30), range(2)):
        e = indices[t, k]
        gate, up = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
        h = torch.nn.functional.silu(gate @ x[t]) * (up @ x[t])
        expected[t] += weights[t, k] * (experts.down_proj[e] @ h)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, experts.gate_up_proj), grad_out)
    ref = torch.autograd.grad(expected, (x, experts.gate_up_proj), grad_out)
    for a, b in zip(ours, ref):
        # fp32 sums in another order: allow 1e-5 of the gradient's scale.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_balance_loss_matches_paper_formula_and_counts() -> None:
    config = DeepseekV3Config.from_preset("tiny", balance_loss_alpha=1e-2)
    torch.manual_seed(2)
    moe = MoE(config).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 10, config.hidden_size)
    token_mask = torch.ones(3, 10, dtype=torch.bool)
    token_mask[2, 6:] = False
    moe(x, token_mask)
    indices, _, scores = moe.gate(x.reshape(-1, config.hidden_size))
    indices, scores = indices.view(3, 10, -1), scores.view(3, 10, -1)
    E, K = config.n_routed_experts, config.num_experts_per_tok
    per_seq = []
    for b in range(3):
        valid = token_mask[b]
        T = int(valid.sum())
        f = torch.tensor([E / (K * T) * int((indices[b][valid] == i).any(-1).sum()) for i in range(E)])
        p = (scores[b][valid] / scores[b][valid].sum(-1, keepdim=True)).mean(0)
        per_seq.append((f * p).sum())
    expected = config.balance_loss_alpha * torch.stack(per_seq).mean()
    torch.testing.assert_close(moe.balance_loss, expected)
    # Counts cover the non-padding tokens only: K per token.
    assert moe.expert_counts.sum().item() == int(token_mask.sum()) * K
    # Uniform routing gives the loss its minimum value 1 (before alpha).
    uniform = torch.full((1, E, E), 0.5)
    round_robin = torch.arange(E).view(1, E, 1).repeat(1, 1, K) % E
    round_robin[..., 1:] = (round_robin[..., 1:] + torch.arange(1, K)) % E
    torch.testing.assert_close(sequence_balance_loss(uniform, round_robin, None, K), torch.tensor(1.0))


def tiny_model(**overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    config = DeepseekV3Config.from_preset("tiny", initializer_range=0.1, **overrides)
    return DeepseekV3ForCausalLM(config).train()


def test_mtp_loss_trains_mtp_weights_and_matches_manual_computation() -> None:
    model = tiny_model(mtp_loss_enabled=True, mtp_loss_weight=0.3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss)
    out.loss.backward()
    mtp = model.model.mtp[0]
    for name, p in mtp.named_parameters():
        if "e_score_correction_bias" in name:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Manual MTP: position i sees h_i and Emb(t_{i+1}) and predicts t_{i+2}.
    with torch.no_grad():
        hidden, state = model.model(ids)
        # The embedding and the output head are the main model's (shared, paper section 2.2).
        embeds = model.model.embed_tokens(ids[:, 1:])
        x = mtp.eh_proj(torch.cat((mtp.enorm(embeds), mtp.hnorm(hidden[:, :-1])), -1))
        cos, sin = state["cos"][:, :-1], state["sin"][:, :-1]
        h = DecoderLayer.forward(mtp, x, cos, sin)  # the decoder block alone
        logits = model.lm_head(mtp.shared_head.norm(h))[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
        torch.testing.assert_close(model(ids, labels=ids).mtp_loss, expected, rtol=1e-5, atol=1e-6)


def test_mtp_off_costs_nothing_but_is_kept() -> None:
    model = tiny_model(mtp_loss_enabled=False)
    calls = []
    model.model.mtp[0].register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    assert calls == [] and out.mtp_loss is None
    torch.testing.assert_close(out.loss, out.lm_loss)
    assert any(k.startswith("model.mtp.0.eh_proj") for k in model.state_dict())


def test_balance_loss_changes_router_weights_only_when_enabled() -> None:
    for alpha in (0.0, 0.1):
        model = tiny_model(balance_loss_alpha=alpha)
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        out = model(ids, labels=ids)
        if alpha:
            assert out.balance_loss is not None and out.balance_loss > 0
            router = model.model.layers[1].mlp.gate.weight
            (grad,) = torch.autograd.grad(out.balance_loss, router)
            assert grad.abs().sum() > 0
        else:
            assert out.balance_loss is None
    counts = model.expert_counts()
    moe_layers = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert counts.shape == (moe_layers, model.config.n_routed_experts)
    assert (counts.sum(-1) == 2 * 12 * model.config.num_experts_per_tok).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_trainable", [True, False])
@pytest.mark.parametrize("grad_scale", [1.0, 3.0])  # 1.0: the backward that returns the saved gradients as they are
@pytest.mark.parametrize("chunk_rows", [None, 41])  # 41: 129 rows in 4 chunks of 33 (the last 30)
def test_fused_linear_cross_entropy_equals_unfused(
    dtype: torch.dtype, head_trainable: bool, grad_scale: float, chunk_rows: int | None, monkeypatch
) -> None:
    from model import modeling
    from model.modeling import IGNORE_INDEX, head_loss

    if chunk_rows is not None:
        monkeypatch.setattr(modeling, "LOGITS_CHUNK_BYTES", chunk_rows * 4 * 1000)
    torch.manual_seed(5)
    head = torch.nn.Linear(32, 1000, bias=False).to(dtype)
    head.weight.requires_grad_(head_trainable)
    hidden = torch.randn(3, 50, 32, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 1000, (3, 50))
    targets[:, :7] = IGNORE_INDEX
    fused = head_loss(hidden, head, targets)  # the fused path: a plain Linear and a gradient wanted
    keep = targets != IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy(head(hidden[keep]).float(), targets[keep])
    assert keep.sum() == 129
    grads = torch.autograd.grad(fused * grad_scale, [hidden] + ([head.weight] if head_trainable else []))
    ref_grads = torch.autograd.grad(reference * grad_scale, [hidden] + ([head.weight] if head_trainable else []))
    # fp32: rounding only. bf16: the gradient is rounded to bf16 once (unfused: the logits are rounded instead).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, reference, rtol=tol, atol=tol)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
    with torch.no_grad():  # no backward: the plain path, same value
        torch.testing.assert_close(head_loss(hidden, head, targets), reference, rtol=tol, atol=tol)
