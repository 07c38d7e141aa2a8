"""Our model against transformers' DeepseekV3ForCausalLM: logits, loss, gradients, masks, packing, generate."""

from __future__ import annotations

import pytest
import torch

from model.modeling import IGNORE_INDEX
from tests.model.reference import CONFIGS, build_pair

# fp32 on CPU: the two implementations sum experts and attention in different orders, so results differ by
# rounding only. Measured max |diff| is ~1e-7 on logits of magnitude ~1; 1e-5 relative leaves headroom for
# reduction-order noise while catching any real formula difference (those show up at 1e-2 or more).
RTOL, ATOL = 1e-5, 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_and_gradients_match_transformers(name: str) -> None:
    ours, reference = build_pair(name)
    ours.train()
    reference.train()
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    ours_out = ours(ids, labels=ids)
    ref_out = reference(ids, labels=ids)
    assert_close(ours_out.logits, ref_out.logits)
    assert_close(ours_out.loss, ref_out.loss)
    ours_out.loss.backward()
    ref_out.loss.backward()
    ref_grads = dict(reference.named_parameters())
    compared = 0
    for param_name, param in ours.named_parameters():
        if ".mtp." in param_name:
            assert param.grad is None, f"{param_name} got a gradient with MTP off"
            continue
        expected = ref_grads[param_name].grad
        assert param.grad is not None, param_name
        scale = max(expected.abs().max().item(), 1e-3)
        assert_close(param.grad, expected, scale)
        compared += 1
    assert compared == len(ref_grads)


def test_yarn_past_original_context_matches_transformers() -> None:
    ours, reference = build_pair("qlora-groups-dense1-yarn")
    original = ours.config.rope_parameters["original_max_position_embeddings"]
    ids = torch.randint(0, ours.config.vocab_size, (1, original + 40))
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0) + 100  # well past the original context
    with torch.no_grad():
        assert_close(ours(ids, position_ids=position_ids).logits, reference(ids, position_ids=position_ids).logits)


def test_padded_batch_equals_unpadded() -> None:
    ours, reference = build_pair("qlora-groups-dense1-yarn")
    torch.manual_seed(2)
    long_ids = torch.randint(2, ours.config.vocab_size, (1, 20))
    short_ids = torch.randint(2, ours.config.vocab_size, (1, 12))
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0] = long_ids[0]
    batch[1, :12] = short_ids[0]  # right padding
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0] = 1
    mask[1, :12] = 1
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask).logits
        alone_long = ours(long_ids).logits
        alone_short = ours(short_ids).logits
        ref_padded = reference(batch, attention_mask=mask).logits
    assert_close(padded[0], alone_long[0])
    assert_close(padded[1, :12], alone_short[0])
    assert_close(padded[1, :12], ref_padded[1, :12])
    assert torch.isfinite(padded).all()


def test_left_padding_matches_alone() -> None:
    ours, _ = build_pair("qlora-groups-dense1-yarn")
    ids = torch.randint(2, ours.config.vocab_size, (1, 10))
    batch = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask, position_ids=positions).logits
        alone = ours(ids).logits
    assert torch.isfinite(padded).all()
    assert_close(padded[0, 6:], alone[0])


def test_packed_batch_per_sample_losses_equal_samples_alone() -> None:
    ours, _ = build_pair("qlora-2groups-dense2-yarn")
    ours.config.mtp_loss_enabled = True
    torch.manual_seed(3)
    lengths = [7, 11, 5]
    samples = [torch.randint(2, ours.config.vocab_size, (n,)) for n in lengths]
    packed = torch.cat(samples).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        packed_logits = ours(packed, position_ids=positions).logits[0]
        start = 0
        for sample in samples:
            alone = ours(sample.unsqueeze(0)).logits[0]
            assert_close(packed_logits[start : start + len(sample)], alone)
            start += len(sample)
        # Summed per-sample losses: the packed loss with sum reduction equals the sum over samples alone.
        total_targets = sum(n - 1 for n in lengths)
        packed_loss = ours(packed, position_ids=positions, labels=packed).lm_loss * total_targets
        alone_sum = sum(ours(s.unsqueeze(0), labels=s.unsqueeze(0)).lm_loss * (len(s) - 1) for s in samples)
        torch.testing.assert_close(packed_loss, alone_sum, rtol=1e-5, atol=1e-5)
        mtp_targets = sum(n - 2 for n in lengths)
        packed_mtp = ours(packed, position_ids=positions, labels=packed).mtp_loss * mtp_targets
        alone_mtp = sum(ours(s.unsqueeze(0), labels=s.unsqueeze(0)).mtp_loss * (len(s) - 2) for s in samples)
        torch.testing.assert_close(packed_mtp, alone_mtp, rtol=1e-5, atol=1e-5)


def test_loss_ignores_masked_labels_like_transformers() -> None:
    ours, reference = build_pair("qproj-nogroup-dense0-plainrope")
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    labels = ids.clone()
    labels[:, :9] = IGNORE_INDEX
    with torch.no_grad():
        assert_close(ours(ids, labels=labels).loss, reference(ids, labels=labels).loss)
        no_logits = ours(ids, labels=labels, return_logits=False)
    assert no_logits.logits is None
    assert_close(no_logits.loss, reference(ids, labels=labels).loss)


def test_a_batch_without_targets_has_loss_zero_not_nan() -> None:
    """An all-masked batch (an eval batch of prompts only): transformers' loss is NaN there (0 / 0); ours is 0, and
    the MTP loss and gradients stay finite too."""
    ours, _ = build_pair("qlora-groups-dense1-yarn", mtp_loss_enabled=True)
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    out = ours(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.loss.item() == 0.0 and out.lm_loss.item() == 0.0 and out.mtp_loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["qlora-groups-dense1-yarn", "qproj-nogroup-dense0-plainrope"])
def test_greedy_generate_matches_transformers(name: str) -> None:
    ours, reference = build_pair(name)
    prompt = torch.randint(2, ours.config.vocab_size, (1, 9))
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours_ids = ours.generate(prompt, **kwargs)
    ref_ids = reference.generate(prompt, **kwargs)
    assert ours_ids.shape == (1, 21)
    assert torch.equal(ours_ids, ref_ids)
    # The KV cache gives the same tokens as recomputing the whole sequence each step.
    no_cache = ours.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(no_cache, ours_ids)
