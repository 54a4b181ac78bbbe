"""A model of this project -> a Hugging Face folder that transformers loads (the library side of
`ivtlr-convert-flax-to-hf`, whose docstring in cli/flax_to_hf.py describes the options).

The model comes from a model folder (`load_model_folder`: a stage export, a converted Flax folder, any
Hugging Face folder) or from a training run folder at a checkpoint (`load_run`: the base model rebuilt
by `build_model` as the trainer built it, then the checkpoint's trained parameters restored into it).
`export` writes it with LoRA merged, or as the base model + a PEFT adapter; the folders themselves are
written by io/ (`write_hf_folder`, `write_adapter`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from .build import build_model
from .config import load_config
from .io.atomic import atomic_output_folder, check_output_folder
from .io.hf_export import ExportError, write_hf_folder
from .io.model_folder import from_pretrained, resolve_folder, stored_dtype
from .io.orbax_params import restore_params
from .io.peft import default_peft_layout, write_adapter
from .models import read_config
from .models.common.choices import names
from .models.common.layers import DTYPES, DType
from .models.common.loading import variables_by_path, with_values
from .models.common.lora import merge_lora, trainable_filter
from .run_folder import RunFolder


@dataclasses.dataclass
class Loaded:
    model: nnx.Module
    processor: object | None  # the processor to write (run folders: with the latent tokens added)
    files_from: Path | None  # a folder whose tokenizer / processor / generation files are copied
    kind: str  # "run" or "model"
    step: int | None = None


def is_run_folder(path: Path) -> bool:
    return RunFolder(path).has_config() and RunFolder(path).checkpoints.is_dir()


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in RunFolder(run).checkpoints.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "trainable").is_dir())


def load_run(run: Path, step: int | None = None) -> Loaded:
    """The model of a training run at a checkpoint, rebuilt as the trainer built it."""
    run_folder = RunFolder(run)
    cfg = load_config(run_folder.config_file, training=False)
    steps = checkpoint_steps(run)
    if not steps:
        raise ExportError(f"{run_folder.checkpoints}: no complete checkpoint (no <step>/trainable folder)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"{run_folder.checkpoints}: no checkpoint for step {step} (have {steps})")
    built = build_model(cfg, dtype=jnp.float32, remat="none")  # the model as train() built it
    model, processor, folder = built.model, built.processor, built.folder
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg.lora), ...)
    trainable = restore_params(run_folder.checkpoints / str(step) / "trainable", trainable)
    return Loaded(nnx.merge(graphdef, trainable, frozen), processor, folder, "run", step)


def check_trained_with_lora(run: Path) -> None:
    """--peft on a run folder: refused before the load when the run was trained without LoRA."""
    if not load_config(RunFolder(run).config_file, training=False).lora.enabled:
        raise ExportError(f"--peft: the run {run} was trained without LoRA (lora.enabled: false, every weight "
                          "trained), so there is no adapter to write; export it without --peft")


def load_model_folder(path: Path, dtype: str) -> Loaded:
    folder = resolve_folder(path)
    read_config(folder)
    param_dtype = DTYPES[stored_dtype(folder) if dtype == "auto" else dtype]
    return Loaded(from_pretrained(folder, dtype=jnp.float32, param_dtype=param_dtype), None, folder, "model")


def cast_params(model: nnx.Module, dtype) -> nnx.Module:
    graphdef, state = nnx.split(model)
    values = {p: (v[...].astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v[...])
              for p, v in variables_by_path(state).items()}
    return nnx.merge(graphdef, with_values(state, values))


def without_lora(model: nnx.Module) -> tuple[nnx.Module, object | None]:
    lora = getattr(model.layers, "lora", None)
    if lora is not None:
        del model.layers.lora
    return model, lora


def write_hf(model: nnx.Module, folder: Path, loaded: Loaded, dtype: str) -> None:
    if dtype != "auto":
        model = cast_params(model, DTYPES[dtype])
    write_hf_folder(model, folder, loaded.processor, loaded.files_from)


def export(checkpoint: str | Path, out: str | Path, *, peft: bool = False, dtype: str = "auto", step: int | None = None,
           peft_layout: str = "auto", log=print) -> Path:
    """Write `checkpoint` (a model folder or a training run folder) as the Hugging Face folder `out`
    (LoRA merged, or with `peft` base/ + adapter/), as `ivtlr-convert-flax-to-hf` describes. Returns `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_output_folder(out)  # before the (long) load
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto or one of {names(DType)}")
    start = time.perf_counter()
    if checkpoint.is_dir() and is_run_folder(checkpoint):
        if peft:
            check_trained_with_lora(checkpoint)
        log(f"loading training run {checkpoint}: its base model, then the checkpoint's trained parameters")
        loaded = load_run(checkpoint, step)
        log(f"{checkpoint}: training run, checkpoint step {loaded.step} ({time.perf_counter() - start:.1f} s)")
    else:
        if step is not None:
            raise ExportError(f"--step applies to a training run folder; {checkpoint} is a model folder")
        log(f"loading model folder {checkpoint}")
        loaded = load_model_folder(checkpoint, dtype)
        log(f"{checkpoint}: loaded ({time.perf_counter() - start:.1f} s)")
    model = loaded.model
    if peft and getattr(model.layers, "lora", None) is None:
        raise ExportError(f"--peft needs LoRA adapters, and {checkpoint} has none (a model folder holds merged "
                          "weights; give the training run folder of a run trained with LoRA)")

    what = "base model + PEFT adapter" if peft else "LoRA merged" if getattr(model.layers, "lora", None) else "weights"
    log(f"writing {out} ({what}, dtype {dtype})")
    with atomic_output_folder(out) as tmp:
        if peft:
            layout = default_peft_layout() if peft_layout == "auto" else peft_layout
            dropout = model.layers.lora.dropout
            model, lora = without_lora(model)
            write_hf(model, tmp / "base", loaded, dtype)
            write_adapter(model, lora, tmp / "adapter", out / "base", dropout, layout)
        else:
            write_hf(merge_lora(model), tmp, loaded, dtype)
    return out
