"""Logical axis names -> mesh axes.

Parameters carry logical axis names in their `axes` metadata (see `layers.param`) and activations
are annotated with `ShardingRules.constrain(x, axes)`. A `ShardingRules` holds the mesh and the rules
explicitly (no global context); `None` everywhere means "unsharded".

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded), `tensor`
(attention heads, MLP width and vocabulary split across devices).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes); anything not listed is replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("length", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; `data=-1` takes all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices do not divide into fsdp={fsdp} x tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {len(devices)} devices")
    return Mesh(np.array(devices).reshape(data, fsdp, tensor), MESH_AXES)


def local_data_mesh(devices: int | None = None) -> Mesh:
    """A 1-D `data` mesh over this process's first `devices` local devices (all when None)."""
    local = jax.local_devices()
    count = len(local) if devices is None else devices
    if count > len(local):
        raise ValueError(f"devices={count} but only {len(local)} local devices: {local}")
    return make_mesh(data=count, devices=local[:count])


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES

    def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        """PartitionSpec for logical `axes`. A mesh axis is dropped for a dimension it does not divide
        and is used at most once per array."""
        table = dict(self.rules)
        used: set[str] = set()
        out = []
        for i, name in enumerate(axes):
            target = table.get(name) if name is not None else None
            names = (target,) if isinstance(target, str) else tuple(target or ())
            names = tuple(n for n in names if n not in used and self.mesh.shape[n] > 1)
            if shape is not None and names:
                size = int(np.prod([self.mesh.shape[n] for n in names]))
                if shape[i] % size:
                    names = ()
            used.update(names)
            out.append(names[0] if len(names) == 1 else (names or None))
        return PartitionSpec(*out)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: ShardingRules | None) -> jax.Array:
    """Annotate an activation with logical axes; a no-op without rules."""
    return x if rules is None else rules.constrain(x, axes)


def state_shardings(state: nnx.State, rules: ShardingRules | None):
    """NamedSharding per parameter (from its `axes` metadata), or None per leaf without rules."""

    def one(v):
        if rules is None:
            return None
        axes = v.get_metadata().get("axes")
        if axes is None:
            return NamedSharding(rules.mesh, PartitionSpec())
        return rules.sharding(axes, v.shape)

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


# logical axes of a batch's token arrays (images: see `batch_shardings`)
BATCH_AXES = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "labels": ("batch", "length"),
    "position_ids": ("batch", "length"),
}


def batch_shardings(batch: dict, rules: ShardingRules) -> dict:
    """Rows of the token arrays split over the data axes; images replicated (the vision tower runs on
    each replica's copy; Chameleon's per-row images are split like the rows)."""
    out = {}
    for key, value in batch.items():
        if key in BATCH_AXES:
            out[key] = rules.sharding(BATCH_AXES[key], value.shape)
        elif key == "pixel_values" and value.ndim == 4:
            out[key] = rules.sharding(("batch", None, None, None), value.shape)
        else:
            out[key] = NamedSharding(rules.mesh, PartitionSpec())
    return out
