"""Attaching, selecting and merging LoRA adapters (the adapters themselves: models/common/lora.py)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from ..models.common.lora import PROJECTIONS, LoRA

OFFICIAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = True  # False: full fine-tuning of every parameter
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = OFFICIAL_TARGETS


def add_lora(model: nnx.Module, cfg: LoRAConfig, *, seed: int = 0, param_dtype=jnp.float32) -> nnx.Module:
    """Attach adapters to the language model's decoder layers (the vision tower is never targeted, as in
    the official setup where no tower module matches the target names)."""
    model.layers.lora = LoRA(model.layers, tuple(cfg.target_modules), cfg.rank, cfg.alpha, cfg.dropout,
                             rngs=nnx.Rngs(seed), param_dtype=param_dtype)
    return model


def trainable_filter(cfg: LoRAConfig):
    """nnx filter of the trained parameters: the adapters with LoRA, every parameter without."""
    return nnx.All(nnx.Param, nnx.PathContains("lora")) if cfg.enabled else nnx.Param


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold the adapters into the base weights (in place) and remove them."""
    lora = getattr(model.layers, "lora", None)
    if lora is None:
        return model
    for name in lora.targets:
        attr, _ = PROJECTIONS[name]
        var = getattr(model.layers, attr)
        var[...] = lora.merged(name, var[...])
    del model.layers.lora
    return model
