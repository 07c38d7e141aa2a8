"""Export: merge a LoRA adapter into a DeepSeek-V3 checkpoint shard by shard (BF16 or FP8), or write the adapter alone.

    python -m finetune.export --base DIR --adapter DIR --out DIR --format bf16|fp8|adapter

Without --adapter it is the plain converter (FP8 -> BF16, BF16 -> FP8) of a whole checkpoint. The base is read one
tensor at a time with plain file reads (no mmap, so no shard stays resident) and every output shard is streamed to
disk as it is computed: peak memory is the adapter plus a few copies of the largest tensor, whatever the model size.
Tensors the adapter does not touch are copied byte for byte unless the format changes them (FP8 -> BF16). Everything
is checked before the first byte is written, written into a hidden staging folder and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from data_tools.tokenizer import copy_tokenizer_files
from model import CheckpointError, ConfigError, DeepseekV3Config, load_config
from model.checkpoint import INDEX_NAME, hf_key_to_internal, list_checkpoint_files, stored_dtype_name
from model.config import FP8_QUANTIZATION_CONFIG, save_official_config
from model.fp8 import (
    BLOCK_SIZE,
    check_quantization_config,
    dequantize_weight,
    is_official_fp8_weight,
    quantize_weight,
)

logger = logging.getLogger(__name__)

FORMATS = ("bf16", "fp8", "adapter")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT_NAME = "export_report.json"
# Files of the base folder that the export writes itself or must not carry over.
# Weights, indexes, the card, pickles, hidden files, and a training run's own logs and reports (they describe the run
# that made the base, not the export).
NOT_COPIED = re.compile(
    r"(model.*\.safetensors|.*\.index\.json|README\.md|.*\.(bin|pt|pth|gguf)|\..*|losses\.jsonl|report\.md"
    r"|trainer_state\.json|adapter_.*|export_report\.json)$"
)
DEFAULT_FP8_WARN_BELOW = 0.5
COPY_CHUNK = 64 << 20

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class ExportError(CheckpointError):
    """An export that cannot be done; raised before anything is written, with one sentence naming the file."""


# ---------------------------------------------------------------------------------------------------------------
# safetensors without mmap: headers, single tensors, streamed shards


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo from a safetensors header; a short or malformed file is one ExportError."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError("the header is longer than the file")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as err:
        raise ExportError(f"{file}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    tensors, base = {}, 8 + length
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        if base + end > size:
            raise ExportError(f"{file}: truncated, tensor {name} ends at byte {base + end} of a {size}-byte file")
        tensors[name] = TensorInfo(file, entry["dtype"], tuple(entry["shape"]), base + start, base + end)
    return tensors


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor read into its own memory (no mapping of the shard stays alive)."""
    if info.dtype not in DTYPES:
        raise ExportError(f"{info.file}: dtype {info.dtype} is not supported")
    buffer = bytearray(info.nbytes)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        f.readinto(buffer)
    if not buffer:
        return torch.empty(info.shape, dtype=DTYPES[info.dtype])
    return torch.frombuffer(buffer, dtype=torch.uint8).view(DTYPES[info.dtype]).reshape(info.shape)


class ShardWriter:
    """Writes one safetensors file tensor by tensor; the header is known up front from the plan."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        self.expected = [(name, nbytes) for name, _, _, nbytes in entries]
        self.file = open(path, "wb")
        self.file.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor (in plan order); returns the bytes written."""
        expected_name, nbytes = self.expected.pop(0)
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        if name != expected_name or data.nbytes != nbytes:
            raise RuntimeError(f"shard writer: got {name} ({data.nbytes} bytes), planned {expected_name} ({nbytes})")
        self.file.write(data)
        return nbytes

    def copy(self, info: TensorInfo) -> int:
        """Append a tensor of the base byte for byte, in chunks."""
        self.expected.pop(0)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            left = info.nbytes
            while left:
                chunk = f.read(min(COPY_CHUNK, left))
                self.file.write(chunk)
                left -= len(chunk)
        return info.nbytes

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------------------------
# The adapter: peft LoRA factors mapped onto checkpoint keys


@dataclass
class LoraDelta:
    """delta = b @ a for one checkpoint weight; `b` already carries peft's scaling (alpha / r or alpha / sqrt r)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    module: str  # the adapter's module (or parameter) name, for messages

    def delta(self) -> torch.Tensor:
        return self.b.float() @ self.a.float()


@dataclass
class TokenRows:
    """peft trainable tokens: these rows of an embedding are replaced by `values` (not added to)."""

    indices: torch.Tensor  # [n] token ids
    values: torch.Tensor  # [n, hidden]
    module: str

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy_(0, self.indices, self.values.to(weight.dtype))


@dataclass
class Adapter:
    """A LoRA adapter resolved against a base checkpoint: checkpoint key -> LoraDelta (and -> TokenRows)."""

    path: Path
    config: dict
    deltas: dict[str, LoraDelta]
    nbytes: int
    rows: dict[str, TokenRows] = field(default_factory=dict)


def _pattern_value(patterns: dict, key: str, default):
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _scaling(config: dict, key: str, rank: int, where: str) -> float:
    expected = _pattern_value(config.get("rank_pattern"), key, config.get("r"))
    if expected is not None and int(expected) != rank:
        raise ExportError(f"{where}: {key} has rank {rank} in the weights but {expected} in {ADAPTER_CONFIG}")
    raw = _pattern_value(config.get("alpha_pattern"), key, config.get("lora_alpha", 8))
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw <= 0:
        raise ExportError(f"{where}: lora_alpha for {key} is {raw!r} in {ADAPTER_CONFIG}; it must be a number > 0")
    alpha = float(raw)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter_files(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter tensors (keys without the base_model.model. prefix), checked."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise ExportError(f"{path}: adapter folder not found")
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise ExportError(f"{path}: no {ADAPTER_CONFIG}; is this a peft adapter folder?")
    if not weights.is_file():
        found = "adapter_model.bin" if (path / "adapter_model.bin").is_file() else "none"
        raise ExportError(f"{path}: no {ADAPTER_WEIGHTS} (found: {found}); save the adapter with safe_serialization")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{config_file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    where = str(config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{where}: peft_type {config.get('peft_type')!r} cannot be merged (only LORA)")
    for key, why in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("modules_to_save", "modules_to_save")):
        if config.get(key):
            raise ExportError(f"{where}: {key} is set; {why} are not supported by the export")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            tensors = {key.removeprefix("base_model.model."): handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:
        raise ExportError(f"{weights}: cannot read it as safetensors ({err})") from None
    other = sorted(
        k for k in tensors if not re.search(r"\.lora_[AB]\.weight$|\.token_adapter\.trainable_tokens_delta$", k)
    )
    if other:
        raise ExportError(
            f"{weights}: holds tensors that are neither LoRA A/B weights nor trainable tokens, e.g. {other[0]} "
            f"({len(other)})"
        )
    return config, tensors


def _token_rows(
    config: dict, tensors: dict[str, torch.Tensor], where: str
) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Module -> (token ids, [n, hidden] rows) of peft's trainable tokens; the ids come from adapter_config.json."""
    found = {
        k.removesuffix(".token_adapter.trainable_tokens_delta"): t for k, t in tensors.items() if "token_adapter" in k
    }
    indices = config.get("trainable_token_indices")
    if not found:
        return {}
    if not indices:
        raise ExportError(f"{where}: the adapter holds trainable token rows but no trainable_token_indices")
    out = {}
    for module, values in found.items():
        if isinstance(indices, dict):
            ids = next((v for name, v in indices.items() if module == name or module.endswith("." + name)), None)
        else:
            ids = indices  # a plain list applies to the input embedding
        if ids is None:
            raise ExportError(f"{where}: no trainable_token_indices entry names {module}")
        if values.dim() != 2 or values.shape[0] != len(ids):
            raise ExportError(
                f"{where}: {module} has {list(values.shape)} trainable token rows for {len(ids)} token ids"
            )
        out[module] = (list(ids), values)
    return out


def resolve_adapter(
    adapter_dir: str | Path, config: DeepseekV3Config, base: dict[str, TensorInfo], base_name: str
) -> Adapter:
    """Map every LoRA pair of a peft adapter saved from our model onto the base checkpoint's keys, checking shapes."""
    adapter_config, tensors = read_adapter_files(adapter_dir)
    where = str(Path(adapter_dir) / ADAPTER_WEIGHTS)
    slots = {hf_key_to_internal(key, config): key for key in base if key.endswith(".weight")}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    deltas: dict[str, LoraDelta] = {}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def base_key(name: str, expert: int | None = None, part: str | None = None) -> str:
        key = slots.get((name, expert, part))
        if key is None:
            shown = name if expert is None else f"{name} (expert {expert}, {part})"
            raise ExportError(
                f"{where}: adapter module {shown} has no weight in {base_name}; adapter for another base?"
            )
        return key

    def check(key: str, rows: int, cols: int, module: str) -> None:
        if base[key].shape != (rows, cols):
            raise ExportError(
                f"{where}: {module} makes a [{rows}, {cols}] delta but {key} is {list(base[key].shape)} in "
                f"{base_name}; adapter for another base?"
            )

    expert_params = []
    for module in modules:
        a, b = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise ExportError(f"{where}: {module} has only one of lora_A / lora_B")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(f"{where}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; ranks differ")
        if re.search(r"\.mlp\.experts(\.base_layer)*$", module):
            expert_params.append((module, a, b))
            continue
        key = base_key(f"{module}.weight")
        check(key, b.shape[0], a.shape[1], module)
        deltas[key] = LoraDelta(a, b * _scaling(adapter_config, module, a.shape[0], where), module)

    # Routed experts: peft's ParamWrapper on the fused [E, 2I, H] gate_up_proj / [E, H, I] down_proj, nested when both
    # are adapted (experts.lora_* and experts.base_layer.lora_*). The files do not say which parameter a wrapper
    # holds; the shapes do (gate_up: in H, out 2I; down: in I, out H).
    experts, hidden, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    for module, a, b in expert_params:
        owner = re.sub(r"(\.base_layer)+$", "", module)
        if (a.shape[1], b.shape[0]) == (hidden, 2 * inter):
            param, parts = "gate_up_proj", (("gate", 0), ("up", inter))
        elif (a.shape[1], b.shape[0]) == (inter, hidden):
            param, parts = "down_proj", (("down", 0),)
        else:
            raise ExportError(
                f"{where}: {module} (lora_A {list(a.shape)}, lora_B {list(b.shape)}) fits neither gate_up_proj "
                f"[{experts}, {2 * inter}, {hidden}] nor down_proj [{experts}, {hidden}, {inter}] of {base_name}"
            )
        if a.shape[0] % experts or b.shape[1] != a.shape[0]:
            raise ExportError(f"{where}: {module} has a rank dimension {a.shape[0]} not divisible by {experts} experts")
        rank = a.shape[0] // experts
        scale = _scaling(adapter_config, f"{owner}.{param}", rank, where)
        a_experts = a.reshape(experts, rank, a.shape[1])  # [E, r, in], expert-major as peft lays it out
        b_experts = b.reshape(b.shape[0], rank, experts)  # [out, r, E], rank-major
        for e in range(experts):
            for part, row in parts:
                rows = inter if part != "down" else hidden
                key = base_key(f"{owner}.{param}", e, part)
                check(key, rows, a.shape[1], f"{module} (expert {e}, {part})")
                if key in deltas:
                    raise ExportError(f"{where}: {key} is adapted twice (two wrappers on {owner}.{param})")
                deltas[key] = LoraDelta(a_experts[e], b_experts[row : row + rows, :, e] * scale, f"{owner}.{param}")
    token_rows = {}
    for module, (ids, values) in _token_rows(adapter_config, tensors, where).items():
        key = base_key(f"{module}.weight")
        vocab = base[key].shape[0]
        check(key, vocab, values.shape[1], f"{module} (trainable tokens)")
        if max(ids) >= vocab or min(ids) < 0:
            raise ExportError(f"{where}: {module} trains token id {max(ids)} but {key} has {vocab} rows")
        token_rows[key] = TokenRows(torch.tensor(ids), values, module)
    # The MTP layers share the main embedding; their copies in the checkpoint get the same rows (unless an older
    # adapter trained a copy of its own).
    if "model.embed_tokens.weight" in token_rows:
        for k in range(config.num_mtp_modules):
            copy = f"model.layers.{config.num_hidden_layers + k}.embed_tokens.weight"
            if copy in base and copy not in token_rows:
                token_rows[copy] = token_rows["model.embed_tokens.weight"]
    return Adapter(Path(adapter_dir), adapter_config, deltas, nbytes, token_rows)


# ---------------------------------------------------------------------------------------------------------------
# The plan: what every output tensor is, computed from the headers before anything is written


@dataclass
class Entry:
    """One output tensor: copied from the base, or computed (merged, dequantized, quantized)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo
    scale: TensorInfo | None = None  # the base's weight_scale_inv when the source is FP8
    delta: LoraDelta | None = None
    rows: TokenRows | None = None  # trainable-token rows replacing some of an embedding's rows
    quantize: bool = False  # output as e4m3; its scale is the next entry
    is_scale: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def copied(self) -> bool:
        unchanged = self.delta is None and self.rows is None
        return unchanged and not self.quantize and not self.is_scale and self.dtype == self.source.dtype


@dataclass
class Fp8Stat:
    """How much of a LoRA delta survived re-quantization of one tensor."""

    kept: float  # <stored change, delta> / |delta|^2: 1 = all of it, 0 = none
    error: float  # |stored change - delta| / |delta|


@dataclass
class ExportResult:
    """What an export wrote: folder, bytes, seconds and, for FP8 merges, per-tensor delta survival."""

    out: Path
    fmt: str
    bytes_written: int = 0
    seconds: float = 0.0
    tensors_merged: int = 0
    fp8: dict[str, Fp8Stat] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


def scale_fmt_of(config_values: dict, where: str) -> str | None:
    """The base's FP8 scale format (None = fp32 scales, or 'ue8m0'), validated."""
    quant = config_values.get("quantization_config")
    return check_quantization_config(quant, where) if quant else None


def plan_shards(
    base: dict[str, TensorInfo],
    files: dict[str, Path],
    fmt: str,
    deltas: dict[str, LoraDelta],
    replaced_rows: dict[str, TokenRows] | None = None,
) -> list[list[Entry]]:
    """One output shard per base shard, in the base's order; FP8 scales travel with their weights."""
    base_has_fp8 = any(info.dtype == "F8_E4M3" for info in base.values())
    replaced_rows = replaced_rows or {}
    shards: dict[Path, list[Entry]] = {file: [] for file in dict.fromkeys(files.values())}
    for key, info in base.items():
        if key.endswith("_scale_inv") and key.removesuffix("_scale_inv") in base:
            continue  # written with its weight
        scale = base.get(key + "_scale_inv") if info.dtype == "F8_E4M3" else None
        delta, token_rows = deltas.get(key), replaced_rows.get(key)
        entry = Entry(key, info.dtype, info.shape, info, scale, delta, token_rows)
        if fmt == "fp8":
            # Without FP8 tensors in the base, quantize exactly where the official checkpoint does.
            quantized = info.dtype == "F8_E4M3" if base_has_fp8 else is_official_fp8_weight(key)
            # An untouched FP8 tensor keeps its codes and scale byte for byte; anything else quantized is recomputed.
            changed = delta is not None or token_rows is not None
            entry.quantize = quantized and (changed or info.dtype != "F8_E4M3")
            entry.dtype = "F8_E4M3" if quantized else info.dtype
        elif info.dtype == "F8_E4M3":
            entry.dtype = "BF16"
        shards[files[key]].append(entry)
        if entry.dtype == "F8_E4M3":
            rows, cols = info.shape
            scale_shape = (math.ceil(rows / BLOCK_SIZE), math.ceil(cols / BLOCK_SIZE))
            source = scale if scale is not None and not entry.quantize else info
            shards[files[key]].append(Entry(key + "_scale_inv", "F32", scale_shape, source, is_scale=True))
    return [entries for entries in shards.values() if entries]


def check_base(base_dir: Path) -> tuple[DeepseekV3Config, dict, dict[str, Path], dict[str, TensorInfo]]:
    """Config, raw config.json values, key -> file and key -> TensorInfo of the base, every problem an ExportError."""
    if not base_dir.is_dir():
        raise ExportError(f"{base_dir}: base checkpoint folder not found")
    try:
        config = load_config(base_dir)
        files = list_checkpoint_files(base_dir)
    except (ConfigError, CheckpointError) as err:
        raise ExportError(str(err)) from None
    values = json.loads((base_dir / "config.json").read_text())
    if values.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise ExportError(f"{base_dir / 'config.json'}: model_type {values['model_type']!r} is not deepseek_v3")
    try:
        scale_fmt_of(values, str(base_dir / "config.json"))
    except ValueError as err:
        raise ExportError(str(err)) from None
    base: dict[str, TensorInfo] = {}
    for file in dict.fromkeys(files.values()):
        header = read_header(file)
        for key in [k for k, f in files.items() if f == file]:
            if key not in header:
                raise ExportError(f"{file}: tensor {key} is listed in {INDEX_NAME} but not stored in the shard")
            base[key] = header[key]
    for key, info in base.items():
        if info.dtype not in DTYPES:
            raise ExportError(f"{info.file}: tensor {key} has dtype {info.dtype}, which the export cannot handle")
        if info.dtype == "F8_E4M3":
            scale = base.get(key + "_scale_inv")
            if scale is None:
                raise ExportError(f"{info.file}: FP8 tensor {key} has no {key}_scale_inv in the checkpoint")
            want = tuple(math.ceil(n / BLOCK_SIZE) for n in info.shape)
            if len(info.shape) != 2 or scale.shape != want or scale.dtype != "F32":
                raise ExportError(
                    f"{scale.file}: {key}_scale_inv is {scale.dtype} {list(scale.shape)}, expected F32 {list(want)}"
                )
        elif info.dtype.startswith("F8"):
            raise ExportError(f"{info.file}: tensor {key} is {info.dtype}; only e4m3 FP8 checkpoints are supported")
    return config, values, files, base


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _staging(out: Path) -> Path:
    # Hidden and marked partial: an interrupted export never leaves a folder that looks like a checkpoint.
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out}: appeared while exporting; not overwritten")
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Partial folders of exports to `out` that were killed (their process is gone): nobody else removes them."""
    for folder in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = folder.name.rpartition("-")
        if kind.endswith((".partial", ".old")) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def side_file_bytes(base_dir: Path, tokenizer_dir: str | Path | None = None) -> int:
    """Bytes of the small files an export copies besides the shards (tokenizer, generation config, ...)."""
    files = [f for f in base_dir.iterdir() if f.is_file() and not NOT_COPIED.fullmatch(f.name)]
    if tokenizer_dir is not None:
        files += [f for f in Path(tokenizer_dir).iterdir() if f.is_file()]
    return sum(f.stat().st_size for f in files) + (1 << 20)  # + config, card, report, index


def _check_out(out: Path, overwrite: bool, needed_bytes: int, *inputs: Path | None) -> None:
    for source in (p for p in inputs if p is not None):
        source = Path(source).absolute()
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            raise ExportError(
                f"--out {out} is or contains an input ({source}); the export would replace what it reads: "
                "choose another --out"
            )
    _remove_stale(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; choose another --out or pass --overwrite")
    parent = out.parent
    if not parent.is_dir():
        raise ExportError(f"{parent}: the folder for --out does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{parent}: not writable")
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise ExportError(
            f"{parent}: the export needs {needed_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free"
        )


def _merged_weight(entry: Entry) -> torch.Tensor:
    """The base weight in fp32 (FP8 dequantized with the official formula) plus the delta if any."""
    weight = read_tensor(entry.source)
    if entry.source.dtype == "F8_E4M3":
        weight = dequantize_weight(weight, read_tensor(entry.scale), torch.float32, entry.name)
    else:
        weight = weight.float()
    if entry.delta is not None:
        weight += entry.delta.delta()
    if entry.rows is not None:
        entry.rows.apply(weight)
    return weight


def _fp8_stat(entry: Entry, merged: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, scale_fmt) -> Fp8Stat:
    """Compare the change the FP8 tensor really stores with the intended delta.

    The reference is the base as FP8 (for an FP8 base: itself; for a BF16 base: its plain quantization), so the
    figure isolates what re-quantizing the merged weight does to the delta.
    """
    delta = entry.delta.delta()
    if entry.source.dtype == "F8_E4M3":
        reference = dequantize_weight(read_tensor(entry.source), read_tensor(entry.scale), torch.float32)
    else:
        reference = dequantize_weight(*quantize_weight(merged - delta, scale_fmt), torch.float32)
    stored = dequantize_weight(codes, scale, torch.float32) - reference
    norm = float(delta.pow(2).sum())
    if norm == 0.0:
        return Fp8Stat(1.0, 0.0)
    return Fp8Stat(float((stored * delta).sum()) / norm, float((stored - delta).pow(2).sum() / norm) ** 0.5)


def write_shards(
    shards: list[list[Entry]], staging: Path, scale_fmt: str | None, result: ExportResult, progress: bool
) -> dict[str, str]:
    """Stream every planned shard into `staging`; returns the index's weight_map."""
    weight_map: dict[str, str] = {}
    total = sum(entry.nbytes for shard in shards for entry in shard)
    bar = tqdm(
        total=total, desc=f"export {result.fmt}", unit="B", unit_scale=True, unit_divisor=1000, disable=not progress
    )
    start = time.perf_counter()
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(staging / name, [(e.name, e.dtype, e.shape, e.nbytes) for e in shard])
        pending_scale: torch.Tensor | None = None
        try:
            for entry in shard:
                weight_map[entry.name] = name
                if entry.is_scale and pending_scale is not None:
                    written = writer.write(entry.name, pending_scale.float())
                    pending_scale = None
                elif entry.is_scale or entry.copied:
                    written = writer.copy(entry.source)  # untouched tensors, FP8 codes and scales: byte for byte
                elif entry.dtype == "F8_E4M3":
                    merged = _merged_weight(entry)
                    codes, pending_scale = quantize_weight(merged, scale_fmt, entry.name)
                    if entry.delta is not None:
                        result.fp8[entry.name] = _fp8_stat(entry, merged, codes, pending_scale, scale_fmt)
                    written = writer.write(entry.name, codes)
                else:
                    merged = _merged_weight(entry)
                    written = writer.write(entry.name, merged.to(DTYPES[entry.dtype]))
                result.tensors_merged += entry.delta is not None or entry.rows is not None
                bar.update(written)
                result.bytes_written += written
            if writer.expected:
                raise RuntimeError(f"{name}: {len(writer.expected)} planned tensors were not written")
        finally:
            writer.close()
    bar.close()
    result.seconds = time.perf_counter() - start
    return weight_map


def write_config(config: DeepseekV3Config, out: Path, fmt: str, scale_fmt: str | None, torch_dtype: str) -> None:
    """config.json of the output in the official form: quantization_config only for fp8, the stored dtype named."""
    quant = dict(FP8_QUANTIZATION_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {})) if fmt == "fp8" else None
    save_official_config(config, out, torch_dtype, quant)


def copy_side_files(base_dir: Path, out: Path, tokenizer_dir: str | Path | None, result: ExportResult) -> None:
    """generation_config, tokenizer, chat template and other small files of the base; a tokenizer from elsewhere."""
    for file in sorted(base_dir.iterdir()):
        if file.is_file() and file.name != "config.json" and not NOT_COPIED.fullmatch(file.name):
            shutil.copy2(file, out / file.name)
    if not (out / "generation_config.json").is_file():
        config = json.loads((out / "config.json").read_text())
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False}, indent=2) + "\n")
    has_tokenizer = (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    if not has_tokenizer and tokenizer_dir is not None:
        copied = copy_tokenizer_files(tokenizer_dir, out)
        if not copied:
            raise ExportError(f"{tokenizer_dir}: no tokenizer files found there")
        has_tokenizer = True
    if not has_tokenizer:
        result.warnings.append(f"{base_dir} has no tokenizer files and no --tokenizer was given: the output has none")


def _summary_fp8(stats: dict[str, Fp8Stat]) -> str:
    kept = sorted(s.kept for s in stats.values())
    errors = sorted(s.error for s in stats.values())
    return (
        f"{len(kept)} tensors; delta kept: min {kept[0]:.3f}, median {kept[len(kept) // 2]:.3f}; "
        f"relative error: median {errors[len(errors) // 2]:.3f}, max {errors[-1]:.3f}"
    )


FP8_SUMMARY_HELP = (
    "How to read the FP8 delta figures: re-quantizing a merged weight to FP8 rounds it to the e4m3 grid of its "
    "128x128 block, and a LoRA delta smaller than that grid's step is partly rounded away. Per tensor, 'delta kept' "
    "is the share of the adapter's change that the stored weights still carry (<change, delta> / |delta|^2: 1 = all, "
    "0 = none) and 'relative error' is |stored change - delta| / |delta|. A median kept near 1 with errors below 1 "
    "means the FP8 export carries the fine-tuning; where it is low, export --format bf16 keeps all of it. Per tensor: "
    "export_report.json."
)


def write_card(out: Path, title: str, lines: list[str], card: dict | None, base_model: str | None) -> None:
    """README.md model card: what the folder is, what it came from, and what the caller knows about training."""
    card = card or {}
    front = ["---", "library_name: transformers", "tags:", "- deepseek_v3", "- fine-tuned"]
    if card.get("base_model") or base_model:
        front.append(f"base_model: {card.get('base_model') or base_model}")
    text = [*front, "---", "", f"# {card.get('name', title)}", "", *lines, ""]
    if card.get("description"):
        text += [card["description"], ""]
    for key, heading in (("data", "Data"), ("stages", "Training stages")):
        if card.get(key):
            items = card[key] if isinstance(card[key], list) else [card[key]]
            text += [f"## {heading}", "", *[f"- {item}" for item in items], ""]
    if card.get("hyperparameters"):
        text += ["## Hyper-parameters", "", "| name | value |", "| --- | --- |"]
        text += [f"| {k} | {v} |" for k, v in card["hyperparameters"].items()] + [""]
    if card.get("evaluation"):
        rows = card["evaluation"]
        rows = [{"metric": k, "value": v} for k, v in rows.items()] if isinstance(rows, dict) else rows
        columns = list(dict.fromkeys(k for row in rows for k in row))
        text += ["## Evaluation", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        text += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows] + [""]
    (out / "README.md").write_text("\n".join(text))


def export_merged(
    base_dir: str | Path,
    adapter_dir: str | Path | None,
    out_dir: str | Path,
    fmt: str = "bf16",
    tokenizer_dir: str | Path | None = None,
    card: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    fp8_warn_below: float = DEFAULT_FP8_WARN_BELOW,
) -> ExportResult:
    """Merge `adapter_dir` (None: plain conversion) into `base_dir` and write a complete checkpoint to `out_dir`.

    fmt "bf16": FP8 weights are dequantized to BF16 with the official formula, other tensors keep their dtype, the
    quantization_config is removed. fmt "fp8": the official e4m3 128x128 format; untouched FP8 tensors are copied byte
    for byte, touched ones dequantized, merged and re-quantized (a BF16 base is quantized as the official checkpoint
    is). Raises ExportError before writing anything when the inputs do not fit together.
    """
    if fmt not in ("bf16", "fp8"):
        raise ExportError(f"format {fmt!r} is not a merged format; use 'bf16' or 'fp8' (or export_adapter)")
    base_dir, out = Path(base_dir), Path(out_dir).absolute()
    config, values, files, base = check_base(base_dir)
    scale_fmt = scale_fmt_of(values, str(base_dir / "config.json"))
    adapter = resolve_adapter(adapter_dir, config, base, str(base_dir)) if adapter_dir is not None else None
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise ExportError(f"{tokenizer_dir}: tokenizer folder not found")
    shards = plan_shards(base, files, fmt, adapter.deltas if adapter else {}, adapter.rows if adapter else {})
    needed = sum(e.nbytes for shard in shards for e in shard) + side_file_bytes(base_dir, tokenizer_dir)
    _check_out(out, overwrite, needed, base_dir, Path(adapter_dir) if adapter_dir else None, tokenizer_dir)

    result = ExportResult(out, fmt)
    staging = _staging(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        weight_map = write_shards(shards, staging, scale_fmt, result, progress)
        if result.fp8:
            bad = {k: s for k, s in result.fp8.items() if s.kept < fp8_warn_below}
            if bad:
                worst = sorted(bad.items(), key=lambda kv: kv[1].kept)[:5]
                shown = ", ".join(f"{k} ({s.kept:.2f})" for k, s in worst)
                result.warnings.append(
                    f"FP8 re-quantization kept less than {fp8_warn_below:.0%} of the LoRA delta in {len(bad)} of "
                    f"{len(result.fp8)} tensors, worst: {shown}; export --format bf16 to keep all of it"
                )
        total = sum(e.nbytes for shard in shards for e in shard)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        # The dtype of most elements, from the plan (meta tensors: nothing is read).
        stored = stored_dtype_name(
            torch.empty(e.shape, dtype=DTYPES[e.dtype], device="meta") for s in shards for e in s
        )
        write_config(config, staging, fmt, scale_fmt, stored)
        copy_side_files(base_dir, staging, tokenizer_dir, result)
        # --format bf16 dequantizes FP8 to BF16 and keeps every other tensor's dtype (an fp32 base stays fp32).
        lines = [f"DeepSeek-V3 checkpoint in {'FP8 (e4m3, 128x128 block scales)' if fmt == 'fp8' else stored}."]
        lines += [f"- base: `{base_dir}`"]
        if adapter is not None:
            cfg = adapter.config
            lines += [
                f"- merged LoRA adapter: `{adapter.path}` (r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}, "
                f"rslora={bool(cfg.get('use_rslora'))}), {len(adapter.deltas)} weights changed"
            ]
            for key, token_rows in adapter.rows.items():
                lines += [f"- {len(token_rows.indices)} trained token rows of `{key}` (peft trainable tokens)"]
        if result.fp8:
            lines += [f"- FP8 delta survival: {_summary_fp8(result.fp8)} (per tensor in {REPORT_NAME})"]
            lines += ["", FP8_SUMMARY_HELP, ""]
        lines += ["- the multi-token-prediction layer is kept (layer index num_hidden_layers)"]
        base_model = (adapter.config.get("base_model_name_or_path") if adapter else None) or str(base_dir)
        write_card(staging, out.name, lines, card, base_model)
        report = {
            "format": fmt,
            "base": str(base_dir),
            "adapter": str(adapter.path) if adapter else None,
            "bytes_written": result.bytes_written,
            "seconds": round(result.seconds, 3),
            "tensors_merged": result.tensors_merged,
            "warnings": result.warnings,
            "fp8_delta": {k: {"kept": s.kept, "error": s.error} for k, s in result.fp8.items()},
        }
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for warning in result.warnings:
        logger.warning(warning)
    return result


def convert_checkpoint(
    base_dir: str | Path, out_dir: str | Path, fmt: str, overwrite: bool = False, progress: bool = True
) -> ExportResult:
    """The plain converters: FP8 -> BF16 (fmt "bf16") and BF16 -> FP8 (fmt "fp8") for a whole checkpoint."""
    return export_merged(base_dir, None, out_dir, fmt, overwrite=overwrite, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# --format adapter


def export_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base_dir: str | Path,
    card: dict | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """The adapter alone in standard PEFT format with checkpoint module names (per-expert keys, no fused experts).

    Every module gets the same rank (the largest; smaller ones are zero-padded) and scaling 1 (alpha = r, peft's
    scale folded into lora_B), so engines that need one rank per adapter accept it. LoRA on the MTP layer is dropped
    (engines and transformers do not run it). Shared-expert and dense-MLP LoRA are listed in target_parameters, not
    target_modules: peft 0.21 on transformers 5 re-targets any gate/up/down_proj module name onto the routed experts.
    """
    base_dir, out = Path(base_dir), Path(out_dir).absolute()
    config, values, files, base = check_base(base_dir)
    adapter = resolve_adapter(adapter_dir, config, base, str(base_dir))
    if adapter.rows:
        raise ExportError(
            f"{adapter.path}: the adapter trains embedding rows ({', '.join(sorted(adapter.rows))}), which a serving "
            "engine's LoRA adapter cannot carry; export --format bf16 or fp8 to merge them"
        )
    _check_out(out, overwrite, 2 * adapter.nbytes + (1 << 20), base_dir, Path(adapter_dir))
    result = ExportResult(out, "adapter")
    mtp = re.compile(r"^model\.layers\.(\d+)\.")
    kept = {
        k: d for k, d in adapter.deltas.items() if not (m := mtp.match(k)) or int(m.group(1)) < config.num_hidden_layers
    }
    if len(kept) < len(adapter.deltas):
        result.warnings.append(
            f"dropped LoRA on {len(adapter.deltas) - len(kept)} weights of the MTP layer: serving engines do not apply "
            "adapters to it (export --format bf16/fp8 merges them)"
        )
    if not kept:
        raise ExportError(f"{adapter.path}: the adapter only changes the MTP layer; nothing to export as an adapter")
    rank = max(d.a.shape[0] for d in kept.values())
    tensors: dict[str, torch.Tensor] = {}
    modules, parameters = set(), set()
    routed = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")
    for key, delta in kept.items():
        module = key.removesuffix(".weight")
        pad = rank - delta.a.shape[0]
        a = torch.nn.functional.pad(delta.a.float(), (0, 0, 0, pad))
        b = torch.nn.functional.pad(delta.b.float(), (0, pad))
        dtype = delta.a.dtype if delta.a.dtype.is_floating_point else torch.float32
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).contiguous()
        leaf = module.rsplit(".", 1)[-1]
        if routed.search(key) or leaf not in ("gate_proj", "up_proj", "down_proj"):
            modules.add(leaf)
        else:
            parameters.add("mlp." + module.split(".mlp.", 1)[1] + ".weight")  # e.g. mlp.shared_experts.up_proj.weight
    source = adapter.config
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": source.get("base_model_name_or_path") or str(base_dir),
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(modules),
        "target_parameters": sorted(parameters) or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    from safetensors.torch import save_file

    staging = _staging(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        lines = [
            "LoRA adapter for DeepSeek-V3 in standard PEFT format with checkpoint module names "
            f"(rank {rank}, scaling 1).",
            f"- base: `{base_dir}`",
            f"- source adapter: `{adapter.path}` (r={source.get('r')}, alpha={source.get('lora_alpha')})",
            f"- {len(kept)} weights adapted: target_modules {sorted(modules)}, target_parameters {sorted(parameters)}",
        ]
        write_card(staging, out.name, lines, card, peft_config["base_model_name_or_path"])
        result.bytes_written = (staging / ADAPTER_WEIGHTS).stat().st_size
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for warning in result.warnings:
        logger.warning(warning)
    return result


# ---------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.export",
        description="Merge a LoRA adapter into a DeepSeek-V3 checkpoint (streamed shard by shard), convert a "
        "checkpoint between FP8 and BF16, or write the adapter alone with checkpoint module names.",
    )
    parser.add_argument("--base", required=True, help="base checkpoint folder (HF layout, BF16 or FP8)")
    parser.add_argument("--adapter", help="peft LoRA adapter folder; omit to convert the base only")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--format", choices=FORMATS, default="bf16", help="bf16 | fp8 | adapter (default bf16)")
    parser.add_argument("--tokenizer", help="take tokenizer files from here when the base has none")
    parser.add_argument(
        "--card", help="JSON file with model-card fields: name, data, stages, hyperparameters, evaluation"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--fp8-warn-below",
        type=float,
        default=DEFAULT_FP8_WARN_BELOW,
        help="warn when FP8 re-quantization keeps less than this fraction of a tensor's delta (default 0.5)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> ExportResult:
    """Entry point: parse, check everything, export, print a one-line summary."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    card = None
    if args.card:
        try:
            card = json.loads(Path(args.card).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ExportError(f"{args.card}: cannot read the model card fields ({err})") from None
    if args.format == "adapter":
        if not args.adapter:
            raise ExportError("--format adapter needs --adapter DIR")
        result = export_adapter(args.adapter, args.out, args.base, card, args.overwrite)
    else:
        result = export_merged(
            args.base,
            args.adapter,
            args.out,
            args.format,
            args.tokenizer,
            card,
            args.overwrite,
            progress=not args.quiet,
            fp8_warn_below=args.fp8_warn_below,
        )
    stored = ""
    if result.fmt != "adapter" and (result.out / "config.json").is_file():
        dtype = json.loads((result.out / "config.json").read_text()).get("torch_dtype")
        stored = {"bf16": f"; stored as {dtype}: FP8 weights dequantized to BF16, the others keep their dtype"}.get(
            result.fmt, "; e4m3 weights with 128x128 block scales"
        )
    summary = f"wrote {result.out} ({result.fmt}{stored}, {result.bytes_written / 1e9:.2f} GB"
    if result.seconds:
        summary += f", {result.seconds:.1f} s, {result.mb_per_s:.0f} MB/s"
    if result.fp8:
        summary += f"; FP8 delta: {_summary_fp8(result.fp8)}"
    print(summary + ")")
    if result.fp8:
        print(FP8_SUMMARY_HELP)
    return result


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted; nothing was written to --out", file=sys.stderr)
        raise SystemExit(130) from None
