"""How a model computes, as opposed to what it computes with: the options every computing module holds (set
once, when the model is built) instead of receiving them at every call, and the one scan over stacked layers
that the decoder and the vision towers share."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import ATTENTION_IMPLS
from .sharding import ShardingRules

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """dtype: compute dtype; remat: what the layer loops keep for the backward pass (REMAT_POLICIES); rules:
    logical axis names -> mesh axes (None: nothing sharded); unroll: unroll the layer loops (scan_layers=False,
    faster for shallow models; the planner's cost counts); attention_impl: ATTENTION_IMPLS (attention.py)."""
    dtype: Any = jnp.float32
    remat: str = "none"
    rules: ShardingRules | None = None
    unroll: bool = False
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; choose from {ATTENTION_IMPLS}")


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
