"""Global batches built from each process's share (multi-process runs; see `ivtlr_jax.distributed`).

Every process holds the whole example list (token ids; images stay encoded), so each one collates the
token arrays of the whole global batch (cheap, and the batch's shapes, latent count and prefix bucket
depend on every row), but decodes and processes only the images of its own rows: the rows that land on
its devices along the batch axis (`local_row_range`). The image arrays' per-row sizes and their small
integer arrays (`image_grid_thw`) are exchanged between processes, so every process knows the global
shapes; the pixel arrays are assembled with `jax.make_array_from_process_local_data` split by rows and
then resharded to their placement in the step (replicated: an all-gather on the devices).

With one process these are `collate` and `jax.device_put(batch, batch_shardings(batch, rules))`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from .. import distributed
from ..data import collate
from ..data.collate import stack_images
from ..models.common.sharding import ShardingRules
from ..io.hf_export import hf_entries
from ..models.common.sharding import batch_shardings


@dataclasses.dataclass(frozen=True)
class LocalRows:
    """This process's rows (a contiguous block along axis 0) of a global array of `shape`."""
    data: np.ndarray
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.data.dtype


def row_sharding(rules: ShardingRules, shape) -> jax.sharding.NamedSharding:
    """Rows split over the batch axes like the token arrays (`step.BATCH_AXES`), the rest whole."""
    return rules.sharding(("batch",) + (None,) * (len(shape) - 1), shape)


def local_row_range(rows: int, rules: ShardingRules) -> tuple[int, int]:
    """[lo, hi): the rows of a `rows`-row global batch that this process's devices hold."""
    shape = (rows, 1)
    spans = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop)
                    for s in row_sharding(rules, shape).addressable_devices_indices_map(shape).values()})
    lo, hi = spans[0][0], max(b for _, b in spans)
    covered = lo
    for a, b in spans:
        if a > covered:
            raise ValueError(f"this process's devices hold rows {spans} of the batch, not one contiguous block; "
                             "order the mesh so that each process's devices are adjacent along the batch axes")
        covered = max(covered, b)
    return lo, hi


def collate_local(features, rules: ShardingRules, **kwargs):
    """`collate(features, **kwargs)` for the global batch `features`, images processed only for this
    process's rows: (batch, shapes) where the batch's pixel arrays are `LocalRows` and everything else is
    whole. Uniform one-frame Qwen images ([B, Np, 1176], `stack_images`) and Chameleon's [B, 3, H, W] are
    split by rows; several frames of the same size per image ([B * Np, 1176]) by each row's patches; rows
    of different sizes cannot be split evenly, so then every process processes every row's image (the
    batch `collate` makes). An image that fails on one process fails the batch on every process."""
    if distributed.process_count() == 1:
        return collate(features, **kwargs)
    tokens, shapes = collate([(ids, labels, None) for ids, labels, _ in features], **kwargs)
    images = [image for *_, image in features]
    if all(image is None for image in images):
        return tokens, shapes
    missing = [i for i, image in enumerate(images) if image is None]
    if missing:
        raise ValueError(f"collate: rows {missing} have no image while others do")
    lo, hi = local_row_range(len(features), rules)
    try:
        per_row, error = [stack_images([image]) for image in images[lo:hi]], None
    except Exception as e:  # exchanged: every process raises it
        per_row, error = [], f"{type(e).__name__}: {e}"
    keys = list(per_row[0]) if per_row else []
    integer = [k for k in keys if per_row[0][k].dtype.kind in "iu"]
    mine = {"rows": [lo, hi], "error": error,
            "sizes": {k: [int(r[k].shape[0]) for r in per_row] for k in keys},
            "tails": {k: [list(r[k].shape[1:]) for r in per_row] for k in keys},
            "values": {k: np.concatenate([r[k] for r in per_row]).tolist() for k in integer}}
    everyone = distributed.allgather_objects(mine, "batch")
    failed = [(p, m["error"]) for p, m in enumerate(everyone) if m["error"]]
    if failed:
        p, error = failed[0]
        raise ValueError(f"the images of rows {everyone[p]['rows'][0]}..{everyone[p]['rows'][1] - 1} "
                         f"(process {p}): {error}")
    owners = []  # per global row: (process, index among that process's rows)
    for row in range(len(features)):
        p = next(p for p, m in enumerate(everyone) if m["rows"][0] <= row < m["rows"][1])
        owners.append((p, row - everyone[p]["rows"][0]))
    batch = dict(tokens)
    for key in keys:
        if key in integer:  # small integer arrays (image grids): exchanged whole
            dtype, tail = per_row[0][key].dtype, per_row[0][key].shape[1:]
            pieces = [_row_pieces(m, key, dtype, tail) for m in everyone]
            batch[key] = np.concatenate([pieces[p][i] for p, i in owners])
            continue
        sizes = [everyone[p]["sizes"][key][i] for p, i in owners]
        tails = {tuple(t) for m in everyone for t in m["tails"][key]}
        if len(set(sizes)) == 1 and len(tails) == 1:  # an even split: by rows, or by each row's patches
            local = np.concatenate([r[key] for r in per_row])
            batch[key] = LocalRows(local, (sum(sizes), *tails.pop()))
        else:  # rows of different sizes cannot be split evenly: this process processes every row's image
            batch[key] = stack_images(images)[key]
    return batch, shapes


def _row_pieces(shared: dict, key: str, dtype, tail) -> list[np.ndarray]:
    """A process's exchanged integer array of `key`, cut into its rows."""
    flat = np.asarray(shared["values"][key], dtype).reshape(-1, *tail)
    offsets = np.cumsum([0] + shared["sizes"][key])
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(shared["sizes"][key]))]


def place_batch(batch: dict, rules: ShardingRules) -> dict:
    """The batch on the mesh, placed by `step.batch_shardings`; `LocalRows` assembled across processes."""
    shardings = batch_shardings(batch, rules)
    if distributed.process_count() == 1:
        return jax.device_put(batch, shardings)
    out = {}
    for key, value in batch.items():
        if isinstance(value, LocalRows):
            split = row_sharding(rules, value.shape)
            array = jax.make_array_from_process_local_data(split, value.data, value.shape)
            out[key] = array if split == shardings[key] else _reshard(shardings[key])(array)
        else:  # whole on every process: each places its own shards
            out[key] = jax.make_array_from_callback(value.shape, shardings[key], lambda idx, v=value: v[idx])
    return out


@functools.lru_cache(maxsize=None)
def _reshard(sharding):
    return jax.jit(lambda x: x, out_shardings=sharding)


def read_hf_tensors(model) -> None:
    """What `save_hf` reads, read and dropped: a process that does not write an export still takes part
    in gathering the tensors sharded across processes, in the writer's order."""
    entries, _ = hf_entries(model)
    for *_, read in entries:
        read()
