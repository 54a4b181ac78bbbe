"""Typed run configuration loaded from YAML. Unknown keys are errors that name the key and its section;
keys are named as in the official IVT-LR YAML where they mean the same thing."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .train.lora import OFFICIAL_TARGETS


@dataclasses.dataclass(frozen=True)
class ModelSection:
    model_id: str = ""  # a hub id or a local folder (Hugging Face or converted Flax)
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "bfloat16"  # storage of the frozen base weights (trainable ones are fp32)
    remat: str = "dots"  # none | full | dots | dots_no_batch
    scan_layers: bool = True  # False: unroll the layers (faster for shallow models, compile time grows with depth)


@dataclasses.dataclass(frozen=True)
class LatentSection:
    num_selected_patches: int = 32  # Qwen2-VL 32, Chameleon 64
    patch_order: str = "score"
    latent_grad: str = "stop"
    rope: str = "1d"
    ce_chunk: int = 256


@dataclasses.dataclass(frozen=True)
class DataSection:
    dataset: str = "m3cot"  # m3cot | scienceqa
    source: str = ""  # hub id, local folder or parquet file
    train_split: str = "train"
    eval_split: str = "test"
    max_length: int | None = None  # default: REFERENCE caps (3400 Qwen2-VL, 1400 Chameleon)
    limit: int | None = None  # optional cap on training rows (the official scripts kept 20 / 10 by accident)
    length_buckets: tuple[int, ...] = (256, 512, 768, 1024, 1536, 2048, 3072, 4096)
    prefix_buckets: tuple[int, ...] = (128, 256, 512, 768, 1024, 1536, 2048, 3072)


@dataclasses.dataclass(frozen=True)
class CurriculumSection:
    epochs_per_stage: int = 4
    max_latent_stage: int = 5
    pad_latent_to_max: bool = True


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 4e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 0.7
    gradient_accumulation_steps: int = 8
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    restart_schedule_per_stage: bool = False
    reset_optimizer: bool = False  # Coconut resets the optimizer state at each stage; the official IVT-LR keeps it
    loss_scale: str = "micro_batch_mean"  # official: mean of per-micro-batch token means; or "token_mean"


@dataclasses.dataclass(frozen=True)
class LoRASection:
    enabled: bool = True
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = OFFICIAL_TARGETS


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # -1: all devices not used by fsdp x tensor
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainSection:
    num_epochs: int = 16
    batch_size_training: int = 2  # micro-batch per data-parallel replica
    save_every_steps: int = 0  # optimizer steps between checkpoints (0: only at stage ends)
    keep_checkpoints: int = 3
    log_every: int = 10  # micro-batches between log lines when there is no progress bar (not a terminal)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    save_path: str = "runs"
    seed: int = 0
    model: ModelSection = ModelSection()
    latent: LatentSection = LatentSection()
    data: DataSection = DataSection()
    curriculum: CurriculumSection = CurriculumSection()
    optim: OptimSection = OptimSection()
    lora: LoRASection = LoRASection()
    mesh: MeshSection = MeshSection()
    train: TrainSection = TrainSection()

    @property
    def run_dir(self) -> Path:
        return Path(self.save_path) / self.name


class ConfigError(ValueError):
    pass


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**values)


def _coerce(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_coerce(item, v, where) for v in value)
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file; `overrides` are `section.key=value` strings (value parsed as YAML)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, _, value = item.partition("=")
        if not _:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    try:
        return _build(RunConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
