"""The ways on after a stop (a NaN or inf, a diverged run) and their record in the run folder.

`train.py` may resume a run with
- `--allow-change KEY` (repeatable): KEY (one of `CHANGEABLE_ON_RESUME`: the learning rate, its schedule,
  the clipping) may differ from the run's config.yaml; the change is recorded and config.yaml then holds
  the new value;
- `--resume-from STEP`: resume from the older checkpoint STEP; the later checkpoints, the exports of the
  stages that end after STEP and a copy of metrics.jsonl are moved to `set_aside/<time>-from-<STEP>/`
  (never deleted), and metrics.jsonl is cut back to STEP as on every resume;
- `--skip-batch N`: the optimizer step holding micro-step N (its whole accumulation window) is not
  trained: its micro-steps are logged as skipped, their accumulated gradients dropped.

Each is one JSON line of `changes.jsonl` (append-only): {"micro_step": the micro-step the run resumed
from, "change": "config" | "resume_from" | "skip", ...}. A recorded skip holds for every later resume.
This module imports no JAX: the report reads the record beside a running trainer. The checks and
the writing are in train/resume_options.py.
"""

from __future__ import annotations

import json
from pathlib import Path

CHANGES_FILE = "changes.jsonl"
SET_ASIDE_DIR = "set_aside"


def read_changes(run_dir: Path) -> list[dict]:
    """changes.jsonl's records ([] without the file; a torn last line skipped)."""
    path = run_dir / CHANGES_FILE
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict)]


def skipped_micro_steps(records: list[dict]) -> set[int]:
    """The micro-steps (from 1) that the recorded skips leave untrained."""
    return {m for r in records if r.get("change") == "skip" for m in range(r["first"], r["last"] + 1)}


def describe_change(record: dict) -> str:
    """One line of a change, for the report."""
    at = f"micro-step {record.get('micro_step')}"
    if record.get("change") == "config":
        return f"{at}: {record['key']} {record['old']!r} -> {record['new']!r}"
    if record.get("change") == "resume_from":
        return f"{at}: resumed from checkpoint step {record['step']}; later ones set aside in {record['set_aside']}"
    if record.get("change") == "skip":
        return f"{at}: skipped micro-steps {record['first']}-{record['last']} (one optimizer step)"
    return f"{at}: {record}"
