"""trl's SFT, DPO, KTO, CPO (with SimPO) and ORPO trainers, subclassed once, with what DeepSeek-V3 training needs.

- the loss is the model's own (lm + MTP + sequence-wise balance), computed only where labels need logits;
  trl's fused LM head skips ForCausalLM.forward, so SFT calls the model itself and the preference trainers get a
  fused head that runs our backbone and keeps the balance loss (CPO/ORPO use it instead of full-vocabulary logits);
- router bias updates (aux-loss-free balancing) and expert-load metrics (finetune.moe);
- atomic checkpoints (written to a staging folder, then renamed) and exact resume of full models;
- a NaN or inf loss stops the run with one clear message; the last good checkpoint stays.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import math
import os
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl import DPOTrainer, KTOTrainer, SFTTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, _ChunkedLogProbFunction

from data_tools import save_tokenizer
from model.checkpoint import load_state_into
from model.modeling import DeepseekV3PreTrainedModel

from .moe import ExpertLoadTracker
from .parallel import (
    ExpertParallelGroups,
    check_deepspeed_checkpoint,
    prepare_zero3_expert_parallel,
    prepare_zero3_reference,
    weights_only_checkpoint_engine,
)

CHUNK_SIZE = 4096


class CheckpointWriteError(RuntimeError):
    """A training checkpoint could not be written (disk full); the message says what is left and what to do."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


def unwrap_base(model: torch.nn.Module) -> torch.nn.Module:
    """Our DeepseekV3ForCausalLM under peft / accelerate wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if is_peft_model(model) else model


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The reference model of full (non-LoRA) DPO/KTO: a frozen copy of the initial policy.

    Without a ref_model trl reloads the reference from config._name_or_path as transformers' own model class (for a
    `preset:` there is nothing to load). Process groups cannot be copied: the copy shares the policy's (expert
    parallelism). An expert-parallel copy is marked for ZeRO-3 here, before trl's __init__ hands it to
    deepspeed.initialize (finetune.parallel.prepare_zero3_reference).
    """
    shared = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, (dist.ProcessGroup, ExpertParallelGroups)):
                shared[id(value)] = value
    reference = copy.deepcopy(model, memo=shared).requires_grad_(False).eval()
    groups = getattr(reference, "expert_parallel_groups", None)
    if groups is not None:
        prepare_zero3_reference(reference, groups)
    return reference


def add_default_reference(kwargs: dict[str, Any]) -> None:
    """A DPO/KTO trainer's keyword arguments get the frozen_reference of the policy as ref_model when full fine-tuning
    gives none and precompute_ref_log_probs does not run the initial policy itself (LoRA: adapter-disabled policy)."""
    model = kwargs["model"]
    if kwargs.get("ref_model") is None and kwargs.get("peft_config") is None and not is_peft_model(model):
        if not kwargs["args"].precompute_ref_log_probs:
            kwargs["ref_model"] = frozen_reference(model)


def prepare_precompute_engine(model: torch.nn.Module) -> None:
    """Mark an expert-parallel policy for ZeRO-3 before trl's precompute_ref_log_probs wraps it in an engine.

    trl builds that inference engine (deepspeed.initialize on the policy) inside the trainer's __init__, before the
    stage's prepare_distributed marks the experts: unmarked, ZeRO-3 partitioned and gathered each rank's experts
    over the whole world and the precomputed reference log-probs were wrong. prepare_distributed repeats the
    (idempotent) preparation; a no-op without expert parallelism.
    """
    groups = getattr(unwrap_base(model), "expert_parallel_groups", None)
    if groups is not None:
        prepare_zero3_expert_parallel(model, groups)


class LossFileCallback(TrainerCallback):
    """Appends every log record (with its step) to a JSON-lines file: the demo's plots and the resume test read it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class MoETrainerMixin:
    """Shared by our trainers (placed before the trl class in the bases)."""

    def setup_moe(self, router_bias_gamma: float | None, router_bias_update: str | None) -> None:
        """Track expert load; update the router bias after each optimizer step when the router trains.

        Unset options come from the stage config (self.args) when it has them.
        """
        if router_bias_gamma is None:
            router_bias_gamma = getattr(self.args, "router_bias_gamma", 0.001)
        if router_bias_update is None:
            router_bias_update = getattr(self.args, "router_bias_update", "auto")
        base = unwrap_base(self.model)
        routers_train = any(m.gate.weight.requires_grad for m in base.moe_layers())
        update = router_bias_update == "always" or (router_bias_update == "auto" and routers_train)
        self.expert_load = ExpertLoadTracker(base, gamma=router_bias_gamma if update else 0.0)
        self.add_callback(self.expert_load.callback())
        self._extra_losses: dict[str, list[float]] = {}
        self._step_losses: dict[str, float] = {}
        self._steps_since_log = 0
        trainer = self

        class CountSteps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                trainer._steps_since_log += 1

        self.add_callback(CountSteps())

    def record_extra(self, name: str, value: torch.Tensor | None) -> None:
        """A per-micro-batch mean loss, logged as the mean of its values (preference trainers: transformers divides
        their whole loss by the accumulation steps, so each value is already a mean)."""
        if value is not None and self.model.training:
            self._extra_losses.setdefault(name, []).append(float(value.detach()))

    def record_step(self, name: str, value: torch.Tensor | None) -> None:
        """A micro-batch's share of the optimizer step's value of a loss: summed over the step, then logged as the
        mean over the logged steps and over ranks."""
        if value is not None and self.model.training:
            self._step_losses[name] = self._step_losses.get(name, 0.0) + float(value.detach())

    def step_losses(self) -> dict[str, float]:
        """The per-step losses since the last log, averaged over those steps and over ranks (a collective: every
        rank logs)."""
        steps = max(1, self._steps_since_log)
        names = sorted(self._step_losses)
        if self.accelerator.num_processes > 1:
            # Every rank records the same names (the model's losses are on or off for all).
            values = torch.tensor([self._step_losses[n] for n in names], dtype=torch.float64, device=self.args.device)
            values = self.accelerator.reduce(values, reduction="mean") if names else values
            totals = dict(zip(names, values.tolist()))
        else:
            totals = dict(self._step_losses)
        self._step_losses, self._steps_since_log = {}, 0
        return {name: value / steps for name, value in totals.items()}

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf training loss before it reaches the weights.

        One process only: with several, a rank whose own loss is NaN would stop alone and leave the others waiting
        in the gradient reduction; the NaN reaches every rank's (global) gradient norm instead, checked below.
        """
        if self.accelerator.num_processes > 1:
            return
        if self.model.training and not torch.isfinite(loss.detach()).all():
            self.diverged(f"the training loss became {float(loss.detach())}")

    def _get_grad_norm(self, model, grad_norm=None):
        """transformers' gradient norm, checked before the optimizer step: a non-finite one never reaches the
        weights (a finite loss can still give inf gradients)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.args.fp16:
            return grad_norm  # fp16's loss scaler skips steps with inf gradients by design
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            self.diverged(f"the gradient norm became {float(grad_norm)}")
        return grad_norm

    def diverged(self, what: str) -> None:
        """Raise TrainingDiverged naming a checkpoint that is known good.

        A checkpoint is known good once a finite step followed it. The one saved right before the diverging step is
        not (its weights may be what diverged: with a huge learning rate step 1's update is finite and step 2's loss
        is NaN), so it is moved aside as unverified-checkpoint-N (outside the checkpoint-* pattern, so neither
        `resume_from_checkpoint=last` nor transformers' checkpoint rotation counts it).
        """
        step = self.state.global_step
        run_dir = Path(self.args.output_dir)
        moved = None
        suspect = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save and suspect.is_dir():
            moved = suspect.with_name(f"unverified-{suspect.name}")
            shutil.rmtree(moved, ignore_errors=True)
            os.replace(suspect, moved)
        good = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        # Under DeepSpeed the engine steps inside backward: the update of this step is already applied (and never
        # saved); elsewhere the check runs before the optimizer step.
        when = (
            "stopped (DeepSpeed had applied its update; it is not saved)"
            if self.is_deepspeed_enabled
            else ("stopped before the optimizer step")
        )
        message = f"{what} at step {step + 1}; {when}."
        if moved is not None:
            message += f" {suspect.name} was saved just before that step, so it is set aside as {moved.name}."
        if good is not None:
            message += (
                f" The newest checkpoint that a finite step followed is {good}: lower the learning rate or check the "
                "data, then resume from it (resume_from_checkpoint=last)."
            )
        else:
            message += (
                " No earlier checkpoint is known good: lower the learning rate or check the data and start again."
            )
        raise TrainingDiverged(message)

    def with_balance_loss(self, compute: Callable[[], Any], return_outputs: bool) -> Any:
        """Run a preference trainer's loss (over the fused head) and add the policy forward's balance loss."""
        base = unwrap_base(self.model)
        base.policy_balance_loss = None
        result = compute()
        loss = result[0] if return_outputs else result
        if self.model.training and base.policy_balance_loss is not None:
            loss = loss + base.policy_balance_loss
            self.record_extra("balance_loss", base.policy_balance_loss)
        self.check_finite(loss)
        return (loss, result[1]) if return_outputs else loss

    def count_tokens(self) -> int:
        """Training tokens so far, all ranks, across resumes: kept in state.num_input_tokens_seen, which
        trainer_state.json saves and a resume restores (transformers' own counter is off: counting non-padding
        tokens in packed rows it would take real EOS tokens for padding). Collective: every rank calls it."""
        local = getattr(self, "_local_tokens", 0)
        if self.accelerator.num_processes > 1:
            local = int(self.accelerator.reduce(torch.tensor(local, device=self.args.device), reduction="sum"))
        self._local_tokens = 0
        self.state.num_input_tokens_seen += local
        return self.state.num_input_tokens_seen

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            for name, values in self._extra_losses.items():
                logs[name] = sum(values) / len(values)
            self._extra_losses = {}
            logs.update(self.step_losses())
            logs.update(self.expert_load.metrics())
            if hasattr(self, "_local_tokens"):
                logs["num_tokens"] = self.count_tokens()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into output_dir/.staging, then rename it into place: a kill never leaves a half one."""
        if hasattr(self, "_local_tokens"):
            self.count_tokens()  # the exact count into trainer_state.json
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, ".staging")
        shutil.rmtree(staging_root, ignore_errors=True)
        os.makedirs(staging_root, exist_ok=True)
        limit = self.args.save_total_limit
        self.args.output_dir, real = staging_root, self.args.output_dir
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as err:
            # A full disk surfaces as OSError(ENOSPC) from safetensors/json, or as torch's inline_container.cc
            # "PytorchStreamWriter failed writing file" for optimizer.pt.
            full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
            if not (full or "PytorchStreamWriter failed" in str(err) or "file write failed" in str(err)):
                raise
            shutil.rmtree(staging_root, ignore_errors=True)
            free = shutil.disk_usage(run_dir).free if os.path.isdir(run_dir) else 0
            raise CheckpointWriteError(
                f"writing {name} into {run_dir} failed: the disk is full ({free / 1e9:.2f} GB free); the partial "
                "checkpoint was removed and earlier checkpoints are untouched: free space, then resume "
                "(resume_from_checkpoint=last)"
            ) from None
        finally:
            self.args.output_dir, self.args.save_total_limit = real, limit
        # Every rank writes its own part (its RNG state after DeepSpeed's last barrier): a rename before a late rank
        # wrote it lost that file, which then landed in a fresh staging folder nobody renames.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """transformers' save, with the tokenizer's own files copied byte for byte instead of re-saved.

        transformers 5 rewrites tokenizer_config.json (tokenizer_class "TokenizersBackend"), which transformers 4.x,
        llama.cpp's converter and older serving engines cannot read.
        """
        tokenizer, self.processing_class = self.processing_class, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.processing_class = tokenizer
        if tokenizer is not None and self.args.should_save:
            save_tokenizer(tokenizer, output_dir if output_dir is not None else self.args.output_dir)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """transformers' preparation, with a DeepSpeed resume loading its states weights-only.

        transformers 5.24 resumes DeepSpeed inside this private hook, through DeepSpeed 0.19.8's TorchCheckpointEngine
        (torch.load weights_only=False: a pickle planted in the checkpoint runs on resume). The engine exists only
        once this hook has prepared the model, so the resume is done here, after it, with the checkpoint engine
        wrapped (finetune.parallel.weights_only_checkpoint_engine); the steps are transformers' own (trainer.py,
        _prepare_for_training: deepspeed_load_checkpoint, then optimizer/scheduler and scaler).
        tests/distributed/test_launch.py pins it: a launched resume equals an uninterrupted run, a payload is refused.
        """
        if not (self.is_deepspeed_enabled and resume_from_checkpoint is not None):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        check_deepspeed_checkpoint(resume_from_checkpoint)  # every rank, before any collective
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        engine = self.model_wrapped
        engine.checkpoint_engine = weights_only_checkpoint_engine(engine.checkpoint_engine)
        deepspeed_load_checkpoint(engine, resume_from_checkpoint, load_module_strict=not is_peft_model(self.model))
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Full models are saved in the HF layout (per-expert keys): load them with our loader."""
        model = self.model if model is None else model
        if isinstance(model, DeepseekV3PreTrainedModel):
            load_state_into(model, Path(resume_from_checkpoint), progress=False)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


class DeepseekSFTTrainer(MoETrainerMixin, SFTTrainer):
    """SFT and continued pre-training: the model's own loss on packed rows (lm + MTP + balance)."""

    def __init__(self, *args, router_bias_gamma: float | None = None, router_bias_update: str | None = None, **kwargs):
        args_ = kwargs.get("args")
        args_.dataset_kwargs = {**(args_.dataset_kwargs or {}), "skip_prepare_dataset": True}
        args_.router_aux_loss_coef = 0.0
        args_.include_num_input_tokens_seen = "no"  # count_tokens keeps state.num_input_tokens_seen itself
        super().__init__(*args, **kwargs)
        self._local_tokens = 0  # tokens since the last count_tokens, this rank
        base = unwrap_base(self.model)
        base.__dict__.pop("forward", None)  # drop trl's fused head: our forward computes logits only where needed
        self.setup_moe(router_bias_gamma, router_bias_update)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss (lm + MTP + balance), scaled so that the step's gradient and the logged losses do not
        depend on how its rows are split into micro-batches and processes.

        With num_items_in_batch (the step's label count: all micro-batches, all ranks when
        average_tokens_across_devices) the LM and MTP terms are sums over this micro-batch's tokens divided by the
        step's count, and transformers does not divide by the accumulation steps: those terms add up to the step's
        token mean over the micro-batches, times the process count to undo the ranks' gradient average. The balance
        loss is a mean over this micro-batch's sequences: it is divided by the micro-batches of the step (without
        that, gradient accumulation multiplied alpha by its steps)."""
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in inputs}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**kwargs, use_cache=False, return_logits=return_outputs)
        loss = outputs.loss
        self.check_finite(loss)
        if not self.model.training:
            return (loss, outputs) if return_outputs else loss
        tokens = inputs["input_ids"].numel() if "attention_mask" not in inputs else inputs["attention_mask"].sum()
        self._local_tokens += int(tokens)
        window = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        summed = "num_items_in_batch" in kwargs  # else transformers divides the whole loss by the window
        ranks = self.accelerator.num_processes if summed and self.args.average_tokens_across_devices else 1
        token_scale = ranks if summed else 1 / window
        balance = outputs.balance_loss
        if summed:
            token_part = loss - balance if balance is not None else loss
            loss = token_part * ranks + (balance / window if balance is not None else 0.0)
        # What this micro-batch adds to the step's value of each loss (summed over the step's micro-batches and
        # averaged over ranks when logged): lm and MTP as token means of the step, balance as its sequence mean.
        self.record_step("lm_loss", outputs.lm_loss * token_scale if outputs.mtp_loss is not None else None)
        self.record_step("mtp_loss", outputs.mtp_loss * token_scale if outputs.mtp_loss is not None else None)
        self.record_step("balance_loss", balance / window if balance is not None else None)
        return (loss, outputs) if return_outputs else loss


def add_fused_lm_head(model: DeepseekV3PreTrainedModel, outputs: tuple[str, ...]) -> None:
    """trl's fused LM-head forward (per-token log-probs at labelled positions) over our backbone.

    `model(..., labels=labels, fused_lm_head=True)` returns trl's FusedCausalLMOutput; aux_loss holds the balance
    loss of that call (None when off). Without fused_lm_head the model's own forward runs.
    """
    original_forward = type(model).forward

    def _fused_forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return original_forward(self, *args, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("use_cache", None)
        hidden, _ = self.model(*args, use_cache=False, **kwargs)  # [B, S, H]
        balance = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        hidden, labels = hidden[:, :-1], labels[:, 1:]
        mask = labels != -100
        weight = self.lm_head.weight
        per_token = _ChunkedLogProbFunction.apply(
            hidden[mask], weight, None, labels[mask], 1.0, CHUNK_SIZE, None, 1.0, outputs
        )
        per_token = (None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = per_token
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = torch.stack(balance).sum() if balance else None
        if torch.is_grad_enabled():
            self.policy_balance_loss = aux_loss  # the reference forward (no grad) must not replace it
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq_probs,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
            aux_loss=aux_loss,
        )

    model.forward = types.MethodType(_fused_forward, model)


class DeepseekDPOTrainer(MoETrainerMixin, DPOTrainer):
    """trl's DPO loss family on our model; with LoRA the reference is the adapter-disabled policy (no second copy).

    Full fine-tuning without a ref_model gets a frozen copy of the initial model as the reference (see
    frozen_reference), unless precompute_ref_log_probs runs the initial policy itself.
    """

    def __init__(self, *args, router_bias_gamma: float | None = None, router_bias_update: str | None = None, **kwargs):
        kwargs["args"].router_aux_loss_coef = 0.0
        add_default_reference(kwargs)
        super().__init__(*args, **kwargs)
        self.add_fused_heads()
        self.setup_moe(router_bias_gamma, router_bias_update)

    def add_fused_heads(self) -> None:
        """Our fused head on the policy and the reference, replacing the one trl's __init__ installs."""
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        if self.use_weighting:
            outputs += ("log_sum_sq_probs",)
        add_fused_lm_head(unwrap_base(self.model), outputs)
        if self.ref_model is not None:
            add_fused_lm_head(unwrap_base(self.ref_model), ("log_probs",))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """precompute_ref_log_probs runs inside trl's __init__, after its own fused head went on: put ours on first
        (trl's head expects transformers' backbone output and failed on ours), and mark expert-parallel experts."""
        self.add_fused_heads()
        prepare_precompute_engine(self.model)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """data_tools already wrote prompt_ids/chosen_ids/rejected_ids: trl would re-tokenize from text."""
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _compute_loss(self, model, inputs, return_outputs):
        return self.with_balance_loss(
            functools.partial(super()._compute_loss, model, inputs, return_outputs), return_outputs
        )


class DeepseekKTOTrainer(MoETrainerMixin, KTOTrainer):
    """trl's KTO (and apo_zero_unpaired) on our model; with LoRA the reference is the adapter-disabled policy.

    Full fine-tuning without a ref_model gets a frozen copy of the initial model as the reference: trl would reload it
    from config._name_or_path (as transformers' model class, or not at all for a preset).
    """

    def __init__(self, *args, router_bias_gamma: float | None = None, router_bias_update: str | None = None, **kwargs):
        kwargs["args"].router_aux_loss_coef = 0.0
        add_default_reference(kwargs)
        super().__init__(*args, **kwargs)
        self.add_fused_heads()
        self.setup_moe(router_bias_gamma, router_bias_update)

    def add_fused_heads(self) -> None:
        """Our fused head on the policy and the reference, replacing the one trl's __init__ installs."""
        add_fused_lm_head(unwrap_base(self.model), ("log_probs", "entropy", "mean_logits"))
        if self.ref_model is not None:
            add_fused_lm_head(unwrap_base(self.ref_model), ("log_probs",))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """precompute_ref_log_probs runs inside trl's __init__, after its own fused head went on: put ours on first
        (and mark expert-parallel experts, see prepare_precompute_engine)."""
        self.add_fused_heads()
        prepare_precompute_engine(self.model)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """data_tools already wrote prompt_ids/completion_ids/label; add trl's KL completions (the batch neighbour's)."""
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        if not {"prompt_ids", "completion_ids", "label"} <= set(columns):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not self.calculate_KL or "KL_completion_ids" in columns:
            return dataset

        def add_kl_completion_ids(batch: dict[str, list]) -> dict[str, list]:
            batch["KL_completion_ids"] = batch["completion_ids"][-1:] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        return self.with_balance_loss(
            functools.partial(super()._compute_loss, model, inputs, return_outputs), return_outputs
        )


def tokenize_pair_row(feature: dict[str, list[int]]) -> dict[str, list[int]]:
    """data_tools' prompt_ids/chosen_ids/rejected_ids -> the padded-collator fields of trl's CPO/ORPO trainers."""
    prompt = feature["prompt_ids"]
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name in ("chosen", "rejected"):
        completion = feature[f"{name}_ids"]
        row[f"{name}_input_ids"] = prompt + completion
        row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(completion))
        row[f"{name}_labels"] = [-100] * len(prompt) + completion
    return row


def pair_log_probs(trainer: Any, model: torch.nn.Module, batch: dict[str, Any], padding_value: int, prompt_nll: bool):
    """Chosen and rejected rows through the fused head in one forward.

    Returns per-token log-probs and mean logits [2B, S-1] (zero where not scored), the completion mask [2B, S-1] and
    the mask of the tokens the NLL term averages over: the completion, or with prompt_nll every real token (ORPO).
    """
    rows = trainer.concatenated_inputs(batch, padding_value=padding_value, device=trainer.accelerator.device)
    input_ids, attention = rows["concatenated_input_ids"], rows["concatenated_attention_mask"]  # [2B, S]
    labels = input_ids.masked_fill(attention == 0, -100) if prompt_nll else rows["concatenated_labels"]
    out = model(input_ids=input_ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
    completion = rows["concatenated_labels"][:, 1:] != -100  # [2B, S-1]
    return out.log_probs, out.mean_logits, completion, out.label_mask


class PairedFusedMixin:
    """CPO/ORPO: data_tools' tokens instead of trl's text tokenization, and log-probs from the fused head.

    trl's concatenated_forward builds [2B, S, V] logits; here only the scored positions go through the LM head,
    and the NLL term is the token mean that trl's CrossEntropyLoss takes, over the global batch of all ranks.
    """

    prompt_nll = False  # ORPO's NLL covers prompt + chosen (trl's choice, as in the ORPO authors' code)

    def tokenize_row(self, feature, model=None):
        if "prompt_ids" in feature:
            return tokenize_pair_row(feature)
        return super().tokenize_row(feature, model)

    def concatenated_forward(self, model, batch):
        padding_value = getattr(self, "padding_value", None)  # ORPO has one; CPO pads with the tokenizer's pad id
        padding_value = self.pad_token_id if padding_value is None else padding_value
        log_probs, mean_logits, completion, nll_mask = pair_log_probs(
            self, model, batch, padding_value, self.prompt_nll
        )
        half = batch["chosen_labels"].shape[0]
        logps = (log_probs * completion).sum(-1)  # [2B]
        if self.average_log_prob:
            logps = logps / completion.sum(-1).clamp(min=1)
        if self.nll_weight == 0:
            nll = log_probs.new_zeros(())
        else:
            nll = -(log_probs[:half] * nll_mask[:half]).sum() / self.nll_denominator(nll_mask[:half])
        logits = mean_logits.detach()
        chosen_logits, rejected_logits = logits[:half][completion[:half]], logits[half:][completion[half:]]
        return logps[:half], logps[half:], chosen_logits, rejected_logits, nll

    def nll_denominator(self, mask: torch.Tensor) -> torch.Tensor:
        """The NLL term's token count: this rank's, or under data parallelism the global count / process count.

        The ranks' gradients are averaged, so each rank's token sum over (global tokens / processes) gives the token
        mean of the whole global batch, as one process takes it. A rank-local mean weighted the tokens of a rank with
        short answers more: with chosen answers of 2 and 24 tokens, CPO's step-3 loss on 2 ranks was 1.9e-2 off one
        process's (tests/distributed/test_launch_preference.py).
        """
        processes = self.accelerator.num_processes
        if processes == 1:
            return mask.sum().clamp(min=1)
        total = self.accelerator.reduce(mask.sum().float(), reduction="sum")  # the same on every rank
        return total.clamp(min=1) / processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        compute = functools.partial(super().compute_loss, model, inputs, return_outputs, num_items_in_batch)
        return self.with_balance_loss(compute, return_outputs)


class DeepseekCPOTrainer(PairedFusedMixin, MoETrainerMixin, CPOTrainer):
    """trl's CPO loss family on our model (no reference model); loss_type=simpo with cpo_alpha=0 is SimPO."""

    def __init__(self, *args, router_bias_gamma: float | None = None, router_bias_update: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        add_fused_lm_head(unwrap_base(self.model), ("log_probs", "mean_logits"))
        self.setup_moe(router_bias_gamma, router_bias_update)

    @property
    def average_log_prob(self) -> bool:
        return self.loss_type in ("ipo", "simpo")

    @property
    def nll_weight(self) -> float:
        return self.cpo_alpha


class DeepseekORPOTrainer(PairedFusedMixin, MoETrainerMixin, ORPOTrainer):
    """trl's ORPO on our model (no reference model): length-normalised log-probs, NLL over prompt + chosen."""

    prompt_nll = True
    average_log_prob = True
    nll_weight = 1.0

    def __init__(self, *args, router_bias_gamma: float | None = None, router_bias_update: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        add_fused_lm_head(unwrap_base(self.model), ("log_probs", "mean_logits"))
        self.setup_moe(router_bias_gamma, router_bias_update)


def trainer_kwargs(config: Any) -> dict[str, Any]:
    """The MoE options every trainer takes from a stage config."""
    return dict(router_bias_gamma=config.router_bias_gamma, router_bias_update=config.router_bias_update)
