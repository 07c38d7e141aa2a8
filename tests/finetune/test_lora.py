import pytest
import torch
from peft import get_peft_model

from finetune.lora import adapted_module_names, build_lora_config, exact_targets
from model import DeepseekV3Config, DeepseekV3ForCausalLM

ATTN = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
SHARED = {"mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"}
DENSE = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def tiny(**overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(DeepseekV3Config.from_preset("tiny", **overrides))


def expected(num_layers=3, first_dense=1, attention=ATTN, shared=True, dense=False) -> set[str]:
    names = set()
    for i in range(num_layers):
        names |= {f"model.layers.{i}.self_attn.{n}" for n in attention}
        if i >= first_dense and shared:
            names |= {f"model.layers.{i}.{n}" for n in SHARED}
        if i < first_dense and dense:
            names |= {f"model.layers.{i}.{n}" for n in DENSE}
    return names


@pytest.mark.parametrize(
    "preset,kwargs,want",
    [
        ("both", {}, expected()),
        ("attention", {}, expected(shared=False)),
        ("shared_experts", {}, expected(attention=set())),
        ("both", {"dense_mlp": True}, expected(dense=True)),
    ],
)
def test_exact_wrapped_modules(preset, kwargs, want):
    model = get_peft_model(tiny(), build_lora_config(tiny(), preset, r=4, **kwargs))
    wrapped = adapted_module_names(model)
    assert wrapped == want
    assert not any("experts.gate_up_proj" in n or n.endswith("mlp.experts") for n in wrapped)


def test_q_proj_without_q_lora_rank():
    model = tiny(q_lora_rank=None)
    wrapped = adapted_module_names(get_peft_model(model, build_lora_config(model, "attention", r=4)))
    assert wrapped == expected(attention=(ATTN - {"q_a_proj", "q_b_proj"}) | {"q_proj"}, shared=False)


def test_routed_experts_opt_in_and_mtp():
    model = tiny()
    config = build_lora_config(model, "both", r=4, routed_experts=True, include_mtp=True)
    wrapped = adapted_module_names(get_peft_model(model, config))
    assert {"model.layers.1.mlp.experts", "model.mtp.0.mlp.experts"} <= wrapped
    assert "model.mtp.0.mlp.shared_experts.up_proj" in wrapped and "model.layers.2.self_attn.o_proj" in wrapped


def test_peft_conversion_would_move_targets_without_the_guard():
    """The trap: on a deepseek_v3 model peft turns gate/up/down targets into routed-expert parameters."""
    from transformers import DeepseekV3Config as HFConfig
    from transformers import DeepseekV3ForCausalLM as HFModel

    hf = HFModel(HFConfig(**{k: v for k, v in DeepseekV3Config.from_preset("tiny").to_dict().items()}))
    lora = build_lora_config(tiny(), "shared_experts", r=4)
    with exact_targets(lora):
        wrapped = adapted_module_names(get_peft_model(hf, lora))
    assert wrapped == expected(attention=set())
    hf2 = HFModel(HFConfig(**{k: v for k, v in DeepseekV3Config.from_preset("tiny").to_dict().items()}))
    moved = adapted_module_names(get_peft_model(hf2, build_lora_config(tiny(), "shared_experts", r=4)))
    assert not any("shared_experts" in n for n in moved)  # peft's rewrite, what exact_targets prevents


@pytest.mark.parametrize("include_mtp", [False, True])
def test_trainable_tokens_train_only_their_embedding_rows(include_mtp):
    """peft's trainable tokens on the decoder's embedding, which the MTP module shares (with the MTP loss on, its
    loss reaches the rows too): one optimizer step moves exactly the chosen rows."""
    model = tiny(mtp_loss_enabled=include_mtp)
    config = build_lora_config(model, "attention", r=4, include_mtp=include_mtp, trainable_tokens=[42, 5, 17, 5])
    peft_model = get_peft_model(model, config)
    embeddings = ["model.embed_tokens"]
    trained = {n for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad}
    assert trained == {f"base_model.model.{e}.token_adapter.trainable_tokens_delta.default" for e in embeddings}
    layers = {e: peft_model.get_submodule(f"base_model.model.{e}.token_adapter") for e in embeddings}
    before = {e: layer.get_merged_weights(["default"]).detach().clone() for e, layer in layers.items()}
    batch = torch.tensor([[1, 5, 17, 42, 3, 5, 42, 17, 9, 2]])
    peft_model(input_ids=batch, labels=batch).loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    for name, layer in layers.items():
        changed = (layer.get_merged_weights(["default"]) != before[name]).any(dim=1).nonzero().flatten().tolist()
        assert changed == [5, 17, 42], name


def test_trainable_tokens_fast_forward_equals_peft():
    """Our embedding path for trainable tokens (no per-call copy of the whole matrix) gives peft's outputs and row
    gradients (bitwise on this batch: each token's few positions sum in the same order); merged, it is peft's own."""
    import finetune.lora as lora

    model = tiny()
    peft_model = get_peft_model(model, build_lora_config(model, "attention", r=4, trainable_tokens=[7, 3, 250]))
    layer = peft_model.get_submodule("base_model.model.model.embed_tokens.token_adapter")
    with torch.no_grad():
        layer.trainable_tokens_delta["default"].normal_()
    ids = torch.tensor([[3, 1, 7, 7, 9, 250, 3, 0], [250, 250, 4, 3, 7, 2, 8, 9]])
    weights = torch.randn(2, 8, model.config.hidden_size)
    results = []
    for forward in (lora._trainable_tokens_forward, lora._peft_trainable_tokens_forward):
        layer.trainable_tokens_delta["default"].grad = None
        out = forward(layer, ids, ["default"])
        (out * weights).sum().backward()
        results.append((out.detach(), layer.trainable_tokens_delta["default"].grad.clone()))
    (ours, our_grad), (peft_out, peft_grad) = results
    assert torch.equal(ours, peft_out) and torch.equal(our_grad, peft_grad)
    assert ours[0, 0].equal(layer.trainable_tokens_delta["default"][0].detach())  # token 3: the first (sorted) row
    assert our_grad.abs().sum(dim=1).gt(0).all()


def test_shared_experts_preset_on_a_model_without_them_is_one_sentence():
    model = tiny(n_shared_experts=0)
    with pytest.raises(ValueError, match="lora_preset=shared_experts: this model has no shared experts"):
        build_lora_config(model, "shared_experts", r=4)
    assert build_lora_config(model, "both", r=4).target_modules  # attention still has targets
