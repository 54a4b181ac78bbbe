"""Model folders and `from_pretrained`: a Hugging Face folder (or hub id) or a folder written by
`convert/hf_to_flax.py`, streamed into a Flax NNX model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models import abstract_model, read_config
from ..models.common.layers import DTYPES
from ..models.common.loading import RenamedSource, load_params, variables_by_path
from ..models.common.sharding import ShardingRules, state_shardings
from .atomic import recover_swap
from .safetensors import INDEX_FILE, SafetensorsFolder

FLAX_MARKER = "ivtlr_jax.json"  # written by convert/hf_to_flax.py next to the orbax parameters
FLAX_PARAMS_DIR = "flax_params"
WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt")  # files of weights (not copied by the converters)


def resolve_folder(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; anything else is taken as a hub id and downloaded (weights, configs,
    tokenizer and processor files only). A local folder that a crash left under `<folder>.replaced` in the
    middle of replacing it is renamed back first (`atomic.recover_swap`)."""
    p = recover_swap(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"{path}: no such model folder (and not a hub id of the form namespace/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Copy the files of the model folder `src` that are not weights (config, tokenizer, processor, chat
    template, generation config) into `dst`: all but the weight files, their shard index and `skip`'s names."""
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name != INDEX_FILE and f.name not in skip:
            shutil.copy2(f, Path(dst) / f.name)


def stored_dtype(folder: Path) -> str:
    """The storage dtype of a model folder's parameters (float32 when it cannot tell)."""
    marker = folder / FLAX_MARKER
    if marker.exists():
        return json.loads(marker.read_text()).get("param_dtype", "float32")
    src = SafetensorsFolder(folder)
    for name in src.keys():
        dt = np.dtype(src.get(name).dtype)
        for key, value in DTYPES.items():
            if dt == np.dtype(value):
                return key.value
    return "float32"


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    remat: str = "none",
    rules: ShardingRules | None = None,
    revision: str | None = None,
    scan_layers: bool = True,
    attention_impl: str = "xla",
) -> nnx.Module:
    """Load a model folder into Flax.

    dtype: compute dtype; param_dtype: storage dtype of the parameters (defaults to dtype).
    rules: place parameters sharded on `rules.mesh` as they are read (default: one device).
    scan_layers: see `DecoderLM` (False: unrolled layers, faster for shallow models).
    attention_impl: see `DecoderLM` ("xla" einsums, or "fused": jax.nn.dot_product_attention).
    """
    folder = resolve_folder(path, revision)
    family, config, _ = read_config(folder)
    param_dtype = param_dtype or dtype
    model = abstract_model(family, config, dtype=dtype, param_dtype=param_dtype, remat=remat, rules=rules,
                           scan_layers=scan_layers, attention_impl=attention_impl)
    graphdef, abstract_state = nnx.split(model)
    shardings = None
    if rules is not None:
        by_path = variables_by_path(state_shardings(abstract_state, rules))
        shardings = {p: v for p, v in by_path.items()}
    if (folder / FLAX_MARKER).exists():
        from .orbax_params import restore_params

        state = restore_params(folder / FLAX_PARAMS_DIR, abstract_state, shardings)
    else:
        source = RenamedSource(SafetensorsFolder(folder), family.hf_renamer(config))
        state = load_params(
            abstract_state,
            family.weight_specs(config),
            source,
            shardings=shardings,
            stacked_prefixes=family.stacked,
            origin=str(folder),
        )
    return nnx.merge(graphdef, state)
