"""Training checkpoints with orbax-checkpoint: trainable parameters, optimizer state and the loop's
position (step, epoch, batch index within the epoch, RNG seed) — everything a resumed run needs to
continue exactly. Saves are asynchronous and atomic (orbax writes a temporary folder and renames it
when complete, so a crash mid-save leaves the previous checkpoint usable); the last `keep` are kept,
and the steps named in `preserve` (the stage ends, from which stage exports are rebuilt) always.

A checkpoint that fails to restore (a truncated file, a missing `_METADATA`, ...) is moved aside into
`damaged/` next to the checkpoint folder (renamed, never deleted) and the previous one is tried.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from .. import distributed
from ..io.orbax_params import flatten_tree, nest_paths
from ..models.common.loading import with_values, variables_by_path

DAMAGED_DIR = "damaged"
UNFINISHED_SAVE = re.compile(r"\d+\.orbax-checkpoint-tmp")  # orbax's folder of a step being saved


def remove_unfinished_saves(directory: Path, log: Callable[[str], None]) -> None:
    """Delete the temporary folders of saves that never finished (`<step>.orbax-checkpoint-tmp-*`: a
    process stopped mid-save), with one log line; by process 0, the others wait."""
    if distributed.is_writer() and directory.is_dir():
        unfinished = sorted(p for p in directory.iterdir() if p.is_dir() and UNFINISHED_SAVE.match(p.name))
        for folder in unfinished:
            shutil.rmtree(folder)
        if unfinished:
            log(f"removed {len(unfinished)} unfinished checkpoint save(s) in {directory}: "
                f"{', '.join(p.name for p in unfinished)}")
    distributed.barrier("unfinished_saves")


def _pure(state) -> dict:
    return nest_paths({p: v[...] for p, v in variables_by_path(state).items()})


class TrainCheckpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, preserve: tuple[int, ...] = ()):
        self.directory = Path(directory).absolute()
        self._keep, self._async, self._preserve = keep, async_save, tuple(preserve)
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        policies = [checkpoint_managers.LatestN(self._keep)]
        if self._preserve:
            policies.append(checkpoint_managers.CustomSteps(list(self._preserve)))
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=self._async, create=True,
                                               preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
        return ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

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

    def restore_trainable(self, step: int, trainable_like):
        """Only the trainable parameters of a step (to rebuild a stage export), in `trainable_like`'s structure."""
        abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            trainable=ocp.args.StandardRestore(jax.tree.map(abstract, _pure(trainable_like)))))
        return with_values(trainable_like, flatten_tree(restored["trainable"]))

    def restore_latest(self, trainable_like, opt_state_like, *, log: Callable[[str], None] = print,
                       required_meta: tuple[str, ...] = ()) -> tuple[int, Any, Any, dict] | None:
        """The newest checkpoint that restores, with the `required_meta` keys in its meta record:
        (step, trainable, opt_state, meta), or None when there is none. Each one that fails is moved
        aside with one log line. With several processes, a checkpoint restores when it restores on all."""
        for step in reversed(self.all_steps()):
            def attempt(step=step):
                trainable, opt_state, meta = self.restore(step, trainable_like, opt_state_like)
                missing = [k for k in required_meta if not isinstance(meta, dict) or k not in meta]
                if missing:
                    raise ValueError(f"its meta record lacks {missing}")
                return trainable, opt_state, meta

            try:
                trainable, opt_state, meta = distributed.agree(attempt, "restore")
                return step, trainable, opt_state, meta
            except Exception as e:  # any failure to read it: set it aside and try the previous one
                where = self.move_aside(step)
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                log(f"checkpoint step {step} could not be restored ({type(e).__name__}: {reason}); "
                    f"moved to {where}; trying the previous one")
        return None

    def move_aside(self, step: int) -> Path:
        """Rename a step's folder into `damaged/` (never deleted; by process 0) and reopen the manager
        without it."""
        self.manager.wait_until_finished()
        source = self.directory / str(step)
        target = self.directory.parent / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if distributed.is_writer():
            target.parent.mkdir(parents=True, exist_ok=True)
            n = 0
            while target.exists():
                n += 1
                target = target.with_name(f"{target.name.split('.')[0]}.{n}")
            source.rename(target)
        target = Path(distributed.broadcast_object(str(target), "moved"))
        distributed.barrier("moved")
        self.manager.close()
        self.manager = self._open()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
