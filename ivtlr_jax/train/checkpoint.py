"""Training checkpoints with orbax-checkpoint: trainable parameters, optimizer state and the loop's
position (step, epoch, batch index within the epoch, RNG seed) — everything a resumed run needs to
continue exactly. Saves are asynchronous and atomic (orbax writes a temporary folder and renames it
when complete, so a crash mid-save leaves the previous checkpoint usable); the last `keep` are kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ..models.checkpoint_io import flatten_tree, nest_paths
from ..models.common.loading import with_values, variables_by_path


def _pure(state) -> dict:
    return nest_paths({p: v[...] for p, v in variables_by_path(state).items()})


class TrainCheckpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trainable, opt_state, meta: dict[str, Any], *, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(_pure(trainable)),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, step: int, trainable_like, opt_state_like) -> tuple[Any, Any, dict]:
        """Restore into the structure (and shardings) of `trainable_like` / `opt_state_like`."""
        abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(jax.tree.map(abstract, _pure(trainable_like))),
                opt_state=ocp.args.StandardRestore(jax.tree.map(abstract, opt_state_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        trainable = with_values(trainable_like, flatten_tree(restored["trainable"]))
        return trainable, restored["opt_state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
