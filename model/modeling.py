"""DeepSeek-V3 decoder, multi-token prediction and the causal LM (a transformers PreTrainedModel).

Single-device plain torch: parallelism (expert parallel, ZeRO-3, checkpointing policy) is applied from outside.
Parameter names equal the Hugging Face checkpoint's wherever the module exists there; model/checkpoint.py maps
the rest (fused experts, the MTP layer stored as layer index num_hidden_layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .attention import MLAttention, RMSNorm, build_attention_mask
from .config import DeepseekV3Config
from .moe import MLP, MoE, RoutedExperts, Router, compute_dtype, no_autocast
from .rope import RotaryEmbedding

IGNORE_INDEX = -100


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: MLA then a dense MLP (first_k_dense_replace layers) or DeepSeekMoE."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, token_mask) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    """The MTP module's output norm (checkpoint: shared_head.norm); its head is the main model's lm_head."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One multi-token-prediction module: predicts token i+k+1 from h_i^(k-1) and the embedding of token i+k.

    h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]) -> one MoE decoder block -> shared_head.norm -> the output head.
    Embedding first, as in every implementation (the paper writes the reverse). The embedding and the output head are
    the main model's (paper section 2.2: shared), so the module holds neither: a separately trained copy would draft
    badly in engines that share them (vLLM and SGLang do). The checkpoint stores copies of both under
    model.layers.{num_hidden_layers}, as the official files do; model.checkpoint writes and checks them.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, prev_hidden, next_embeds, cos, sin, mask=None, token_mask=None):
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(prev_hidden)), dim=-1))
        return super().forward(x, cos, sin, mask, token_mask)


@dataclass
class DeepseekV3Output(ModelOutput):
    """Causal LM output; loss = lm_loss + mtp_loss_weight * mtp_loss + balance_loss (those enabled)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class DeepseekV3PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV3Config
    config: DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer", "MTPLayer"]
    _supports_sdpa = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Router):
            module.weight.normal_(0.0, std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, RoutedExperts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] index of the packed sample each token belongs to (a sample starts where positions stop counting up)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def shifted_targets(labels: torch.Tensor, segments: torch.Tensor | None, shift: int) -> torch.Tensor:
    """targets[:, i] = labels[:, i + shift], or IGNORE_INDEX past the end or across a packed-sample boundary."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-shift] = labels[:, shift:]
    if segments is not None:
        crosses = torch.ones_like(labels, dtype=torch.bool)
        crosses[:, :-shift] = segments[:, shift:] != segments[:, :-shift]
        targets = targets.masked_fill(crosses, IGNORE_INDEX)
    return targets


LOGITS_CHUNK_BYTES = 128 << 20  # fp32 logits held at once by the fused head loss


class _LinearCrossEntropy(torch.autograd.Function):
    """scale * sum_i CE(h_i W^T, t_i), with the gradients computed chunk by chunk during the forward pass.

    The [N, V] logits, their log-softmax and their gradient are never held whole (only [chunk, V] at a time) and
    softmax - onehot is formed in place of the logits: the same GEMMs as the unfused path with a fraction of the
    memory traffic. Only used when a backward will follow, since it runs the backward GEMMs eagerly. Chunks are of
    equal size (130 rows under a 129-row cap ran as 129 + 1, streaming the [V, H] weight twice for one row), and
    `scale` (the 1 / token count of the mean) is applied to the [C, H] factors rather than to the [V, H] weight
    gradient, so that a backward with an output gradient of 1 returns the saved gradients untouched.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, max_rows: int, scale: torch.Tensor
    ) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        # One compute dtype for every GEMM: autocast's (bf16 mixed precision: the fp32 head weight is cast once per
        # call, not once per chunk and GEMM), else the inputs'. The log-softmax is fp32 whatever it is.
        device = hidden.device.type
        compute = compute_dtype(hidden)
        with no_autocast(device):
            h_all, w = hidden.to(compute), weight.to(compute)
            total = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(h_all) if want_hidden else None
            grad_weight = None
            rows = hidden.shape[0]
            pieces = max(1, -(-rows // max_rows))  # ceil(rows / max_rows) chunks of equal size
            chunk = max(1, -(-rows // pieces))
            for start in range(0, rows, chunk):
                h, t = h_all[start : start + chunk], targets[start : start + chunk]  # [C, H], [C]
                logits = (h @ w.T).float()  # [C, V]; a no-op cast in fp32
                if device == "cpu":
                    # In place (the CPU kernel reads each row whole before writing it; the fused-loss test checks
                    # the values): a fresh [C, V] buffer costs its page faults, 40 ms at 1020 x 32000 fp32.
                    torch.log_softmax(logits, dim=-1, out=logits)
                else:
                    logits = torch.log_softmax(logits, dim=-1)
                index = torch.arange(len(t), device=t.device)
                total -= logits[index, t].sum()
                grad = logits.exp_()  # softmax
                grad[index, t] -= 1.0
                grad = grad.to(compute)
                if want_hidden:
                    grad_hidden[start : start + chunk] = (grad @ w).mul_(scale.to(compute))
                if want_weight:
                    # In the compute dtype, as a bf16 Linear's backward is (an fp32 GEMM here ran at a third of
                    # the speed); chunks after the first accumulate in fp32.
                    scaled = h * scale.to(compute)
                    if grad_weight is None:
                        grad_weight = grad.T @ scaled  # [V, H]
                        if pieces > 1:
                            grad_weight = grad_weight.float()
                    elif compute == torch.float32:
                        grad_weight.addmm_(grad.T, scaled)
                    else:
                        grad_weight += grad.T @ scaled
            if rows == 0 and want_weight:
                grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The usual case (this loss enters the total with weight 1) skips a pass over the [V, H] weight gradient;
        # the check syncs, so it is made on the CPU only.
        unit = grad_total.device.type == "cpu" and grad_total.numel() == 1 and float(grad_total) == 1.0
        if grad_hidden is not None:
            grad_hidden = (grad_hidden if unit else grad_hidden * grad_total.to(grad_hidden.dtype)).to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight if unit else grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _fusable(head: nn.Module, hidden: torch.Tensor) -> bool:
    # A plain dense head only: peft wrappers add adapters that the fused path would skip, and ZeRO-3 partitioned
    # weights (ds_id) are gathered by module hooks that a direct weight access would bypass.
    return (
        torch.is_grad_enabled()
        and type(head) is nn.Linear
        and head.bias is None
        and not hasattr(head.weight, "ds_id")
        and (hidden.requires_grad or head.weight.requires_grad)
    )


def head_loss(
    hidden: torch.Tensor,  # [B, S, H]
    head: nn.Linear,
    targets: torch.Tensor,  # [B, S]
    num_items_in_batch: int | torch.Tensor | None = None,
    logits: torch.Tensor | None = None,  # [B, S, V] when already computed
) -> torch.Tensor:
    """Cross-entropy computing logits only at positions that carry a target (the vocabulary dominates the cost)."""
    keep = targets != IGNORE_INDEX
    denominator = keep.sum() if num_items_in_batch is None else num_items_in_batch
    if not isinstance(denominator, torch.Tensor):
        denominator = torch.tensor(denominator)
    # A batch with no target at all (an all-masked eval batch) gives a loss of 0 over 0 targets, not NaN.
    denominator = denominator.to(device=hidden.device, dtype=torch.float32).clamp(min=1)
    if logits is None and _fusable(head, hidden):
        max_rows = max(1, LOGITS_CHUNK_BYTES // (4 * head.weight.shape[0]))
        return _LinearCrossEntropy.apply(hidden[keep], head.weight, targets[keep], max_rows, 1.0 / denominator)
    logits = (head(hidden[keep]) if logits is None else logits[keep]).float()  # [N, V]
    return F.cross_entropy(logits, targets[keep], reduction="sum") / denominator


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    """Embedding, decoder layers, final norm, and the MTP modules (run only by the causal LM's MTP loss)."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, n + k) for k in range(config.num_mtp_modules))
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict]:
        """Returns the final normed hidden states [B, S, H] and what the heads need (mask, rope, cache, ...)."""
        cache = kwargs.pop("past_key_values", cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, seq = x.shape[:2]
        if use_cache and cache is None and not (self.gradient_checkpointing and self.training):
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        given_positions = position_ids is not None
        if position_ids is None:
            position_ids = (torch.arange(seq, device=x.device) + past).unsqueeze(0).expand(bsz, -1)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, seq] of 0/1, got shape {tuple(attention_mask.shape)}")
        mask = build_attention_mask(attention_mask, position_ids, seq, past, given_positions)
        token_mask = None if attention_mask is None else attention_mask[:, -seq:].bool()
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, token_mask, cache=cache)
        state = dict(mask=mask, token_mask=token_mask, cos=cos, sin=sin, position_ids=position_ids, cache=cache)
        return self.norm(x), state


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    """The DeepSeek-V3 causal LM with MTP and balance losses, loadable from and savable to HF checkpoints."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def moe_layers(self) -> list[MoE]:
        """Every MoE block, decoder layers first, then the MTP modules."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def expert_counts(self) -> torch.Tensor:
        """[num MoE layers that ran, E] tokens routed to each expert in the last forward pass."""
        counts = [m.expert_counts for m in self.moe_layers() if m.expert_counts is not None]
        return torch.stack(counts) if counts else torch.empty(0)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> DeepseekV3Output:
        """labels [B, S] are the input ids with IGNORE_INDEX where no loss is wanted (shifted here, as in HF).

        return_logits=False skips the vocabulary projection except where a loss needs it.
        """
        for moe in self.moe_layers():
            moe.expert_counts = moe.balance_loss = None
        hidden, state = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=kwargs.pop("past_key_values", cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        logits = None
        all_positions = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if return_logits:
            if all_positions:
                logits = self.lm_head(hidden)
            elif isinstance(logits_to_keep, int):
                logits = self.lm_head(hidden[:, -logits_to_keep:])
            else:
                logits = self.lm_head(hidden[:, logits_to_keep])

        loss = lm_loss = mtp_loss = balance_loss = None
        if labels is not None:
            # Packed samples: no target (main or MTP) may reach across a sample boundary.
            segments = segment_ids(state["position_ids"])
            targets = shifted_targets(labels, segments, 1)
            full_logits = logits if return_logits and all_positions else None
            lm_loss = head_loss(hidden, self.lm_head, targets, num_items_in_batch, full_logits)
            loss = lm_loss
            if self.config.mtp_loss_enabled and len(self.model.mtp) > 0 and input_ids is not None:
                mtp_loss = self._mtp_loss(hidden, input_ids, labels, segments, state, num_items_in_batch)
                loss = loss + self.config.mtp_loss_weight * mtp_loss
            aux = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
            if aux:
                balance_loss = torch.stack(aux).sum()
                loss = loss + balance_loss
        return DeepseekV3Output(
            loss=loss,
            logits=logits,
            cache=state["cache"],
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            balance_loss=balance_loss,
        )

    def _mtp_loss(self, hidden, input_ids, labels, segments, state, num_items_in_batch) -> torch.Tensor:
        """Mean over MTP depths k of CE(predict token i+k+1 at position i)."""
        losses = []
        prev = hidden  # h^0: the main model's output, normed as serving engines pass it to the MTP module
        for k, layer in enumerate(self.model.mtp, start=1):
            next_ids = torch.zeros_like(input_ids)
            next_ids[:, :-k] = input_ids[:, k:]
            next_embeds = self.model.embed_tokens(next_ids)
            prev = layer(prev, next_embeds, state["cos"], state["sin"], state["mask"], state["token_mask"])
            targets = shifted_targets(labels, segments, k + 1)
            losses.append(head_loss(layer.shared_head.norm(prev), self.lm_head, targets, num_items_in_batch))
        return torch.stack(losses).mean()

    @classmethod
    def from_pretrained(cls, path: str | Path, *args, **kwargs) -> DeepseekV3ForCausalLM:
        """Load an HF-format checkpoint (sharded or single safetensors, BF16 or FP8); see model.checkpoint."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, *args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """Write the HF format: per-expert keys, MTP layer, sharded safetensors with index, config.json."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, *args, **kwargs)
