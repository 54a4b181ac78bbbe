"""How a model computes, as opposed to what it computes with: the options every computing module holds (set
once, when the model is built) instead of receiving them at every call, and the one scan over stacked layers
that the decoder and the vision towers share."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionImpl
from .choices import names
from .sharding import ShardingRules



class Remat(enum.StrEnum):
    """What the layer loops keep for the backward pass (the model option `remat`)."""
    NONE = "none"
    FULL = "full"
    DOTS = "dots"
    DOTS_NO_BATCH = "dots_no_batch"


REMAT_POLICIES = {  # each Remat's jax.checkpoint policy
    Remat.NONE: None,
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.DOTS: jax.checkpoint_policies.checkpoint_dots,
    Remat.DOTS_NO_BATCH: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """dtype: compute dtype; remat: what the layer loops keep for the backward pass (a Remat); rules:
    logical axis names -> mesh axes (None: nothing sharded); unroll: unroll the layer loops (scan_layers=False,
    faster for shallow models; the planner's cost counts); attention_impl: an AttentionImpl (attention.py)."""
    dtype: Any = jnp.float32
    remat: Remat = Remat.NONE
    rules: ShardingRules | None = None
    unroll: bool = False
    attention_impl: AttentionImpl = AttentionImpl.XLA

    def __post_init__(self):
        if self.remat not in set(Remat):
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {names(Remat)}")
        if self.attention_impl not in set(AttentionImpl):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; choose from {names(AttentionImpl)}")
        object.__setattr__(self, "remat", Remat(self.remat))
        object.__setattr__(self, "attention_impl", AttentionImpl(self.attention_impl))


def scan_stacked(stacked: nnx.Module, body: Callable, carry, xs, options: RunOptions):
    """`body(layer, carry, x) -> (carry, y)` over the leading `layers` axis of `stacked`'s parameters under
    `lax.scan` (each step gets its layer's slice as a module), with `options`' remat policy and unrolling
    -> (carry, ys)."""
    graphdef, state = nnx.split(stacked)

    def step(carry, scanned):
        layer_state, x = scanned
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if options.remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[options.remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs), unroll=options.unroll)
