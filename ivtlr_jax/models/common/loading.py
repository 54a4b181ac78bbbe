"""Filling a model's abstract parameter tree from Hugging Face tensors, one tensor at a time.

Each model family gives a table `{our parameter path: WeightSpec}`. A spec names the Hugging Face
tensor (with `{i}` for a stacked layer index) and how its layout maps to ours. Nothing is loaded
twice: each stacked parameter is assembled in one host buffer of the target dtype, placed on the
devices with its sharding, and released before the next one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[str, ...]


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


class WeightLoadError(ValueError):
    """Missing, unexpected or mis-shaped tensors; the message names them."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    hf_name: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    hf_shape: tuple[int, ...]  # the tensor's shape in the Hugging Face checkpoint (one layer's)
    transpose: bool = False  # HF [out, in...] -> ours [in..., out...]: flatten to [out, in], transpose, reshape
    permute: tuple[int, ...] | None = None  # or an axis permutation (conv kernels OIHW -> HWIO: (2, 3, 1, 0))

    def to_ours(self, x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        if self.permute is not None:
            x = x.transpose(self.permute)
        elif self.transpose:
            x = x.reshape(x.shape[0], -1).T
        return x.reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.permute is not None:
            return x.transpose(np.argsort(self.permute))
        if self.transpose:
            x = x.reshape(-1, self.hf_shape[0]).T
        return x.reshape(self.hf_shape)


class RenamedSource:
    """A view of a source whose names are rewritten by `rename` (e.g. transformers 5 in-memory names to
    hub names); names mapped to None are dropped (e.g. non-persistent rotary buffers)."""

    def __init__(self, source: TensorSource, rename: Callable[[str], str | None]):
        self.source = source
        self.names: dict[str, str] = {}
        for k in source.keys():
            new = rename(k)
            if new is None:
                continue
            if new in self.names:
                raise WeightLoadError(f"tensors {self.names[new]!r} and {k!r} both map to {new!r}")
            self.names[new] = k

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.names[name])

    def get(self, name: str) -> np.ndarray:
        return self.source.get(self.names[name])


def variables_by_path(state: nnx.State) -> dict[Path, nnx.Variable]:
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    return {tuple(str(p) for p in path): v for path, v in flat}


def _expand(spec: WeightSpec, stacked: int | None) -> list[str]:
    return [spec.hf_name.format(i=i) for i in range(stacked)] if stacked else [spec.hf_name]


def _first_names(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def load_params(
    abstract_state: nnx.State,
    specs: dict[Path, WeightSpec],
    source: TensorSource,
    *,
    shardings: dict[Path, jax.sharding.Sharding] | None = None,
    stacked_prefixes: Sequence[Path] = (),
    origin: str = "checkpoint",
) -> nnx.State:
    """Return `abstract_state` with every parameter filled from `source`.

    stacked_prefixes: module paths whose parameters carry a leading layer axis.
    """
    variables = variables_by_path(abstract_state)
    if set(variables) != set(specs):
        raise WeightLoadError(
            f"internal: weight table and model disagree: no spec for {sorted(set(variables) - set(specs))[:5]}, "
            f"spec without parameter {sorted(set(specs) - set(variables))[:5]}"
        )
    is_stacked = {p: any(p[: len(s)] == s for s in stacked_prefixes) for p in variables}

    available = set(source.keys())
    needed: dict[str, Path] = {}
    for path, spec in specs.items():
        for name in _expand(spec, variables[path].shape[0] if is_stacked[path] else None):
            needed[name] = path
    missing = sorted(set(needed) - available)
    unexpected = sorted(available - set(needed))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_first_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_first_names(unexpected)}")
    for name, path in needed.items():
        if name not in available:
            continue
        got, want = tuple(source.shape(name)), tuple(specs[path].hf_shape)
        if got != want:
            problems.append(f"tensor {name!r} has shape {list(got)}, expected {list(want)}")
    if problems:
        raise WeightLoadError(f"cannot load {origin}: " + "; ".join(problems))

    out = {}
    for path, v in variables.items():
        spec = specs[path]
        dtype = np.dtype(v.dtype)
        shape = tuple(v.shape)
        if is_stacked[path]:
            host = np.empty(shape, dtype)
            for i in range(shape[0]):
                name = spec.hf_name.format(i=i)
                host[i] = spec.to_ours(source.get(name), shape[1:]).astype(dtype)
        else:
            host = spec.to_ours(source.get(spec.hf_name), shape).astype(dtype)
        sharding = (shardings or {}).get(path)
        if sharding is None:
            value = jnp.asarray(host)
        else:
            value = jax.make_array_from_callback(shape, sharding, lambda idx, h=host: h[idx])
        del host
        out[path] = value
    return with_values(abstract_state, out)


def with_values(state: nnx.State, values: dict[Path, jax.Array]) -> nnx.State:
    def fill(path, v):
        key = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        return v.replace(values[key]) if isinstance(v, nnx.Variable) else values[key]

    return jax.tree_util.tree_map_with_path(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def rename_by_rules(rules: Sequence[tuple[str, str | None]]) -> Callable[[str], str | None]:
    """Regex rewrite rules applied in order; the first that matches wins; None drops the tensor."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(name: str) -> str | None:
        for pattern, repl in compiled:
            if pattern.search(name):
                return None if repl is None else pattern.sub(repl, name)
        return name

    return rename
