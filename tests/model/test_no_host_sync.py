"""A training forward asks the host nothing (#16 item 5): on an accelerator every `.item()`, `bool(tensor)` or copy to
the host stalls the stream. The expert-load statistics stay on the device and are reduced once per optimizer step;
the attention mask is built without asking whether the batch is packed. The CPU asks (free there, and plain causal
attention is SDPA's fastest path); here the accelerator's path runs on the CPU and is counted."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model.attention as attention
from finetune.moe import ExpertLoadTracker
from model import DeepseekV3Config, DeepseekV3ForCausalLM

HOST_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero")


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func).rsplit(".", 1)[0]] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def accelerator_path(monkeypatch):
    monkeypatch.setattr(attention, "HOST_CHECKS_ON_CPU", False)


@pytest.mark.parametrize("packed", [False, True])
def test_a_training_forward_asks_the_host_nothing(accelerator_path, packed):
    torch.manual_seed(0)
    config = DeepseekV3Config.from_preset("tiny", mtp_loss_enabled=True, balance_loss_alpha=0.01)
    model = DeepseekV3ForCausalLM(config).train()
    tracker = ExpertLoadTracker(model, gamma=1e-3)
    ids = torch.randint(0, config.vocab_size, (2, 32))
    kwargs = {}
    if packed:
        kwargs["position_ids"] = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, -1)
    with CountOps() as counted:
        out = model(input_ids=ids, labels=ids, return_logits=False, **kwargs)
    assert not {op: n for op, n in counted.ops.items() if op in HOST_OPS}, counted.ops
    assert int(tracker.step_counts.sum()) == 2 * 32 * config.num_experts_per_tok * len(model.moe_layers())
    out.loss.backward()
    tracker.update_bias()  # once per optimizer step: the only place the counts are combined
    assert int(tracker.step_counts.sum()) == 0 and int(tracker.log_counts.sum()) > 0


def test_the_mask_built_without_asking_gives_the_same_logits(monkeypatch):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("tiny")).eval()
    ids = torch.randint(0, 1024, (2, 24))
    positions = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        asked = model(input_ids=ids, position_ids=positions).logits  # the CPU finds it unpacked: causal SDPA
        monkeypatch.setattr(attention, "HOST_CHECKS_ON_CPU", False)
        built = model(input_ids=ids, position_ids=positions).logits  # the accelerator builds the mask
    torch.testing.assert_close(built, asked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_counts_each_micro_batch_once(reentrant):
    torch.manual_seed(0)
    config = DeepseekV3Config.from_preset("tiny")
    model = DeepseekV3ForCausalLM(config).train()
    tracker = ExpertLoadTracker(model)
    moe = model.moe_layers()[0]
    x = torch.randn(2, 16, config.hidden_size, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=reentrant)
    out.sum().backward()  # the reentrant checkpoint recomputes the MoE forward inside the backward
    assert int(tracker.step_counts[0].sum()) == 2 * 16 * config.num_experts_per_tok
