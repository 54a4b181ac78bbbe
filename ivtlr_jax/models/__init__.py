"""Model families: the registry keyed by Hugging Face `model_type` (`FAMILIES`), a folder's config.json
read into its family and config (`read_config`), and the shape-only model (`abstract_model`). Loading a
model folder's weights is `ivtlr_jax.io`'s (`from_pretrained`)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from flax import nnx

from .common.loading import WeightLoadError
from .common.sharding import ShardingRules, make_mesh
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
from .qwen3vl import params as qwen3vl_params
from .qwen3vl import processing as qwen3vl_processing
from .qwen3vl.config import Qwen3VLConfig
from .qwen3vl.modeling import Qwen3VL

@dataclasses.dataclass(frozen=True)
class Family:
    """What only one model family knows, keyed in FAMILIES by its Hugging Face `model_type`. Nothing
    outside `models/` branches on a family: it asks its entry.

    name: the short name data and evaluation use ("qwen2vl", "chameleon").
    config_cls, model_cls: `config_cls.from_hf(config.json dict)`; `model_cls(config, rngs=..., **options)`.
    weight_specs, hf_renamer, stacked: the Hugging Face weight tables (see `common.loading`).
    encoder: `encoder(processor, num_image_tokens, resize)`, the prompt and image encoder of the official scripts
      (`resize`: a `common.images.ImageResize`, the official fixed square or the processor's own rules).
    max_length: the official training script's total length cap (the data default).
    official_shapes: the official setup: K (patches) and the planner's batch (image_tokens, prefix, seq_len,
      image_side).
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
    "qwen3_vl": family_entry(name="qwen3vl", config_cls=Qwen3VLConfig, model_cls=Qwen3VL, params=qwen3vl_params,
                             processing=qwen3vl_processing),
}


def family_named(name: str) -> Family:
    """The family with this short name ("qwen2vl", "chameleon", ...)."""
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; choose from {sorted(f.name for f in FAMILIES.values())}")


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


__all__ = ["FAMILIES", "Family", "family_named", "Chameleon",
           "ChameleonConfig", "Qwen2VL", "Qwen2VLConfig", "ShardingRules", "WeightLoadError",
           "make_mesh", "read_config"]
