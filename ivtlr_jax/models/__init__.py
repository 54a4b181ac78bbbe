"""Model families and `from_pretrained`: a Hugging Face folder (or hub id) or a folder written by
`convert/hf_to_flax.py`, streamed into a Flax NNX model."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from .common.loading import RenamedSource, WeightLoadError, load_params, variables_by_path
from .common.safetensors_io import SafetensorsFolder
from .common.sharding import ShardingRules, make_mesh, state_shardings
from .chameleon import params as chameleon_params
from .chameleon.config import ChameleonConfig
from .chameleon.modeling import Chameleon
from .qwen2vl import params as qwen2vl_params
from .qwen2vl.config import Qwen2VLConfig
from .qwen2vl.modeling import Qwen2VL

FLAX_MARKER = "ivtlr_jax.json"  # written by convert/hf_to_flax.py next to the orbax parameters
FLAX_PARAMS_DIR = "flax_params"


@dataclasses.dataclass(frozen=True)
class Family:
    """What only one model family knows, keyed in FAMILIES by its Hugging Face `model_type`."""
    name: str  # the short name data and evaluation use ("qwen2vl", "chameleon")
    config_cls: type
    model_cls: type
    weight_specs: Callable
    hf_renamer: Callable
    stacked: tuple[tuple[str, ...], ...]


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2vl", Qwen2VLConfig, Qwen2VL, qwen2vl_params.weight_specs, qwen2vl_params.hf_renamer,
                       qwen2vl_params.STACKED),
    "chameleon": Family("chameleon", ChameleonConfig, Chameleon, chameleon_params.weight_specs,
                        chameleon_params.hf_renamer, chameleon_params.STACKED),
}


def resolve_folder(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; anything else is taken as a hub id and downloaded (weights, configs,
    tokenizer and processor files only)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"{path}: no such model folder (and not a hub id of the form namespace/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


def read_config(folder: Path) -> tuple[Family, Any, dict]:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder}: no config.json")
    raw = json.loads(cfg_path.read_text())
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{cfg_path}: model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    family = FAMILIES[model_type]
    return family, family.config_cls.from_hf(raw), raw


def abstract_model(family: Family, config, **kwargs) -> nnx.Module:
    """The model with shape-only parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: family.model_cls(config, rngs=nnx.Rngs(0), **kwargs))


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    remat: str = "none",
    rules: ShardingRules | None = None,
    revision: str | None = None,
    scan_layers: bool = True,
) -> nnx.Module:
    """Load a model folder into Flax.

    dtype: compute dtype; param_dtype: storage dtype of the parameters (defaults to dtype).
    rules: place parameters sharded on `rules.mesh` as they are read (default: one device).
    scan_layers: see `DecoderLM` (False: unrolled layers, faster for shallow models).
    """
    folder = resolve_folder(path, revision)
    family, config, _ = read_config(folder)
    param_dtype = param_dtype or dtype
    model = abstract_model(family, config, dtype=dtype, param_dtype=param_dtype, remat=remat, rules=rules,
                           scan_layers=scan_layers)
    graphdef, abstract_state = nnx.split(model)
    shardings = None
    if rules is not None:
        by_path = variables_by_path(state_shardings(abstract_state, rules))
        shardings = {p: v for p, v in by_path.items()}
    if (folder / FLAX_MARKER).exists():
        from .checkpoint_io import restore_params

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


__all__ = ["FAMILIES", "Chameleon", "ChameleonConfig", "Qwen2VL", "Qwen2VLConfig", "ShardingRules", "WeightLoadError",
           "from_pretrained", "make_mesh", "read_config"]
