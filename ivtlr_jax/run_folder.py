"""A training run's folder: its layout, and the record of a micro-step that metrics.jsonl holds, read and
written here only (`train.py` writes the folder; the report, the dashboards, the evaluation's defaults, the
exporter and the predictor read it).

    <save_path>/<name>/
        config.yaml          the run's configuration (`config.to_dict`)
        metrics.jsonl        one `MetricsRecord` per micro-step (strict JSON: non-finite values are null)
        checkpoints/<step>/  the trainer's checkpoints (train/checkpoint.py)
        stage_<s>/           the merged export of curriculum stage s (a Hugging Face folder)
        eval/stage_<s>/      evaluations of stage s's export (`infer.py`'s default output)
        tensorboard/         TensorBoard event files (events.py): train/ and eval/

Only the standard library: the report imports it beside a running training (no JAX).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
STAGE_PREFIX = "stage_"
STAGE_FOLDER = re.compile(rf"^{STAGE_PREFIX}(\d+)$")


def stage_folder_name(stage: int) -> str:
    """The name of stage `stage`'s export folder: stage_<s>."""
    return f"{STAGE_PREFIX}{stage}"


def stage_of_folder(folder: Path | str) -> int | None:
    """The stage a folder named stage_<s> exports (None for any other name)."""
    match = STAGE_FOLDER.match(Path(folder).name)
    return int(match.group(1)) if match else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or_zero(value) -> int:
    """An integer field as read: a number as an int, anything else (null, missing, text) 0."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0


def _float_or_none(value) -> float | None:
    """A float field as read: a number as a float, anything else (null, missing, text) None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclasses.dataclass(frozen=True)
class MetricsRecord:
    """One micro-step of training, one line of metrics.jsonl (fields in the order written)."""

    micro_step: int  # 1-based, over the whole run
    epoch: int
    stage: int  # curriculum stage
    loss: float | None  # None: non-finite (written as null)
    grad_norm: float | None  # global L2 norm after the loss scale, before clipping
    tokens: int  # supervised tokens (those with a label)
    tokens_per_s: float | None  # tokens per second of the micro-step's wall time
    latents: int  # latent steps of the stage
    compilations: int  # distinct compiled shapes so far
    lr: float | None
    skipped: bool = False  # left untrained by `train.py --skip-batch` (its line: micro_step, epoch, stage, skipped)

    INT_FIELDS = ("micro_step", "epoch", "stage", "tokens", "latents", "compilations")
    SKIPPED_FIELDS = ("micro_step", "epoch", "stage", "skipped")

    @classmethod
    def skipped_step(cls, micro_step: int, epoch: int, stage: int) -> MetricsRecord:
        return cls(micro_step, epoch, stage, None, None, 0, None, 0, 0, None, skipped=True)

    def to_line(self) -> str:
        """One strict-JSON line: NaN and infinities written as null; a skipped step's line has only its place."""
        fields = dataclasses.asdict(self)
        fields = {k: fields[k] for k in self.SKIPPED_FIELDS} if self.skipped else \
            {k: v for k, v in fields.items() if k != "skipped"}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        return json.dumps(clean, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, value) -> MetricsRecord | None:
        """A parsed line as a record; None when it is not one (not an object, or no integer micro_step).
        A missing or non-numeric integer field reads as 0, a float field as None."""
        if not isinstance(value, dict) or not _is_int(value.get("micro_step")):
            return None
        read = lambda f: (_int_or_zero if f in cls.INT_FIELDS else _float_or_none)(value.get(f))  # noqa: E731
        return cls(**{f.name: read(f.name) for f in dataclasses.fields(cls) if f.name != "skipped"},
                   skipped=value.get("skipped") is True)


def parse_metrics_lines(lines) -> tuple[list[MetricsRecord], int]:
    """(records, torn): the records of metrics.jsonl's lines, and the count of other non-blank lines (a torn
    last line of a killed run, garbage)."""
    records, torn = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = MetricsRecord.from_json(json.loads(line))
        except json.JSONDecodeError:
            record = None
        if record is None:
            torn += 1
        else:
            records.append(record)
    return records, torn


class RunFolder:
    """The folder of one training run (`RunConfig.run_dir`) and the places in it."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.metrics_file = self.path / METRICS_FILE
        self.checkpoints = self.path / CHECKPOINTS_DIR
        self.tensorboard = self.path / TENSORBOARD_DIR

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def stage_export(self, stage: int) -> Path:
        return self.path / stage_folder_name(stage)

    def stage_eval_dir(self, stage: int) -> Path:
        """Where evaluations of stage `stage`'s export go (outside the folder a re-export replaces)."""
        return self.path / EVAL_DIR / stage_folder_name(stage)

    def stage_exports(self) -> dict[int, Path]:
        """{stage: export folder} of the stage_<s> folders present."""
        found = {stage_of_folder(p): p for p in self.path.glob(f"{STAGE_PREFIX}*")}
        return {s: p for s, p in sorted(found.items()) if s is not None}

    def has_config(self) -> bool:
        return self.config_file.is_file()

    @classmethod
    def of_stage_export(cls, folder: Path | str) -> tuple[RunFolder, int] | None:
        """(the run, the stage) of a folder that is a run's stage_<s> export (its parent has a config.yaml)."""
        folder = Path(folder)
        stage, run = stage_of_folder(folder), cls(folder.parent)
        return (run, stage) if stage is not None and run.has_config() else None

    # ---- metrics.jsonl ------------------------------------------------------------------------------------
    def read_metrics(self) -> tuple[list[MetricsRecord], int]:
        """(records, torn lines) of metrics.jsonl, in file order; ([], 0) without the file. Bytes that are
        not UTF-8 (a damaged line) are read as replacement characters: that line counts as torn."""
        if not self.metrics_file.is_file():
            return [], 0
        with open(self.metrics_file, encoding="utf-8", errors="replace") as f:
            return parse_metrics_lines(f)

    def recorded_micro_steps(self) -> int:
        """The last micro-step that metrics.jsonl records (0 when none, or no file)."""
        return max([0] + [r.micro_step for r in self.read_metrics()[0]])

    def stage_end_step(self, stage: int) -> int:
        """The last micro-step of `stage` that metrics.jsonl records (the stage index when it has none)."""
        return max([r.micro_step for r in self.read_metrics()[0] if r.stage == stage], default=stage)

    def trim_metrics(self, micro_step: int) -> None:
        """Keep the records up to the restored `micro_step` (a resumed run re-logs the steps after it) and drop
        torn lines; rewritten atomically."""
        from .io.atomic import write_atomic  # here: the report imports this module without JAX (io's package)

        if self.metrics_file.exists():
            kept = [r for r in self.read_metrics()[0] if r.micro_step <= micro_step]
            write_atomic(self.metrics_file, "".join(r.to_line() for r in kept))
