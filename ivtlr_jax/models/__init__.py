"""Model families and `from_pretrained`: a Hugging Face folder (or hub id) or a folder written by
`convert/hf_to_flax.py`, streamed into a Flax NNX model."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import jax.numpy as jnp
from flax import nnx

from .common.loading import RenamedSource, WeightLoadError, load_params, variables_by_path
from .common.safetensors_io import SafetensorsFolder
from .common.sharding import ShardingRules, make_mesh, state_shardings
from .chameleon import params as chameleon_params
from .chameleon import processing as chameleon_processing
from .chameleon.config import ChameleonConfig
from .chameleon.modeling import Chameleon
from .qwen2vl import params as qwen2vl_params
from .qwen2vl import processing as qwen2vl_processing
from .qwen2vl.config import Qwen2VLConfig
from .qwen2vl.modeling import Qwen2VL
from .qwen25vl import params as qwen25vl_params
from .qwen25vl.config import Qwen25VLConfig
from .qwen25vl.modeling import Qwen25VL

FLAX_MARKER = "ivtlr_jax.json"  # written by convert/hf_to_flax.py next to the orbax parameters
FLAX_PARAMS_DIR = "flax_params"


@dataclasses.dataclass(frozen=True)
class Family:
    """What only one model family knows, keyed in FAMILIES by its Hugging Face `model_type`. Nothing
    outside `models/` branches on a family: it asks its entry.

    name: the short name data and evaluation use ("qwen2vl", "chameleon").
    config_cls, model_cls: `config_cls.from_hf(config.json dict)`; `model_cls(config, rngs=..., **options)`.
    weight_specs, hf_renamer, stacked: the Hugging Face weight tables (see `common.loading`).
    encoder: `encoder(processor, num_image_tokens)`, the prompt and image encoder of the official scripts.
    max_length: the official training script's total length cap (the data default).
    official_shapes: the planner's official batch (image_tokens, prefix, seq_len, image_side).
    picture_geometry: processed image -> ((rows, columns) of image tokens, (width, height) in pixels).
    image_shapes: (rows, image_tokens, image_side) -> {key: (shape, dtype)} of a batch's image arrays.
    hub_configs: hub id -> config.json (architecture fields) of the official models, for the planner.
    peft_v5_prefix: (old, new) prefix of the decoder layers' module names in transformers 5's layout,
    for PEFT adapter names (None: the same in both layouts).
    """
    name: str
    config_cls: type
    model_cls: type
    weight_specs: Callable
    hf_renamer: Callable
    stacked: tuple[tuple[str, ...], ...]
    encoder: Callable
    max_length: int
    official_shapes: dict
    picture_geometry: Callable
    image_shapes: Callable
    hub_configs: dict
    peft_v5_prefix: tuple[str, str] | None


def family_entry(name: str, config_cls: type, model_cls: type, params: ModuleType, processing: ModuleType) -> Family:
    """A registry entry from a family's modules: `config_cls`'s module (HUB_CONFIGS), `params`
    (weight_specs, hf_renamer, STACKED, PEFT_V5_PREFIX if any) and `processing` (ENCODER, MAX_LENGTH,
    OFFICIAL_SHAPES, picture_geometry, image_shapes)."""
    hub_configs = getattr(sys.modules[config_cls.__module__], "HUB_CONFIGS", {})
    return Family(name, config_cls, model_cls, params.weight_specs, params.hf_renamer, params.STACKED,
                  processing.ENCODER,
                  processing.MAX_LENGTH, processing.OFFICIAL_SHAPES, processing.picture_geometry,
                  processing.image_shapes, hub_configs, getattr(params, "PEFT_V5_PREFIX", None))


FAMILIES: dict[str, Family] = {
    "qwen2_vl": family_entry("qwen2vl", Qwen2VLConfig, Qwen2VL, qwen2vl_params, qwen2vl_processing),
    "chameleon": family_entry("chameleon", ChameleonConfig, Chameleon, chameleon_params, chameleon_processing),
    # Qwen2.5-VL: its processor is Qwen2-VL's, so are its prompts and pictures
    "qwen2_5_vl": family_entry(name="qwen25vl", config_cls=Qwen25VLConfig, model_cls=Qwen25VL, params=qwen25vl_params,
                               processing=qwen2vl_processing),
}


def family_named(name: str) -> Family:
    """The family with this short name ("qwen2vl", "chameleon", ...)."""
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; choose from {sorted(f.name for f in FAMILIES.values())}")


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


__all__ = ["FAMILIES", "Family", "family_named", "Chameleon",
           "ChameleonConfig", "Qwen2VL", "Qwen2VLConfig", "ShardingRules", "WeightLoadError",
           "from_pretrained", "make_mesh", "read_config"]
