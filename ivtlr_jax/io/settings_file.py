"""A model folder's IVT-LR settings (`config.InferenceSettings`) as `ivtlr_settings.json`: written into every
stage export and official import, read by `predict.Predictor` (ivtlr-ask, ivtlr-serve)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import ConfigError, InferenceSettings
from .atomic import write_atomic

SETTINGS_FILE = "ivtlr_settings.json"


def write_settings(folder: Path, settings: InferenceSettings) -> None:
    write_atomic(Path(folder) / SETTINGS_FILE, json.dumps(dataclasses.asdict(settings), indent=2) + "\n")


def read_settings(folder: Path) -> InferenceSettings | None:
    """The folder's settings, None when it has no settings file; a damaged file is an error naming it."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not JSON ({err})") from None
    return InferenceSettings.from_dict(raw, str(path))
