"""The ways on after a stop that `train.py` offers (--allow-change, --resume-from, --skip-batch; see
train/run_changes.py for what each does and records): their checks before anything loads, the setting aside
of what lies after an older checkpoint, and the records appended to changes.jsonl."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import yaml

from ..config import CHANGEABLE_ON_RESUME, ConfigError, RunConfig, differing_keys, to_dict
from ..io.durable import LineLog, fsync_folder
from .run_changes import CHANGES_FILE, SET_ASIDE_DIR


@dataclasses.dataclass(frozen=True)
class ResumeOptions:
    """What `train.py`'s --allow-change, --resume-from and --skip-batch ask of a resume."""
    allow_change: tuple[str, ...] = ()
    resume_from: int | None = None  # a checkpoint step
    skip_batch: int | None = None  # a micro-step, counted from 1 as in the messages

    def __post_init__(self):
        refused = [k for k in self.allow_change if k not in CHANGEABLE_ON_RESUME]
        if refused:
            raise ConfigError(f"--allow-change {' '.join(refused)}: only {', '.join(CHANGEABLE_ON_RESUME)} may "
                              "change when a run resumes (the other keys would change what the checkpoint means)")
        if self.resume_from is not None and self.resume_from < 0:
            raise ConfigError(f"--resume-from {self.resume_from}: a checkpoint step is >= 0")
        if self.skip_batch is not None and self.skip_batch < 1:
            raise ConfigError(f"--skip-batch {self.skip_batch}: micro-steps are counted from 1")


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """The checkpoint steps in a checkpoints folder (its numbered sub-folders)."""
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []


def check_resume_options(run_dir: Path, options: ResumeOptions) -> None:
    """Before anything loads: --resume-from names a checkpoint of the run, and --skip-batch a micro-step after
    the checkpoint the run resumes from."""
    steps = checkpoint_steps(run_dir / "checkpoints")
    if options.resume_from is not None and options.resume_from not in steps:
        raise ConfigError(f"--resume-from {options.resume_from}: {run_dir / 'checkpoints'} holds no checkpoint step "
                          f"{options.resume_from} (its steps: {', '.join(map(str, steps)) or 'none'})")
    start = options.resume_from if options.resume_from is not None else max(steps, default=0)
    if options.skip_batch is not None and options.skip_batch <= start:
        raise ConfigError(f"--skip-batch {options.skip_batch}: the run resumes from step {start}, after that "
                          "micro-step; name a later one (or add --resume-from an earlier checkpoint)")


def set_aside_after(run_dir: Path, step: int, stage_ends: dict[int, int]) -> Path | None:
    """Move the checkpoints after `step` and the exports of the stages ending after it into
    `set_aside/<time>-from-<step>/`, with a copy of metrics.jsonl. -> that folder, or None when nothing is
    after `step`."""
    ckpt_dir = run_dir / "checkpoints"
    later = [ckpt_dir / str(s) for s in checkpoint_steps(ckpt_dir) if s > step]
    exports = [run_dir / f"stage_{s}" for s, end in sorted(stage_ends.items()) if end > step]
    exports = [p for p in exports if p.exists()]
    if not later and not exports:
        return None
    target = run_dir / SET_ASIDE_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-from-{step}"
    while target.exists():  # two in one second
        target = target.with_name(target.name + "+")
    (target / "checkpoints").mkdir(parents=True)
    if (run_dir / "metrics.jsonl").exists():
        shutil.copy2(run_dir / "metrics.jsonl", target / "metrics.jsonl")
    for folder in later:
        folder.rename(target / "checkpoints" / folder.name)
    for folder in exports:
        folder.rename(target / folder.name)
    for folder in (target / "checkpoints", target, target.parent, ckpt_dir, run_dir):
        fsync_folder(folder)
    return target


def append_changes(run_dir: Path, records: list[dict]) -> None:
    """Add `records` to changes.jsonl, on disk when this returns."""
    with LineLog(run_dir / CHANGES_FILE) as log:
        for record in records:
            log.write(json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def allowed_changes(cfg: RunConfig, options: ResumeOptions) -> dict[str, tuple]:
    """{key: (the run's value, the new value)} of the keys --allow-change names that differ from the run
    folder's config.yaml ({} for a new run)."""
    saved = cfg.run_dir / "config.yaml"
    if not (options.allow_change and saved.exists()):
        return {}
    diff = differing_keys(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
    return {k: v for k, v in diff.items() if k in options.allow_change}
