"""A run's batch layout: how many rows one micro-step takes over all devices and how many micro-steps make an
optimizer step. It is fixed when the run starts (from `train.global_batch_size`, or from
`optim.gradient_accumulation_steps`, and the devices) and recorded in the run folder (`batch_layout.json`), so
that a resume on another number of devices keeps the global batch, the order of the rows and the
accumulation: each device then takes another share of the same micro-step (the per-device memory changes, the
run does not), or the resume is refused when the devices cannot share it evenly.

The official setup: a per-GPU micro-batch of 2, 8 accumulation steps and 4 GPUs, a global batch of 64; with
`global_batch_size: 64` a fresh run reaches 64 on 1, 2, 4 or 8 devices (accumulation 32, 16, 8, 4). The loss's
per-replica groups stay `train.batch_size_training` rows whatever the devices (train/step.py `batch_loss`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..io.atomic import write_atomic

LAYOUT_FILE = "batch_layout.json"


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    rows_per_micro_step: int  # rows of one micro-batch over all replicas: the epoch's order is cut in these
    accumulation: int  # micro-batches per optimizer step
    replicas: int  # data-parallel replicas (mesh.data x mesh.fsdp) sharing each micro-batch now

    @property
    def global_batch(self) -> int:
        return self.rows_per_micro_step * self.accumulation

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.rows_per_micro_step} rows per micro-step "
                f"({self.rows_per_micro_step // self.replicas} on each of {self.replicas} replicas) x accumulation "
                f"{self.accumulation}")


def planned_layout(cfg: RunConfig, replicas: int) -> BatchLayout:
    """A fresh run's layout on `replicas` replicas: batch_size_training rows on each, and the accumulation that
    reaches train.global_batch_size (refused when it cannot: not a whole number of micro-steps), or
    optim.gradient_accumulation_steps (default 1)."""
    per_replica, target = cfg.train.batch_size_training, cfg.train.global_batch_size
    rows = per_replica * replicas
    if target is None:
        return BatchLayout(rows, cfg.optim.gradient_accumulation_steps or 1, replicas)
    if target % rows:
        raise ConfigError(f"train.global_batch_size={target} is not a whole number of micro-steps of "
                          f"batch_size_training={per_replica} x {replicas} replicas = {rows} rows on these devices; "
                          f"choose a device count or batch_size_training whose product divides {target}")
    return BatchLayout(rows, target // rows, replicas)


def resumed_layout(recorded: BatchLayout, replicas: int, log) -> BatchLayout:
    """The recorded layout on `replicas` replicas now: the same rows per micro-step and accumulation, each
    replica taking its share; refused (naming the devices and the batch) when they do not divide the rows."""
    rows = recorded.rows_per_micro_step
    if rows % replicas:
        shares = [n for n in range(1, rows + 1) if rows % n == 0]
        raise ConfigError(f"this run's micro-steps hold {rows} rows (global batch {recorded.global_batch}, started on "
                          f"{recorded.replicas} replicas); {replicas} replicas cannot share them evenly. Resume it on "
                          f"a replica count (mesh.data x mesh.fsdp) among {shares}")
    if replicas != recorded.replicas:
        log(f"resuming on {replicas} replicas (the run started on {recorded.replicas}): each now takes "
            f"{rows // replicas} of the {rows} rows of a micro-step; the global batch, the order and the accumulation "
            f"are the run's")
    return dataclasses.replace(recorded, replicas=replicas)


def run_layout(cfg: RunConfig, run_dir: Path, replicas: int, log) -> BatchLayout:
    """The recorded layout of a run folder, on these replicas; or, for a new run (or one from before layouts
    were recorded), the planned one."""
    path = run_dir / LAYOUT_FILE
    if not path.is_file():
        return planned_layout(cfg, replicas)
    try:
        raw = json.loads(path.read_text())
        recorded = BatchLayout(int(raw["rows_per_micro_step"]), int(raw["accumulation"]), int(raw["replicas"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a batch layout ({err}); it records how the run's batches were cut") from None
    return resumed_layout(recorded, replicas, log)


def write_layout(run_dir: Path, layout: BatchLayout) -> None:
    write_atomic(run_dir / LAYOUT_FILE, json.dumps(dataclasses.asdict(layout), indent=2) + "\n")
