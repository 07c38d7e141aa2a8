"""Hugging Face checkpoint <-> bundled model: the one place that knows the checkpoint's key layout.

The checkpoint stores routed experts per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`), the MTP
module as layer index num_hidden_layers, and FP8 weights as e4m3 plus `weight_scale_inv`. The model holds fused
experts and `model.mtp.{k}`. Loading builds the model on the meta device, allocates it once, and streams
tensors in one at a time, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import FP8_QUANTIZATION_CONFIG, DeepseekV3Config, load_config, save_official_config
from .fp8 import apply_fp8_storage, check_quantization_config

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^model\.mtp\.(\d+)\.(.*)$")


logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as this model; the message lists every problem found."""


def resolve_dtype(dtype: torch.dtype | str | None, config: DeepseekV3Config) -> torch.dtype:
    """torch dtype from a dtype, its name, "auto" (the config's torch_dtype) or None (float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16"
        if isinstance(dtype, torch.dtype):
            return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float32' or 'auto'")
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Key mapping


def hf_key_to_internal(key: str, config: DeepseekV3Config) -> tuple[str, int | None, str | None]:
    """Checkpoint key -> (model parameter name, expert index or None, expert part or None).

    The part says which slice of the fused expert tensor the key fills: "gate" and "up" are the two halves of
    gate_up_proj's rows, "down" is down_proj.
    """
    expert = _EXPERT.match(key)
    part = index = None
    if expert:
        prefix, e, proj, suffix = expert.groups()
        index, part = int(e), proj.removesuffix("_proj")
        fused = "gate_up_proj" if part in ("gate", "up") else "down_proj"
        key = f"{prefix}.{fused}" + ("_scale_inv" if suffix == "weight_scale_inv" else "")
    layer = _LAYER.match(key)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        key = f"model.mtp.{int(layer.group(1)) - config.num_hidden_layers}.{layer.group(2)}"
    return key, index, part


def expert_slot(target: torch.Tensor, expert: int | None, part: str | None) -> torch.Tensor:
    """The view of a fused expert tensor (or of a whole tensor when expert is None) that one checkpoint key fills:
    expert `expert`'s rows, and of gate_up_proj the gate or the up half."""
    view = target if expert is None else target[expert]
    if part in ("gate", "up"):
        half = view.shape[0] // 2
        view = view[:half] if part == "gate" else view[half:]
    return view


# The MTP modules use the main model's embedding and output head (shared, as in the paper); the checkpoint also
# stores a copy of each per MTP layer, as the official files do. Main tensor name -> the copy's key suffix.
MTP_SHARED = {"model.embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "shared_head.head.weight"}


def mtp_shared_copy(key: str, config: DeepseekV3Config) -> str | None:
    """The main tensor a checkpoint key copies (model.layers.{L+k}.embed_tokens / shared_head.head), else None."""
    layer = _LAYER.match(key)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        for main, suffix in MTP_SHARED.items():
            if layer.group(2) == suffix:
                return main
    return None


def internal_to_hf(name: str, tensor: torch.Tensor, config: DeepseekV3Config) -> Iterator[tuple[str, torch.Tensor]]:
    """One model tensor -> its checkpoint tensors (fused experts split per expert, MTP renamed to its layer; the
    embedding and the output head also as each MTP layer's copy)."""
    if name in MTP_SHARED:
        yield name, tensor
        for k in range(config.num_mtp_modules):
            # A copy of its own: safetensors refuses tensors that share memory.
            yield f"model.layers.{config.num_hidden_layers + k}.{MTP_SHARED[name]}", tensor.detach().clone()
        return
    mtp = _MTP.match(name)
    if mtp:
        name = f"model.layers.{config.num_hidden_layers + int(mtp.group(1))}.{mtp.group(2)}"
    if name.endswith(".mlp.experts.gate_up_proj") or name.endswith(".mlp.experts.gate_up_proj_scale_inv"):
        prefix, scale = name.rsplit(".", 1)[0], name.endswith("_scale_inv")
        suffix = "weight_scale_inv" if scale else "weight"
        half = tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.gate_proj.{suffix}", tensor[e, :half]
            yield f"{prefix}.{e}.up_proj.{suffix}", tensor[e, half:]
    elif name.endswith(".mlp.experts.down_proj") or name.endswith(".mlp.experts.down_proj_scale_inv"):
        prefix, suffix = name.rsplit(".", 1)[0], "weight_scale_inv" if name.endswith("_scale_inv") else "weight"
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.down_proj.{suffix}", tensor[e]
    else:
        yield name, tensor


def iter_hf_state(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under checkpoint names, in model order."""
    state = model.state_dict() if state_dict is None else state_dict
    for name, tensor in state.items():
        yield from internal_to_hf(name, tensor, model.config)


# ---------------------------------------------------------------------------------------------------------------
# FP8 checkpoints


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = Wq * scale_inv[i // bm, j // bn] in fp32 (edge blocks may be partial)."""
    rows, cols = weight.shape
    expand = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * expand


def _quantization_config(config: DeepseekV3Config) -> dict:
    quant = getattr(config, "quantization_config", None) or {}
    return quant if isinstance(quant, dict) else quant.to_dict()


def _weight_block(config: DeepseekV3Config) -> tuple[int, int]:
    block = _quantization_config(config).get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


def fp8_module_names(files: dict[str, Path], config: DeepseekV3Config) -> list[str]:
    """Model modules whose checkpoint weights carry a `_scale_inv`: the ones that stay FP8 when kept."""
    names = {hf_key_to_internal(key, config)[0].rpartition(".")[0] for key in files if key.endswith("_scale_inv")}
    return sorted(names)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def list_checkpoint_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the file holding it, from the index or the single safetensors file."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(err).__name__}: {err})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map is empty or not an object")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: {len(missing)} shard file(s) listed but not found: {', '.join(missing)}")
        return {key: path / file for key, file in weight_map.items()}
    single = path / SINGLE_NAME
    if single.is_file():
        with _open_safetensors(single) as handle:
            return {key: single for key in handle.keys()}
    raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} found")


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:
        raise CheckpointError(
            f"{file}: cannot read it as safetensors, the shard is truncated or corrupt ({err})"
        ) from None


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    with _open_safetensors(file) as handle:
        return handle.get_tensor(key)


def _summarise(title: str, items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{len(items)} {title}: {shown}"


def load_state_into(
    model: torch.nn.Module,
    path: Path,
    strict: bool = True,
    progress: bool = True,
    skip: Iterable[str] = (),
) -> None:
    """Stream every tensor of the checkpoint at `path` into the already allocated `model`.

    `skip`: model tensors the checkpoint need not hold (a freshly initialised MTP module). Every problem is reported
    at once, under the checkpoint's own key names.
    """
    config = model.config
    files = list_checkpoint_files(path)
    block = _weight_block(config)
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    expected = set(model.state_dict().keys())
    filled: dict[str, set] = {name: set() for name in expected}
    experts = config.n_routed_experts
    unexpected, misshaped, errors = [], [], []
    copies: list[tuple[str, Path, str]] = []  # (checkpoint key, file, main tensor) of the MTP layers' shared copies

    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    bar = tqdm(total=len(files), desc="loading weights", unit="tensor", disable=not progress)
    # One shard open at a time: a mapped shard's pages count as resident, so keeping every shard open would
    # approach two copies of the model in memory by the end of the load.
    for file, keys in by_file.items():
        with _open_safetensors(file) as handle, torch.no_grad():
            present = set(handle.keys())
            for key in keys:
                bar.update(1)
                if key not in present:
                    errors.append(f"{key} is listed in the index for {file.name} but not stored there")
                    continue
                shared = mtp_shared_copy(key, config)
                if shared is not None and shared in targets:
                    copies.append((key, file, shared))  # checked against the main tensor once that is loaded
                    continue
                name, expert, part = hf_key_to_internal(key, config)
                if name not in targets:
                    if key.endswith("_scale_inv") and key.removesuffix("_scale_inv") in files:
                        continue  # an FP8 scale, consumed when its weight is dequantized
                    unexpected.append(key)
                    continue
                tensor = handle.get_tensor(key)
                if targets[name].dtype == torch.float8_e4m3fn and tensor.dtype != torch.float8_e4m3fn:
                    errors.append(f"{key} is {tensor.dtype}, but its _scale_inv in the checkpoint makes it FP8 (e4m3)")
                    continue
                if tensor.dtype == torch.float8_e4m3fn and not targets[name].dtype == torch.float8_e4m3fn:
                    scale_key = key + "_scale_inv"
                    if scale_key not in files:
                        errors.append(f"{key} is FP8 but its scale {scale_key} is missing")
                        continue
                    scale = (
                        _read_tensor(files[scale_key], scale_key)
                        if files[scale_key] != file
                        else handle.get_tensor(scale_key)
                    )
                    want = (math.ceil(tensor.shape[0] / block[0]), math.ceil(tensor.shape[1] / block[1]))
                    if tuple(scale.shape) != want:
                        errors.append(f"{scale_key} has shape {tuple(scale.shape)}, expected {want} for {key}")
                        continue
                    tensor = dequantize_fp8_block(tensor, scale, block)
                target = targets[name]
                if expert is None:
                    view = target
                else:
                    if expert >= experts:
                        unexpected.append(key)
                        continue
                    view = expert_slot(target, expert, part)
                if tuple(tensor.shape) != tuple(view.shape):
                    misshaped.append(f"{key} {tuple(tensor.shape)} (model expects {tuple(view.shape)})")
                    filled[name].add((expert, part))  # reported as mis-shaped, not again as missing
                    continue
                view.copy_(tensor.to(view.dtype))
                filled[name].add((expert, part))
    bar.close()
    check_mtp_copies(copies, targets, path)

    missing = []
    for name in sorted(expected - set(skip)):
        slots = filled[name]
        if name.endswith(("experts.gate_up_proj", "experts.gate_up_proj_scale_inv")):
            need = {(e, p) for e in range(experts) for p in ("gate", "up")}
        elif name.endswith(("experts.down_proj", "experts.down_proj_scale_inv")):
            need = {(e, "down") for e in range(experts)}
        else:
            need = {(None, None)}
        if not need <= slots:
            missing.append(checkpoint_key_of(name, config, sorted(need - slots, key=str)))
    problems = []
    if errors:
        problems.append(_summarise("unreadable tensors", errors))
    if misshaped:
        problems.append(_summarise("tensors with the wrong shape", misshaped))
    if missing:
        problems.append(_summarise("missing tensors", missing))
    if unexpected and strict:
        problems.append(_summarise("unexpected tensors", sorted(unexpected)))
    if problems:
        raise CheckpointError(f"{path} does not match the model config:\n  " + "\n  ".join(problems))


def check_mtp_copies(copies: list[tuple[str, Path, str]], targets: dict[str, torch.Tensor], path: Path) -> None:
    """The checkpoint's MTP copies of the embedding and head should equal the main ones; warn once where not."""
    differ = []
    with torch.no_grad():
        for key, file, main in copies:
            target = targets[main]
            if target.device.type == "meta" or target.numel() == 0:
                continue
            tensor = _read_tensor(file, key)
            if tuple(tensor.shape) != tuple(target.shape) or not torch.equal(tensor.to(target.dtype), target):
                differ.append(f"{key} (!= {main})")
    if differ:
        logger.warning(
            "%s: %s; the MTP module uses the main model's embedding and output head, as DeepSeek-V3 shares them "
            "(and vLLM and SGLang do), so the checkpoint's own copies are ignored",
            path,
            ", ".join(differ),
        )


def checkpoint_key_of(name: str, config: DeepseekV3Config, slots: list[tuple[int | None, str | None]]) -> str:
    """The checkpoint key(s) a model tensor comes from, for messages (fused experts: which expert slices)."""
    mtp = _MTP.match(name)
    key = f"model.layers.{config.num_hidden_layers + int(mtp.group(1))}.{mtp.group(2)}" if mtp else name
    if slots == [(None, None)]:
        return key
    prefix = key.rpartition(".experts.")[0] + ".experts"
    suffix = "weight_scale_inv" if key.endswith("_scale_inv") else "weight"
    ids = sorted({expert for expert, _ in slots})
    parts = "/".join(sorted({part for _, part in slots}))
    shown = ",".join(map(str, ids[:8])) + (",..." if len(ids) > 8 else "")
    return f"{prefix}.{{{shown}}}.{{{parts}}}_proj.{suffix} ({len(slots)} expert slices)"


def has_mtp_tensors(files: dict[str, Path], config: DeepseekV3Config) -> bool:
    """Whether the checkpoint stores any MTP tensor (layer index >= num_hidden_layers)."""
    for key in files:
        layer = _LAYER.match(key)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            return True
    return False


def init_fresh_mtp(model: torch.nn.Module) -> None:
    """A new MTP module for a checkpoint that has none: the fusion and the decoder block initialised as a new
    model's are, the output norm copied from the main model's final norm (the embedding and head are shared)."""
    with torch.no_grad():
        for layer in model.model.mtp:
            layer.apply(model._init_weights)
            layer.shared_head.norm.weight.copy_(model.model.norm.weight)


def load_pretrained(
    cls,
    path: str | Path,
    *args,
    torch_dtype: torch.dtype | str | None = None,
    dtype: torch.dtype | str | None = None,
    config: DeepseekV3Config | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    progress: bool = True,
    fp8: str = "keep",
    **kwargs,
):
    """Build `cls` on the meta device, allocate it once in the target dtype, and stream the checkpoint in.

    FP8 checkpoints: fp8="keep" holds every tensor that has a `_scale_inv` as e4m3 codes plus scales (about
    1 byte per weight, model.fp8); fp8="dequantize" converts them to `dtype` as fp8_cast_bf16.py does.
    """
    if args:
        raise TypeError(f"from_pretrained takes the path and keyword options only, got extra {args!r}")
    unknown = set(kwargs) - {"low_cpu_mem_usage", "attn_implementation", "use_safetensors", "trust_remote_code"}
    if unknown:
        raise TypeError(f"from_pretrained got unknown options: {', '.join(sorted(unknown))}")
    if kwargs.get("trust_remote_code"):
        raise ValueError("trust_remote_code is never needed: the model code is bundled")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    config = config or load_config(path)
    target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config)
    files = list_checkpoint_files(path)
    fresh_mtp = check_mtp_presence(config, files, path)
    model = build_meta_model(cls, config, path, files, target_dtype, fp8)
    model.to_empty(device=device)
    reset_nonpersistent_buffers(model)
    skip = [name for name in model.state_dict() if name.startswith("model.mtp.")] if fresh_mtp else []
    load_state_into(model, path, strict=strict, progress=progress, skip=skip)
    if fresh_mtp:
        init_fresh_mtp(model)
    model.config.dtype = target_dtype
    model.config._name_or_path = str(path)
    model.eval()
    return model


def check_mtp_presence(config: DeepseekV3Config, files: dict[str, Path], path: Path) -> bool:
    """A checkpoint whose config has MTP layers but whose files hold none (what transformers saves): one warning.

    With the MTP loss on, the module is built fresh (returns True); otherwise the model is built without it
    (config.num_nextn_predict_layers becomes 0, so a later save states what it holds).
    """
    if not config.num_mtp_modules or has_mtp_tensors(files, config):
        return False
    first = f"model.layers.{config.num_hidden_layers}.*"
    if config.mtp_loss_enabled:
        logger.warning(
            "%s: config.json has num_nextn_predict_layers=%d but the checkpoint has no MTP tensors (%s; transformers "
            "drops them on save): the MTP module is initialised fresh for the MTP loss (it shares the main "
            "embedding and head; its output norm starts as the final norm, the rest random)",
            path,
            config.num_mtp_modules,
            first,
        )
        return True
    logger.warning(
        "%s: config.json has num_nextn_predict_layers=%d but the checkpoint has no MTP tensors (%s; transformers "
        "drops them on save): loaded without the MTP module",
        path,
        config.num_mtp_modules,
        first,
    )
    config.num_nextn_predict_layers = 0
    return False


def build_meta_model(
    cls, config: DeepseekV3Config, path: Path, files: dict[str, Path], dtype: torch.dtype, fp8: str
) -> torch.nn.Module:
    """`cls` on the meta device in `dtype`; with fp8="keep", modules whose weights carry a scale become FP8."""
    if fp8 not in ("keep", "dequantize"):
        raise ValueError(f"fp8={fp8!r}: expected 'keep' (FP8 weights stay FP8) or 'dequantize'")
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    modules = dict(model.named_modules())
    quantized = fp8_module_names(files, config) if fp8 == "keep" else []
    quantized = [name for name in quantized if name in modules]  # the rest is reported as unexpected on load
    if quantized:
        scale_fmt = check_quantization_config(_quantization_config(config), str(path / "config.json"))
        apply_fp8_storage(model, quantized, scale_fmt, compute_dtype=dtype)
    elif getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # nothing stays FP8: a save must not claim the FP8 format
    return model


def reset_nonpersistent_buffers(model: torch.nn.Module) -> None:
    """Recompute buffers that are not in the checkpoint (RoPE frequencies) after a meta-device build."""
    from .rope import build_inv_freq

    for module in model.modules():
        if hasattr(module, "inv_freq"):
            inv_freq, module.attention_scaling = build_inv_freq(model.config)
            module.inv_freq = inv_freq.to(module.inv_freq.device)


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not match:
        raise ValueError(f"cannot parse shard size {size!r}; use e.g. '5GB' or a number of bytes")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(match.group(1)) * units[match.group(2)])


def save_pretrained(
    model: torch.nn.Module,
    save_directory: str | Path,
    *args,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = "5GB",
    is_main_process: bool = True,
    progress: bool = False,
    **kwargs,
) -> None:
    """Write config.json, generation_config.json and safetensors shards (+ index) in the HF layout."""
    if not is_main_process:
        return
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    names: list[tuple[str, torch.Tensor]] = list(iter_hf_state(model, state_dict))
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in names:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="saving shards", disable=not progress)):
        file = SINGLE_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in shard}
        save_file(tensors, str(out / (file + ".tmp")), metadata={"format": "pt"})
        os.replace(out / (file + ".tmp"), out / file)
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    save_checkpoint_config(model.config, out, (tensor for _, tensor in names))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def stored_dtype_name(tensors: Iterable[torch.Tensor]) -> str:
    """The torch_dtype a config.json states: the dtype holding most elements, FP8 weights and their scales aside."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.dtype != torch.float8_e4m3fn and tensor.dim() >= 2:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    if not counts:
        return "bfloat16"
    return str(max(counts, key=counts.get)).removeprefix("torch.")


def save_checkpoint_config(config: DeepseekV3Config, out: Path, tensors: Iterable[torch.Tensor]) -> None:
    """config.json in the official form for the tensors just written (quantization_config only when some are FP8)."""
    tensors = list(tensors)
    fp8 = any(t.dtype == torch.float8_e4m3fn for t in tensors)
    quant = None
    if fp8:
        quant = dict(_quantization_config(config)) or dict(FP8_QUANTIZATION_CONFIG)
    save_official_config(config, out, stored_dtype_name(tensors), quant)
