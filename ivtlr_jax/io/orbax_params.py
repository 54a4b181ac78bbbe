"""Flax parameters as an orbax checkpoint (what `convert/hf_to_flax.py` writes; loads faster than
safetensors because no layout conversion is needed). The trainer's checkpoints (train/checkpoint.py) use
the same nesting of parameter paths (`nest_paths`, `flatten_tree`)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ..models.common.loading import Path as ParamPath
from ..models.common.loading import WeightLoadError, with_values, variables_by_path


def nest_paths(flat: dict[ParamPath, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        d = out
        for key in path[:-1]:
            d = d.setdefault(key, {})
        d[path[-1]] = value
    return out


def flatten_tree(tree: dict, prefix: ParamPath = ()) -> dict[ParamPath, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_tree(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def save_params(state: nnx.State, directory: str | Path) -> None:
    directory = Path(directory).absolute()
    flat = {p: v[...] for p, v in variables_by_path(state).items()}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory, nest_paths(flat))


def restore_params(directory: str | Path, abstract_state: nnx.State, shardings=None) -> nnx.State:
    directory = Path(directory).absolute()
    variables = variables_by_path(abstract_state)
    target = {
        p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=(shardings or {}).get(p) or _default_sharding())
        for p, v in variables.items()
    }
    with ocp.StandardCheckpointer() as ckpt:
        # the item's own metadata: a checkpoint's `trainable` item (train/checkpoint.py) has no step metadata
        # file of its own, which ckpt.metadata() would warn about
        metadata = ocp.StandardCheckpointHandler().metadata(directory)
        stored = flatten_tree(metadata.tree if hasattr(metadata, "tree") else metadata)
        missing = sorted(".".join(p) for p in set(target) - set(stored))
        unexpected = sorted(".".join(p) for p in set(stored) - set(target))
        bad = [
            f"{'.'.join(p)}: stored {list(stored[p].shape)}, expected {list(target[p].shape)}"
            for p in set(target) & set(stored)
            if tuple(stored[p].shape) != tuple(target[p].shape)
        ]
        if missing or unexpected or bad:
            raise WeightLoadError(
                f"cannot load {directory}: missing {missing[:20]}, unexpected {unexpected[:20]}, mis-shaped {bad[:20]}"
            )
        restored = ckpt.restore(directory, nest_paths(target))
    return with_values(abstract_state, flatten_tree(restored))


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
