"""Typed run configuration loaded from YAML. Unknown keys are errors that name the key and its section;
keys are named as in the official IVT-LR YAML where they mean the same thing. Every value is checked
when the configuration is built (counts >= 1, a finite positive learning rate, names from their lists),
so a bad setting is refused before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .latent import LatentConfig, LatentGrad, PatchOrder, Rope
from .data import Dataset, PromptFormat
from .data.collate import EVAL_LENGTH_BUCKETS, TRAIN_LENGTH_BUCKETS, TRAIN_PREFIX_BUCKETS
from .data.curriculum import CurriculumConfig
from .models.common.attention import AttentionImpl
from .models.common.choices import parse, plain
from .models.common.images import ImageResize
from .models.common.layers import DType
from .models.common.lora import LoRAConfig
from .models.common.run_options import Remat


class Schedule(enum.StrEnum):
    """The learning rate's schedule after the warmup (train/optim.py)."""
    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


class LossScale(enum.StrEnum):
    """How the micro-batches' token losses make the step's loss."""
    MICRO_BATCH_MEAN = "micro_batch_mean"  # official: mean of per-micro-batch token means
    TOKEN_MEAN = "token_mean"  # mean over the step's tokens


class Batching(enum.StrEnum):
    """How evaluation batches its rows (eval/run.py's module docstring)."""
    AUTO = "auto"  # continuous, on any number of devices and processes
    STATIC = "static"
    CONTINUOUS = "continuous"

# keys that may change between the runs of one run folder: where the folder is, logging, the mesh (a resume
# on other devices keeps the run's batch layout, train/batch_layout.py, or is refused) and evaluation ("eval.":
# the whole section, which training never reads; folders of older runs have none)
RESUME_NEUTRAL_KEYS = ("name", "save_path", "train.log_every", "train.keep_checkpoints", "log.tensorboard",
                       "log.wandb", "log.wandb_project", "log.wandb_entity", "mesh.data", "mesh.fsdp", "mesh.tensor",
                       "eval.")
# keys a resume may change when `train.py --allow-change KEY` names them (the way on after a NaN stop): the
# learning rate, its schedule and the clipping, which leave the optimizer state's structure as it is; each
# change is recorded in the run folder (train/run_changes.py)
CHANGEABLE_ON_RESUME = ("optim.lr", "optim.schedule", "optim.warmup_steps", "optim.restart_schedule_per_stage",
                        "optim.max_grad_norm")


class ConfigError(ValueError):
    """A refused configuration; `keys`: the dotted keys it is about, where known (to name who set them)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


def _choose(section, key: str, choices: type[enum.StrEnum]) -> None:
    """Set the field `key` of the frozen `section` to its value as a member of `choices` (or refuse it)."""
    try:
        member = parse(choices, getattr(section, key), key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    object.__setattr__(section, key, member)


def _at_least(value, low, key: str) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{key}: {value!r} must be >= {low}")


def _check_buckets(buckets: tuple[int, ...], key: str) -> None:
    if not buckets or min(buckets) < 1:
        raise ConfigError(f"{key}: {list(buckets)} must be a non-empty list of lengths >= 1")


def _finite(value: float, key: str, *, positive: bool = False, low: float | None = None, below: float | None = None):
    bad = not math.isfinite(value) or (positive and value <= 0) or (low is not None and value < low) \
        or (below is not None and value >= below)
    if bad:
        rule = "> 0" if positive else (f">= {low}" if low is not None else "")
        rule += f"{' and ' if rule else ''}< {below}" if below is not None else ""
        raise ConfigError(f"{key}: {value!r} must be a finite number{' ' + rule if rule else ''}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    model_id: str = ""  # a hub id or a local folder (Hugging Face or converted Flax)
    dtype: DType = DType.BFLOAT16  # compute dtype
    param_dtype: DType = DType.BFLOAT16  # storage of the frozen base weights (trainable ones are fp32)
    remat: Remat = Remat.DOTS_NO_BATCH  # the layer loops keep their projections, recompute attention
    scan_layers: bool = True  # False: unroll the layers (faster for shallow models, compile time grows with depth)
    attention_impl: AttentionImpl = AttentionImpl.XLA  # fused: jax.nn.dot_product_attention (cuDNN on GPU)

    def __post_init__(self):
        _choose(self, "dtype", DType)
        _choose(self, "param_dtype", DType)
        _choose(self, "remat", Remat)
        _choose(self, "attention_impl", AttentionImpl)


@dataclasses.dataclass(frozen=True)
class LatentSection:
    num_selected_patches: int = 32  # Qwen2-VL 32, Chameleon 64
    patch_order: PatchOrder = PatchOrder.SCORE
    latent_grad: LatentGrad = LatentGrad.STOP
    rope: Rope = Rope.ONE_D
    ce_chunk: int = 256
    patch_deepstack: bool = True  # Qwen3-VL: inserted patch copies keep their DeepStack features

    def __post_init__(self):
        _at_least(self.num_selected_patches, 1, "num_selected_patches")
        _choose(self, "patch_order", PatchOrder)
        _choose(self, "latent_grad", LatentGrad)
        _choose(self, "rope", Rope)
        _at_least(self.ce_chunk, 1, "ce_chunk")

    def latent_config(self, latent_token_id: int) -> LatentConfig:
        """The loop's LatentConfig: these settings and the model's `<|latent|>` id."""
        return LatentConfig(latent_token_id, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """How a model is evaluated (`infer.py`, the demo; eval/run.py): the run config's `eval` section, whose
    values infer.py's options replace. Training never reads it (its keys are resume-neutral)."""
    num_latents: int = 3  # <|latent|> tokens after the question (the official evaluation: 3)
    batch_size: int = 8  # rows per batch over all devices (rounded up to a multiple of the device count)
    max_new_tokens: int = 512
    batching: Batching = Batching.AUTO
    prompt_format: PromptFormat = PromptFormat.TRAIN  # official: the official evaluation scripts' prompts
    length_buckets: tuple[int, ...] = EVAL_LENGTH_BUCKETS  # prompt lengths (left padding): a compilation each

    def __post_init__(self):
        _at_least(self.num_latents, 0, "num_latents")
        _at_least(self.batch_size, 1, "batch_size")
        _at_least(self.max_new_tokens, 1, "max_new_tokens")
        _choose(self, "batching", Batching)
        _choose(self, "prompt_format", PromptFormat)
        _check_buckets(self.length_buckets, "length_buckets")


@dataclasses.dataclass(frozen=True)
class DataSection:
    dataset: Dataset = Dataset.M3COT
    source: str = ""  # hub id, local folder or parquet file
    train_split: str = "train"
    eval_split: str = "test"
    max_length: int | None = None  # default: 3400 Qwen2-VL, 1400 Chameleon (docs/method.md section 14)
    limit: int | None = None  # optional cap on training rows (the official scripts kept 20 / 10 by accident)
    length_buckets: tuple[int, ...] = TRAIN_LENGTH_BUCKETS
    prefix_buckets: tuple[int, ...] = TRAIN_PREFIX_BUCKETS
    # square: the official IVT-LR fixed square (Qwen2-VL 280x280, Qwen3-VL 320x320: 100 image tokens);
    # processor: the processor's own rules (smart_resize), each image its own size and token count
    image_resize: ImageResize = ImageResize.SQUARE

    def __post_init__(self):
        _choose(self, "dataset", Dataset)
        _choose(self, "image_resize", ImageResize)
        _at_least(self.max_length, 1, "max_length")
        _at_least(self.limit, 1, "limit")
        for key in ("length_buckets", "prefix_buckets"):
            _check_buckets(getattr(self, key), key)


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How a model folder is asked about one image and question (`predict.Predictor`, `ivtlr-ask`,
    `ivtlr-serve`): the prompt (the dataset whose text format it follows, train or official), the latents,
    K, patch order, RoPE, the compute dtype and how images are sized. Every stage export and official import
    holds its own (`io/settings_file.py`: written from the run config or the import's options)."""
    dataset: Dataset = DataSection.dataset  # the prompt text's format
    prompt_format: PromptFormat = EvalSection.prompt_format  # official: the official evaluation scripts' prompts
    num_latents: int = EvalSection.num_latents
    num_selected_patches: int = LatentSection.num_selected_patches  # K
    patch_order: PatchOrder = LatentSection.patch_order
    rope: Rope = LatentSection.rope
    dtype: DType = ModelSection.dtype  # compute dtype (the official evaluation: bfloat16)
    max_new_tokens: int = EvalSection.max_new_tokens
    patch_deepstack: bool = LatentSection.patch_deepstack  # Qwen3-VL only: the training run's choice
    image_resize: ImageResize = DataSection.image_resize  # the training run's image sizing

    def __post_init__(self):  # each field's check (and choice parsing) is its section's
        data = DataSection(dataset=self.dataset, image_resize=self.image_resize)
        ev = EvalSection(num_latents=self.num_latents, max_new_tokens=self.max_new_tokens,
                         prompt_format=self.prompt_format)
        latent = LatentSection(num_selected_patches=self.num_selected_patches, patch_order=self.patch_order,
                               rope=self.rope)
        model = ModelSection(dtype=self.dtype)
        for key, section in (("dataset", data), ("image_resize", data), ("prompt_format", ev),
                             ("patch_order", latent), ("rope", latent), ("dtype", model)):
            object.__setattr__(self, key, getattr(section, key))

    @classmethod
    def from_run(cls, cfg: "RunConfig") -> "InferenceSettings":
        """A training run's settings: its dataset, K, patch order, RoPE, DeepStack choice, compute dtype and
        image sizing."""
        return cls(dataset=cfg.data.dataset, num_selected_patches=cfg.latent.num_selected_patches,
                   patch_order=cfg.latent.patch_order, rope=cfg.latent.rope, dtype=cfg.model.dtype,
                   patch_deepstack=cfg.latent.patch_deepstack, image_resize=cfg.data.image_resize)

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "InferenceSettings":
        """Settings from a mapping (a settings file), unknown keys and bad values refused naming `where`."""
        return _build(cls, raw, where)


CurriculumSection = CurriculumConfig  # the run config's section is the library's config (data/curriculum.py)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 4e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 0.7
    gradient_accumulation_steps: int | None = None  # micro-steps per optimizer step; None: from
    # train.global_batch_size (or 1). Set one of the two: the global batch is the one that holds on any device count
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0
    restart_schedule_per_stage: bool = False
    reset_optimizer: bool = False  # Coconut resets the optimizer state at each stage; the official IVT-LR keeps it
    loss_scale: LossScale = LossScale.MICRO_BATCH_MEAN

    def __post_init__(self):
        _finite(self.lr, "lr", positive=True)
        _finite(self.weight_decay, "weight_decay", low=0.0)
        if len(self.betas) != 2:
            raise ConfigError(f"betas: {list(self.betas)} must be two numbers")
        for beta in self.betas:
            _finite(beta, "betas", low=0.0, below=1.0)
        _finite(self.eps, "eps", positive=True)
        _finite(self.max_grad_norm, "max_grad_norm", positive=True)
        _at_least(self.gradient_accumulation_steps, 1, "gradient_accumulation_steps")
        _choose(self, "schedule", Schedule)
        _at_least(self.warmup_steps, 0, "warmup_steps")
        _choose(self, "loss_scale", LossScale)


LoRASection = LoRAConfig  # the run config's section is the library's config (models/common/lora.py)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # -1: all devices not used by fsdp x tensor
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        if self.data != -1:
            _at_least(self.data, 1, "data (or -1: every remaining device)")
        _at_least(self.fsdp, 1, "fsdp")
        _at_least(self.tensor, 1, "tensor")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    num_epochs: int = 16
    batch_size_training: int = 2  # micro-batch per replica at the start (the official per-GPU batch; the loss's groups)
    global_batch_size: int | None = None  # rows per optimizer step over all devices (official: 64); the
    # accumulation follows from it and the devices (train/batch_layout.py)
    save_every_steps: int = 0  # optimizer steps between checkpoints (0: only at stage ends)
    keep_checkpoints: int = 3
    log_every: int = 10  # micro-batches between log lines when there is no progress bar (not a terminal)

    def __post_init__(self):
        _at_least(self.num_epochs, 1, "num_epochs")
        _at_least(self.batch_size_training, 1, "batch_size_training")
        _at_least(self.global_batch_size, 1, "global_batch_size")
        _at_least(self.save_every_steps, 0, "save_every_steps")
        _at_least(self.keep_checkpoints, 1, "keep_checkpoints")
        _at_least(self.log_every, 1, "log_every")


@dataclasses.dataclass(frozen=True)
class LogSection:
    """Where the metrics go besides metrics.jsonl (the source of truth): TensorBoard event files and
    Weights & Biases (ivtlr_jax/events.py). None of these keys blocks a resume (RESUME_NEUTRAL_KEYS)."""
    tensorboard: bool = True  # event files in <run>/tensorboard/ (tensorboardX, no TensorFlow)
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`; checked at start)
    wandb_project: str = "ivtlr-jax"
    wandb_entity: str = ""  # W&B team or user ("": the default of the logged-in account)

    def __post_init__(self):
        if not self.wandb_project.strip():
            raise ConfigError(f"wandb_project: {self.wandb_project!r} must name a W&B project")


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
    log: LogSection = LogSection()
    eval: EvalSection = EvalSection()

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name: {self.name!r} must be a plain folder name")
        if self.train.global_batch_size is not None and self.optim.gradient_accumulation_steps is not None:
            raise ConfigError("train.global_batch_size and optim.gradient_accumulation_steps are both set: set one "
                              "(the accumulation follows from the global batch and the devices)")

    @property
    def run_dir(self) -> Path:
        return Path(self.save_path) / self.name


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}", keys=(where,))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        guesses = [g for key in unknown for g in difflib.get_close_matches(key, fields, n=1)]
        guess = f" (did you mean {' or '.join(map(repr, guesses))}?)" if guesses else ""
        raise ConfigError(f"{where + ': ' if where else ''}unknown key(s) {unknown}{guess}; allowed: {sorted(fields)}",
                          keys=tuple(f"{where}.{key}" if where else key for key in unknown))
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    try:
        return cls(**values)
    except ValueError as e:  # a section's own check ("key: why"): name the section and the key
        field = str(e).partition(":")[0]
        keys = (f"{where}.{field}" if where else field,) if field in fields else ()
        raise ConfigError(f"{where}.{e}" if where else str(e), keys) from None


def replaced(section, changes: dict, where: str):
    """`section` (one of this module's sections) with `changes` ({key: value}) checked as a configuration file's
    keys are: an unknown key or a bad value is a ConfigError naming `where.key`."""
    current = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return _build(type(section), {**current, **changes}, where)


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
            raise ConfigError(f"{where}: expected a list, got {value!r}", keys=(where,))
        item = args[0]
        return tuple(_coerce(item, v, where) for v in value)
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}", keys=(where,)) from None
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}", keys=(where,))
    return value


def load_config(path: str | Path, overrides: list[str] = (), *, training: bool = True) -> RunConfig:
    """Read a YAML file; `overrides` are `section.key=value` strings (value parsed as YAML). An error names
    where its key was set: the command line's override, else the file. `training`: also refuse what only
    evaluation may use (`check_training`); False for evaluation and for reading a trained run's config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such configuration file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
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
        cfg = _build(RunConfig, raw, "")
        if training:
            check_training(cfg)
    except ConfigError as e:
        raise ConfigError(f"{_set_by(e.keys, overrides, path)}: {e}", e.keys) from None
    return cfg


def _set_by(keys: tuple[str, ...], overrides: list[str], path: Path) -> str:
    """Who set the dotted `keys`: "command line 'optim.lr=1'" for the override that did, else the file."""
    for item in overrides:
        set_key = item.partition("=")[0]
        if any(set_key == key or set_key.startswith(key + ".") for key in keys):
            return f"command line {item!r}"
    return str(path)


def check_training(cfg: RunConfig) -> None:
    """Refuse what evaluation may use but training may not: float16 compute (no loss scaling here, so small
    gradients would flush to zero)."""
    if cfg.model.dtype == "float16":
        raise ConfigError("model.dtype: float16 cannot train (there is no loss scaling); use bfloat16 "
                          "(float16 stays allowed for evaluation)", keys=("model.dtype",))


def to_dict(cfg) -> dict:
    """The config as plain data: a choice is its string (yaml.safe_dump refuses enum members), so a run's
    config.yaml reads as older code wrote it."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {key: plain(value) for key, value in items})


def flat_items(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} of a nested mapping."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flat_items(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def differing_keys(saved: dict, current: dict, ignore: tuple[str, ...] = RESUME_NEUTRAL_KEYS) -> dict[str, tuple]:
    """{"section.key": (saved value, current value)} for the keys whose values differ, `ignore` left out.
    A key the saved config lacks (a run folder written before the key existed) reads as its default, the
    value that run had in effect."""
    a, b = {**flat_items(to_dict(RunConfig())), **flat_items(saved)}, flat_items(current)
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    ignored = lambda key: key in ignore or any(key.startswith(i) for i in ignore if i.endswith("."))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if not ignored(k) and norm(a.get(k)) != norm(b.get(k))}
