"""Training checkpoints with orbax-checkpoint: trainable parameters, optimizer state and the loop's
position (step, epoch, batch index within the epoch, RNG seed) — everything a resumed run needs to
continue exactly. Saves are asynchronous and atomic (orbax writes a temporary folder and renames it
when complete, so a crash mid-save leaves the previous checkpoint usable); the last `keep` are kept,
and the steps named in `preserve` (the stage ends, from which stage exports are rebuilt) always.

A checkpoint whose own files fail their checks (a truncated or unparseable file of the step, a missing
one, orbax's errors about the step's content, a meta record without the loop's keys) is moved aside
into `damaged/` next to the checkpoint folder (renamed, never deleted) and the previous one is tried.
Any other failure to read it (permission denied, an I/O error, out of memory, an unavailable file
system, another process's error) proves nothing about the checkpoint: `CheckpointReadError` stops the
run and nothing is moved.
"""

from __future__ import annotations

import json
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
# tensorstore's status codes, kept at the start of its error messages (ValueError)
CONTENT_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")  # the bytes of the step are wrong or missing
ENVIRONMENT_CODES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED",
                     "CANCELLED", "UNAUTHENTICATED", "INTERNAL", "UNKNOWN")  # the machine, not the checkpoint


class DamagedCheckpoint(ValueError):
    """A checkpoint's own files fail their checks: it is moved aside."""


class CheckpointReadError(RuntimeError):
    """A checkpoint could not be read for a reason that is not proven damage: the run stops unchanged."""


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from (orbax wraps tensorstore's)."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _status_code(error: BaseException) -> str | None:
    match = re.match(r"([A-Z_]+): ", str(error))
    return match.group(1) if match else None


def _environmental(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, distributed.PeerFailure)):
        return True
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        return True  # permission denied, an I/O error, a stale file handle, ...
    return _status_code(error) in ENVIRONMENT_CODES  # also XLA's RESOURCE_EXHAUSTED


def _content(error: BaseException, step_dir: Path) -> bool:
    if isinstance(error, (DamagedCheckpoint, json.JSONDecodeError)):
        return True
    if isinstance(error, FileNotFoundError):  # a file of the step is missing
        return str(step_dir) in f"{error.filename} {error}"
    if isinstance(error, KeyError):  # orbax: an item of the step is missing
        return "not found in the checkpoint" in str(error)
    if isinstance(error, ValueError):  # tensorstore: a file of the step is truncated, corrupt or missing
        return _status_code(error) in CONTENT_CODES
    return False


def damage_evidence(error: BaseException, step_dir: Path) -> BaseException | None:
    """The error of `error`'s chain (raised restoring the checkpoint in `step_dir`) that proves the
    checkpoint itself damaged, or None: only when the step's folder is still there, no error of the chain
    is about the machine (permission, I/O, memory, availability, another process) and one is about the
    step's content."""
    chain = _chain(error)
    if not step_dir.is_dir() or any(_environmental(e) for e in chain):
        return None
    return next((e for e in reversed(chain) if _content(e, step_dir)), None)


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, at most `limit` characters of the message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit] or type(error).__name__}"


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

    def read_meta(self, step: int) -> dict | None:
        """The meta record of a step (None when it cannot be read)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # a message about the step says what is known; never stops anything
            return None

    def restore_latest(self, trainable_like, opt_state_like, *, log: Callable[[str], None] = print,
                       required_meta: tuple[str, ...] = ()) -> tuple[int, Any, Any, dict] | None:
        """The newest checkpoint that restores, with the `required_meta` keys in its meta record:
        (step, trainable, opt_state, meta), or None when there is none. Each damaged one (`damage_evidence`)
        is moved aside with one log line; any other error raises `CheckpointReadError`, nothing moved.
        With several processes, a checkpoint restores when it restores on all; one damaged on any
        process is moved aside by all."""
        for step in reversed(self.all_steps()):
            try:
                return (step, *distributed.agree(
                    lambda step=step: self._restore_checked(step, trainable_like, opt_state_like, required_meta),
                    "restore"))
            except Exception as e:
                if not (isinstance(e, DamagedCheckpoint) or (isinstance(e, distributed.PeerFailure)
                                                             and e.message.startswith(DamagedCheckpoint.__name__))):
                    raise CheckpointReadError(
                        f"checkpoint step {step} in {self.directory} could not be read ({one_line(e)}); this does "
                        "not show that the checkpoint is damaged, so nothing was moved or changed: fix the cause "
                        "and re-run the same command") from e
                where = self.move_aside(step)
                log(f"checkpoint step {step} could not be restored ({' '.join(str(e).split())}); moved to {where}; "
                    "trying the previous one")
        return None

    def _restore_checked(self, step: int, trainable_like, opt_state_like, required_meta: tuple[str, ...]):
        """`restore`, its failure raised as `DamagedCheckpoint` when it proves the step damaged."""
        try:
            trainable, opt_state, meta = self.restore(step, trainable_like, opt_state_like)
        except Exception as e:
            evidence = damage_evidence(e, self.directory / str(step))
            if evidence is not None:
                raise DamagedCheckpoint(one_line(evidence)) from e
            raise
        missing = [k for k in required_meta if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise DamagedCheckpoint(f"its meta record lacks {missing}")
        return trainable, opt_state, meta

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
        self.reopen()
        return target

    def reopen(self) -> None:
        """Open the manager again, seeing the steps now in the folder (after steps were moved away)."""
        self.manager.wait_until_finished()
        self.manager.close()
        self.manager = self._open()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
