"""What a training run was made from: fingerprints of its base model's folder (`io/fingerprint.py`) and of
its training split's rows in order (`data/fingerprint.py`), recorded in `<run>/fingerprints.json` when the
run begins and checked when it resumes: a base model or data changed between two starts (a tensor
rescaled, rows edited or reordered) is refused naming which, before anything is loaded. A run folder of an
earlier version (no fingerprints.json) resumes and records the current ones."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig
from ..data.fingerprint import data_fingerprint
from ..io.atomic import write_atomic
from ..io.fingerprint import weights_fingerprint
from ..io.model_folder import resolve_folder

FINGERPRINTS_FILE = "fingerprints.json"
WHAT = {"base_model": "the base model (model.model_id)", "data": "the training data (data.source, data.train_split)"}


class RunContentError(RuntimeError):
    """A run resumed on a base model or data whose contents differ from the ones it began with."""


def run_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """{"base_model": sha256 of the model folder (sampled: see io/fingerprint.py), "data": sha256 of the
    training split's rows, in order}."""
    return {"base_model": weights_fingerprint(resolve_folder(cfg.model.model_id)),
            "data": data_fingerprint(cfg.data.dataset, cfg.data.source, cfg.data.train_split, ordered=True)}


def check_fingerprints(cfg: RunConfig, current: dict[str, str]) -> None:
    """Refuse a run folder whose recorded fingerprints differ from `current`, naming what changed. Writes nothing."""
    path = cfg.run_dir / FINGERPRINTS_FILE
    if not path.exists():
        return
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunContentError(f"{path}: not JSON ({err}); restore it, or train into a new folder") from None
    changed = [key for key in WHAT if recorded.get(key) != current[key]]
    if changed:
        what = "; ".join(f"{WHAT[k]}: {str(recorded.get(k))[:12]}... in the run, {current[k][:12]}... now"
                         for k in changed)
        raise RunContentError(
            f"run folder {cfg.run_dir} was begun with other contents of {what} (fingerprints in {path}); a file "
            f"changed since the run began, so it cannot resume exactly: put the original back, or train into a new "
            f"folder (e.g. name={cfg.name}_new)")


def write_fingerprints(run_dir: Path, fingerprints: dict[str, str]) -> None:
    """<run>/fingerprints.json, once (a resumed run's fingerprints equal it)."""
    path = Path(run_dir) / FINGERPRINTS_FILE
    if not path.exists():
        write_atomic(path, json.dumps(fingerprints, indent=2, sort_keys=True) + "\n")
