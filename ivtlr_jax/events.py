"""Metrics for dashboards, beside metrics.jsonl (the source of truth): TensorBoard event files written
with tensorboardX (no TensorFlow) and, when `log.wandb` is on, Weights & Biases. What to write is the
run config's `log` section (`config.LogSection`).

- Training (`train/loop.py`): every micro-step's record of metrics.jsonl as scalars `train/loss`,
  `train/grad_norm`, `train/lr`, `train/tokens_per_s`, `train/stage`, `train/epoch` at step `micro_step`,
  in `<run>/tensorboard/train/`. A resumed run rewrites it from metrics.jsonl (see `train_events`).
- Evaluation (`eval/run.py`, from `infer.py` and the demo): `eval/<split>/accuracy_strict`,
  `eval/<split>/accuracy_official` and the accuracy per domain, plus up to `MAX_PICTURES` of the patch
  pictures when `--save-attention` wrote them. A stage export of a run (`<run>/stage_<s>`) logs into
  `<run>/tensorboard/eval/` at the micro-step where stage s ended (so it lines up with the training
  curves); any other model folder into `tensorboard/eval/` beside the output file, at step 0. A point a
  tag already has at that step is replaced, not added to (a re-run evaluation): event files are append-only,
  so the files that hold the old point are rewritten without it (`drop_points`).

W&B runs are resumed across invocations of one run folder: the id is kept in `<run>/wandb_run_id`.
"""

from __future__ import annotations

import importlib.util
import secrets
import struct
import time
from pathlib import Path

from .config import ConfigError
from .io.atomic import write_atomic
from .run_folder import TENSORBOARD_DIR, MetricsRecord, RunFolder

WANDB_ID_FILE = "wandb_run_id"
TRAIN_SCALARS = ("loss", "grad_norm", "lr", "tokens_per_s", "stage", "epoch")  # the MetricsRecord fields sent
MAX_PICTURES = 4  # patch pictures sent with an evaluation
FLUSH_SECS = 30


def check_backends(log_cfg) -> None:
    """Refuse at start a `log` section asking for a package that is not installed."""
    if log_cfg.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("log.tensorboard: true needs the tensorboardX package (a dependency of ivtlr-jax: "
                          "pip install tensorboardX), which is not installed; install it or set log.tensorboard=false")
    if log_cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb: true needs the wandb package, which is not installed; pip install wandb "
                          "(and wandb login), or set log.wandb=false")


class EventLog:
    """One folder's TensorBoard writer and/or one W&B run; every method is a no-op for a backend that is off."""

    def __init__(self, folder: Path, log_cfg, *, run_dir: Path | None = None, purge_step: int | None = None,
                 config: dict | None = None, name: str | None = None):
        check_backends(log_cfg)
        self.tb = self.wandb = None
        if log_cfg.tensorboard:
            from tensorboardX import SummaryWriter

            folder.mkdir(parents=True, exist_ok=True)
            # the file name has whole seconds: a sub-second suffix keeps two writers of one second apart, in order
            self.tb = SummaryWriter(str(folder), purge_step=purge_step or None, flush_secs=FLUSH_SECS,
                                    filename_suffix=f".{time.time_ns() % 10**9:09d}")
        if log_cfg.wandb:
            self.wandb = _wandb_run(run_dir or folder, log_cfg, config, name)

    def scalars(self, values: dict, step: int) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None and values:
            self.wandb.log({**values, "micro_step": step})

    def pictures(self, pictures: dict, step: int) -> None:
        """{tag: HxWx3 uint8 array}."""
        if self.tb is not None:
            for tag, image in pictures.items():
                self.tb.add_image(tag, image, step, dataformats="HWC")
        if self.wandb is not None and pictures:
            import wandb

            self.wandb.log({**{tag: wandb.Image(image) for tag, image in pictures.items()}, "micro_step": step})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None


def _wandb_run(run_dir: Path, log_cfg, config: dict | None, name: str | None):
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / WANDB_ID_FILE
    if not id_file.exists():
        write_atomic(id_file, secrets.token_hex(8) + "\n")
    run = wandb.init(project=log_cfg.wandb_project, entity=log_cfg.wandb_entity or None, id=id_file.read_text().strip(),
                     resume="allow", name=name or run_dir.name, dir=str(run_dir), config=config)
    run.define_metric("micro_step")
    run.define_metric("*", step_metric="micro_step")  # evaluations log at earlier steps than training
    return run


def train_events(cfg, resumed_at: int) -> EventLog:
    """The training run's writers (after config.yaml is written; on the first process of a multi-host run
    only). A resumed run's TensorBoard copy is rebuilt from metrics.jsonl (already cut back to `resumed_at`):
    everything before is purged and the records replayed, so it holds each micro-step once even where a
    killed writer lost its last events."""
    import dataclasses

    import jax

    from .config import to_dict

    log_cfg = cfg.log if jax.process_index() == 0 else dataclasses.replace(cfg.log, tensorboard=False, wandb=False)
    folder = RunFolder(cfg.run_dir)
    events = EventLog(folder.tensorboard / "train", log_cfg, run_dir=folder.path,
                      purge_step=1 if resumed_at else None, config=to_dict(cfg), name=cfg.name)
    if resumed_at and events.tb is not None:
        wandb, events.wandb = events.wandb, None  # W&B keeps what it was sent: not replayed
        for record in folder.read_metrics()[0]:
            if not record.skipped:
                log_train_step(events, record)
        events.wandb = wandb
    return events


def log_train_step(events: EventLog, record: MetricsRecord) -> None:
    events.scalars({f"train/{k}": getattr(record, k) for k in TRAIN_SCALARS}, record.micro_step)


# ---- evaluations ----------------------------------------------------------------------------------------
def evaluation_place(model_dir: Path, out_file: Path) -> tuple[Path, Path | None, int]:
    """(event folder, run folder or None, step) of an evaluation of `model_dir` written to `out_file`."""
    of_run = RunFolder.of_stage_export(Path(model_dir).resolve())
    if of_run is not None:
        run, stage = of_run
        return run.tensorboard / "eval", run.path, run.stage_end_step(stage)
    return Path(out_file).resolve().parent / TENSORBOARD_DIR / "eval", None, 0


def log_evaluation(log_cfg, summary: dict, model_dir, out_file, *, split: str, prompt_format: str = "train",
                   pictures_dir=None) -> Path | None:
    """Send an evaluation summary (and a few patch pictures) to the dashboards; -> the event folder."""
    if log_cfg is None or not (log_cfg.tensorboard or log_cfg.wandb):
        return None
    folder, run_dir, step = evaluation_place(model_dir, out_file)
    tag = f"eval/{split}" + ("" if prompt_format == "train" else f"_{prompt_format}_prompts")
    scalars = {f"{tag}/accuracy_strict": summary.get("accuracy_strict"),
               f"{tag}/accuracy_official": summary.get("accuracy_official"),
               **{f"{tag}/accuracy_by_domain/{d}": a for d, a in (summary.get("accuracy_by_domain") or {}).items()}}
    pictures = _pictures(Path(pictures_dir), f"{tag}/patches") if pictures_dir is not None else {}
    if log_cfg.tensorboard:
        drop_points(folder, {(name, step) for name in (*scalars, *pictures)})
    events = EventLog(folder, log_cfg, run_dir=run_dir or folder, name=(run_dir or Path(model_dir)).name)
    try:
        events.scalars(scalars, step)
        events.pictures(pictures, step)
    finally:
        events.close()
    return folder


def drop_points(folder: Path, points: set[tuple[str, int]]) -> None:
    """Remove the events of `points` ((tag, step)) from the TensorBoard event files of `folder`, so that a new
    point at that step replaces them. Only files holding one are rewritten (atomically; a torn last record,
    which TensorBoard cannot read either, goes with it)."""
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        records = event_records(path.read_bytes())
        kept = [data for data in records if not _is_one_of(data, points)]
        if len(kept) < len(records):
            write_atomic(path, b"".join(map(framed_record, kept)))


def event_records(data: bytes) -> list[bytes]:
    """The serialised events of an event file: records of length (uint64), its masked crc32c, the event, the
    event's masked crc32c; a torn last record ends the list."""
    records, at = [], 0
    while at + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        if at + 12 + n + 4 > len(data):
            break
        records.append(data[at + 12:at + 12 + n])
        at += 12 + n + 4
    return records


def framed_record(event: bytes) -> bytes:
    """An event as an event file's record (tensorboardX's record writer)."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(event))
    return header + struct.pack("<I", masked_crc32c(header)) + event + struct.pack("<I", masked_crc32c(event))


def _is_one_of(data: bytes, points: set[tuple[str, int]]) -> bool:
    from tensorboardX.proto.event_pb2 import Event

    event = Event.FromString(data)
    return any((value.tag, event.step) in points for value in event.summary.value)


def _pictures(folder: Path, tag: str) -> dict:
    import numpy as np
    from PIL import Image

    files = sorted(folder.glob("*.png"))[:MAX_PICTURES]
    return {f"{tag}/{path.stem}": np.asarray(Image.open(path).convert("RGB")) for path in files}
