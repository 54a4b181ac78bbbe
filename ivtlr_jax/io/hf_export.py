"""Write a Flax model as a Hugging Face folder (config.json + model.safetensors) that transformers
loads, tensor by tensor (the inverse of `from_pretrained`'s weight table); `write_hf_folder` adds the
tokenizer and processor files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from ..distributed import fetch
from ..models import FAMILIES
from ..models.common.loading import variables_by_path
from .atomic import write_atomic
from .model_folder import FLAX_MARKER, copy_side_files
from .safetensors import write_streaming

TORCH_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                     np.dtype(np.float16): "float16"}


class ExportError(ValueError):
    """A model that cannot be written as asked (no LoRA to write as an adapter, a checkpoint step that
    is not there, ...)."""


def save_hf(model: nnx.Module, folder: str | os.PathLike, family=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries, cfg = hf_entries(model, family)
    write_streaming(folder / "model.safetensors", entries)
    write_atomic(folder / "config.json", json.dumps(cfg, indent=2))
    return folder


def write_hf_folder(model: nnx.Module, folder: str | os.PathLike, processor=None,
                    files_from: str | os.PathLike | None = None) -> Path:
    """A complete Hugging Face folder: `save_hf`'s weights and config.json, then the files of `files_from`
    that are neither weights nor configs (tokenizer, processor, chat template, generation config), then
    `processor`'s files (a processor changed in memory: the latent tokens added)."""
    folder = save_hf(model, folder)
    if files_from is not None:  # config.json is save_hf's; a Flax folder's marker would mislabel this one
        copy_side_files(files_from, folder, skip=("config.json", FLAX_MARKER))
    if processor is not None:
        from ..data.tokenizer import save_processor

        save_processor(processor, folder)
    return folder


def hf_entries(model: nnx.Module, family=None) -> tuple[list, dict]:
    """([(HF name, HF shape, dtype, read)], config.json's dict), sorted by name; `read()` returns one
    tensor on the host (gathered from the other processes when this one does not hold all of it, so in a
    multi-process run every process calls every `read` in this order)."""
    config = model.config
    family = family or FAMILIES[config.model_type]
    variables = variables_by_path(nnx.state(model))
    entries = []
    dtype = None
    for path, spec in family.weight_specs(config).items():
        v = variables[path]
        dtype = np.dtype(v.dtype)
        stacked = any(path[: len(s)] == s for s in family.stacked)
        if stacked:
            for i in range(v.shape[0]):
                entries.append((spec.hf_name.format(i=i), spec.hf_shape, dtype,
                                lambda v=v, i=i, spec=spec: spec.to_hf(fetch(v[i]))))
        else:
            entries.append((spec.hf_name, spec.hf_shape, dtype, lambda v=v, spec=spec: spec.to_hf(fetch(v[...]))))
    entries.sort(key=lambda e: e[0])
    cfg = config.to_hf()
    cfg["torch_dtype"] = TORCH_DTYPE_NAMES.get(dtype, "float32")
    return entries, cfg
