"""The training driver: epochs -> curriculum stages -> seeded data order -> bucketed batches -> the
jitted sharded step, with logging, checkpoints, exact resume and an export per stage.

Resume is exact: the data order is a pure function of (seed, epoch), the position within the epoch,
the optimizer state (accumulated gradients included) and the step counter are checkpointed, and the
dropout key of every micro-batch is derived from (seed, micro-batch index).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NoReturn
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from .. import distributed
from ..build import build_model
from ..config import (CHANGEABLE_ON_RESUME, ConfigError, InferenceSettings, RunConfig, differing_keys, flat_items,
                      to_dict)
from ..data import LatentShapes, epoch_order, load_examples, stage_of_epoch, stage_tokens
from ..io.atomic import atomic_output_folder, recover_swap, write_atomic
from ..io.durable import LineLog
from ..io.hf_export import write_hf_folder
from ..io.safetensors import read_header
from ..io.settings_file import write_settings
from ..latent import LatentConfig
from ..models.common.lora import merge_lora, trainable_filter
from ..models.common.sharding import ShardingRules, make_mesh, state_shardings
from .batch_layout import LAYOUT_FILE, BatchLayout, run_layout, write_layout
from .checkpoint import DAMAGED_DIR, TrainCheckpointer, remove_unfinished_saves
from .cleanup import close_all
from .fingerprints import check_fingerprints, run_fingerprints, write_fingerprints
from ..events import check_backends, log_train_step, train_events
from ..run_folder import MetricsRecord, RunFolder
from .multihost import collate_local, place_batch, read_hf_tensors
from .optim import discard_accumulation, learning_rate, make_optimizer
from .preemption import Preempted, PreemptionWatch
from .resume_options import (ResumeOptions, allowed_changes, append_changes, check_resume_options,
                             set_aside_after)
from .run_changes import CHANGES_FILE, describe_change, read_changes, skipped_micro_steps
from .token_windows import TokenWindows, micro_batch_tokens, optimizer_window
from .step import (StepConfig, init_optimizer, largest_magnitude, make_cut_window_step, make_train_step,
                   split_trainable, step_shardings)

ZERO_GRAD_WARN_AFTER = 8  # consecutive micro-batches with a gradient norm of exactly 0 before a warning


class ZeroGradientWatch:
    """Warns once per streak of `ZERO_GRAD_WARN_AFTER` micro-batches whose gradient norm is exactly 0
    (a run that learns nothing: saturated activations after a too-large step, or nothing trainable)."""

    def __init__(self, log):
        self.log, self.streak = log, 0

    def update(self, grad_norm: float, micro_step: int, *, stage: int, epoch: int) -> None:
        self.streak = self.streak + 1 if grad_norm == 0.0 else 0
        if self.streak == ZERO_GRAD_WARN_AFTER:
            self.log(f"warning: the gradient norm has been exactly 0 for {self.streak} micro-batches in a row (up to "
                     f"micro-step {micro_step}, stage {stage}, epoch {epoch}): nothing is learning; the learning rate "
                     "may be too high (saturated activations) or no parameter is trainable")


class RunFolderError(RuntimeError):
    pass


class NonFiniteError(RuntimeError):
    """A step produced a NaN or inf loss, gradient norm or parameter: the run stops, nothing of it saved."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int  # micro-batches done in the run so far
    exports: list[Path]  # stage exports written (or rebuilt) by this call
    losses: list[float]
    trained_here: int = 0  # micro-batches trained by this call
    total_steps: int = 0  # micro-batches of the whole run

    @property
    def complete(self) -> bool:
        return self.steps >= self.total_steps

    def summary(self) -> str:
        """What this invocation did, in one line."""
        if self.trained_here == 0 and self.complete:
            return f"already complete: {self.steps} micro-batches; run folder {self.run_dir}"
        state = "complete" if self.complete else "stopped early"
        return (f"trained {self.trained_here} micro-batches in this invocation (the run is {state} at "
                f"{self.steps} of {self.total_steps}); run folder {self.run_dir}")


def maybe_init_distributed() -> None:
    """Multi-process: join the run the environment names (`ivtlr_jax.distributed.initialize`)."""
    distributed.initialize()


def check_run_folder(cfg: RunConfig, allow_change: tuple[str, ...] = ()) -> Path:
    """Refuse, before anything is loaded or written, a folder that is not this run's: one with other
    content, or a run of a different configuration (the error names the keys that differ). Keys of
    `RESUME_NEUTRAL_KEYS` (where the folder is, logging) and those of `allow_change` (train.py's
    --allow-change) do not count. Writes nothing."""
    run_dir = cfg.run_dir
    saved = RunFolder(run_dir).config_file
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return run_dir
    if not saved.exists():
        raise RunFolderError(f"output folder {run_dir} is not empty and is not a run folder; choose another name")
    diff = differing_keys(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
    diff = {k: v for k, v in diff.items() if k not in allow_change}
    if diff:
        keys = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in diff.items())
        changeable = " ".join(f"--allow-change {k}" for k in diff if k in CHANGEABLE_ON_RESUME)
        raise RunFolderError(f"output folder {run_dir} holds a run with a different configuration ({keys}); "
                             f"choose another name or restore those values (see {saved})"
                             + (f", or resume with the new value: add {changeable}" if changeable else ""))
    return run_dir


def refuse_lost_progress(run_dir: Path, missing: str) -> None:
    """A run folder whose metrics.jsonl records progress but which has no checkpoint to resume from
    (`missing` says why) is refused: starting at step 0 would cut that record to nothing. Changes nothing."""
    folder = RunFolder(run_dir)
    done = folder.recorded_micro_steps()
    if done:
        metrics = folder.metrics_file
        raise RunFolderError(
            f"run folder {run_dir} records {done} micro-steps ({metrics.name}) but {missing}, so it cannot resume; "
            f"nothing was changed. If its checkpoints are elsewhere (an unmounted file system, a moved folder), put "
            f"them back in {folder.checkpoints} and re-run; to start the run over from step 0, move its record "
            f"aside first: mv {metrics} {metrics}.old")


def check_checkpoints_present(run_dir: Path) -> None:
    """Before the checkpointer creates checkpoints/: a run with progress has a checkpoint folder with a step."""
    ckpt_dir = RunFolder(run_dir).checkpoints
    if not ckpt_dir.is_dir():
        refuse_lost_progress(run_dir, f"{ckpt_dir} is missing")
    elif not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        refuse_lost_progress(run_dir, f"{ckpt_dir} holds no checkpoint")


def write_run_config(cfg: RunConfig) -> None:
    """config.yaml, written once the model and data have loaded (a failed start leaves no trace)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(RunFolder(cfg.run_dir).config_file, yaml.safe_dump(to_dict(cfg), sort_keys=True))


def check_patch_budget(examples, image_token_id: int, k: int, source: str) -> None:
    """Every latent pass picks K of a row's image tokens: refuse at start a K above any row's image tokens."""
    counts = [(sum(1 for t in ex.question_ids if t == image_token_id), ex.id) for ex in examples]
    fewest, row = min(counts)
    if fewest < k:
        raise ConfigError(f"latent.num_selected_patches={k} is larger than the {fewest} image tokens of row {row!r} "
                         f"of {source} (each latent step inserts K patches of the row's image); choose K <= {fewest}")


def stage_end_steps(num_epochs: int, micro_per_epoch: int, curriculum) -> dict[int, int]:
    """{stage: the micro-step at which it ends} (a stage ends with its last epoch, or with the run)."""
    ends = {}
    for epoch in range(num_epochs):
        ends[stage_of_epoch(epoch, curriculum)] = (epoch + 1) * micro_per_epoch
    return ends


@dataclasses.dataclass
class Run:
    """A run's fixed parts, set up once by `set_up_run`: its folder, the model's frozen half and graph,
    the data, the optimizer, the step's settings and the checkpointer."""
    cfg: RunConfig
    run_dir: Path
    mesh: jax.sharding.Mesh
    rules: ShardingRules
    processor: Any
    graphdef: Any
    frozen: Any
    examples: list
    data_report: str  # what loading the rows kept and skipped
    latent_cfg: LatentConfig
    pad_id: int
    image_token_id: int
    markers: tuple[int, int]  # (start latent, end latent): used when curriculum.use_latent_markers
    layout: BatchLayout  # rows per micro-step over all replicas, accumulation (fixed for the run)
    micro_per_epoch: int
    tx: Any  # the optax transformation
    lr_at: Callable[[int], Any]  # learning rate of an optimizer step (as counted since the last reset)
    step_cfg: StepConfig
    stage_ends: dict[int, int]  # {stage: the micro-step at which it ends}
    ckpt: TrainCheckpointer
    token_windows: TokenWindows | None = None  # optim.loss_scale=token_mean: the denominators (token_windows.py)
    skipped: set[int] = dataclasses.field(default_factory=set)  # micro-steps (from 1) left untrained (--skip-batch)
    pending_changes: list[dict] = dataclasses.field(default_factory=list)  # for changes.jsonl, once resumed

    @property
    def global_batch(self) -> int:
        """Rows of one micro-step over all replicas (the order is cut in these)."""
        return self.layout.rows_per_micro_step

    @property
    def accum(self) -> int:
        return self.layout.accumulation

    @property
    def total_micro(self) -> int:
        return self.micro_per_epoch * self.cfg.train.num_epochs

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)


@dataclasses.dataclass
class RunState:
    """What changes while the run trains: parameters, optimizer state, position, this call's tallies."""
    trainable: Any
    opt_state: Any
    micro_step: int = 0  # micro-batches done in the run so far
    start_epoch: int = 0  # where this call starts: epoch, and batch within it
    start_index: int = 0
    exports: list[Path] = dataclasses.field(default_factory=list)  # stage exports written (or rebuilt) by this call
    losses: list[float] = dataclasses.field(default_factory=list)  # of this call's micro-batches
    done_here: int = 0  # micro-batches trained by this call
    compiled: set = dataclasses.field(default_factory=set)  # signatures of the micro-batches seen: one compilation each
    train_step: Callable | None = None  # the jitted sharded step, made at the first micro-batch (its shardings)


def train(cfg: RunConfig, *, max_steps: int | None = None, log=print,
          options: ResumeOptions = ResumeOptions()) -> TrainResult:
    """Run (or resume) training. `max_steps`: stop after this many micro-batches in this call (used to
    simulate an interrupted run); `options`: train.py's ways on after a stop (train/run_changes.py). Once
    training steps, SIGTERM / SIGINT save a checkpoint at the next micro-step boundary and raise `Preempted`
    (train/preemption.py; the previous handlers are back after)."""
    maybe_init_distributed()
    log = log if distributed.is_writer() else (lambda *_: None)  # process 0 speaks for the run
    run, state = set_up_run(cfg, log, options)
    resume_from_checkpoint(run, state, log)
    if distributed.is_writer():
        run.folder.trim_metrics(state.micro_step)
        record_resume_changes(run, state, log)
    rebuild_finished_exports(run, state, log)
    log_run_start(run, state, log)
    recorder = StepRecorder(run, state.micro_step, log)
    try:
        with PreemptionWatch(distributed.process_count() > 1) as preemption:  # before it, nothing new to save
            if train_epochs(run, state, recorder, StopCheck(max_steps, preemption), log):
                recorder.bar.close()
    finally:  # every close runs (the checkpointer's awaits the save in flight); the first error is raised
        close_all(recorder.metrics_file.close, recorder.events.close, run.ckpt.close)
    return TrainResult(run.run_dir, state.micro_step, state.exports, state.losses, state.done_here, run.total_micro)


def train_epochs(run: Run, state: RunState, recorder: StepRecorder, stop: StopCheck, log) -> bool:
    """The epochs from the state's position, each stage finished (checkpoint, export) at its end.
    -> False when `max_steps` stopped this call."""
    for epoch in range(state.start_epoch, run.cfg.train.num_epochs):
        if not train_epoch(run, state, EpochPlan(run, epoch), recorder, stop):
            return False
        if state.micro_step == run.stage_ends[stage_of_epoch(epoch, run.cfg.curriculum)]:
            finish_stage(run, state, recorder, epoch, log)
    return True


def set_up_run(cfg: RunConfig, log, options: ResumeOptions = ResumeOptions()) -> tuple[Run, RunState]:
    """Check the run folder, build the mesh, the model, the data, the optimizer and the checkpointer
    (every process agrees on each check); writes config.yaml once the model and the data loaded (after the
    record of the changes --allow-change let through, `record_resume_changes`). -> the run, and its state
    at step 0."""
    distributed.same_everywhere(flat_items(to_dict(cfg)), "configurations", "config")  # before anything is read
    run_dir, fingerprints = distributed.agree(lambda: check_start(cfg, options), "run_folder")  # all check; all stop
    distributed.same_everywhere(fingerprints, "base models or data (fingerprints of their contents)", "fingerprints")
    config_changes = allowed_changes(cfg, options)  # read before config.yaml is written
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = ShardingRules(mesh)
    layout = distributed.agree(lambda: run_layout(cfg, run_dir, mesh.shape["data"] * mesh.shape["fsdp"], log),
                               "batch_layout")  # the run's, recorded at its start
    built = build_model(cfg, rules=rules)
    special = built.special
    latent_cfg = cfg.latent.latent_config(special.latent_id)
    image_token_id = built.model.config.image_token_id
    examples, report = distributed.agree(  # every process loaded, or all stop here
        lambda: load_training_examples(cfg, built.processor, built.family.name, image_token_id, latent_cfg),
        "examples")
    if distributed.is_writer():
        if not config_changes:  # else once they are recorded (`record_resume_changes`)
            write_run_config(cfg)  # the model and the data loaded: from here on this folder is this run's
        write_fingerprints(run_dir, fingerprints)
        if not (run_dir / LAYOUT_FILE).exists():
            write_layout(run_dir, layout)
    micro_per_epoch = math.ceil(len(examples) / layout.rows_per_micro_step)
    opt_per_epoch = max(micro_per_epoch // layout.accumulation, 1)
    schedule_steps = (opt_per_epoch * cfg.train.num_epochs, opt_per_epoch * cfg.curriculum.epochs_per_stage)
    tx = make_optimizer(cfg.optim, *schedule_steps, accumulation=layout.accumulation)
    graphdef, trainable, frozen = split_trainable(built.model, trainable_filter(cfg.lora))
    trainable = jax.device_put(trainable, state_shardings(trainable, rules))
    stage_ends = stage_end_steps(cfg.train.num_epochs, micro_per_epoch, cfg.curriculum)
    distributed.on_writer(lambda: check_checkpoints_present(run_dir), "checkpoints", errors=(RunFolderError,))
    remove_unfinished_saves(RunFolder(run_dir).checkpoints, log)
    ckpt = TrainCheckpointer(RunFolder(run_dir).checkpoints, keep=cfg.train.keep_checkpoints,
                             preserve=tuple(stage_ends.values()))
    run = Run(cfg, run_dir, mesh, rules, built.processor, graphdef, frozen, examples, report, latent_cfg,
              pad_id=special.eos_token_id,  # docs/method.md section 3: pad = EOS
              image_token_id=image_token_id, markers=(special.start_latent_id, special.end_latent_id),
              layout=layout, micro_per_epoch=micro_per_epoch, tx=tx,
              lr_at=learning_rate(cfg.optim, *schedule_steps),
              step_cfg=StepConfig(latent_cfg, cfg.train.batch_size_training, cfg.optim.loss_scale),
              stage_ends=stage_ends, ckpt=ckpt)
    if cfg.optim.loss_scale == "token_mean":
        run.token_windows = TokenWindows(lambda epoch: epoch_micro_batch_tokens(run, epoch), micro_per_epoch,
                                         layout.accumulation, optimizer_resets(cfg, micro_per_epoch), run.total_micro)
    apply_resume_options(run, options, config_changes)
    return run, RunState(trainable, init_optimizer(tx, trainable, rules))


def apply_resume_options(run: Run, options: ResumeOptions, config_changes: dict[str, tuple]) -> None:
    """--resume-from: the later checkpoints and exports set aside (`set_aside_after`, by process 0);
    --skip-batch: its optimizer window; with the run's recorded skips in `run.skipped`. The changes to record
    once the run has resumed go to `run.pending_changes`."""
    records = [{"change": "config", "key": k, "old": a, "new": b} for k, (a, b) in config_changes.items()]
    if options.skip_batch is not None:
        if options.skip_batch > run.total_micro:
            raise ConfigError(f"--skip-batch {options.skip_batch}: the run has {run.total_micro} micro-steps")
        start, end = optimizer_window(options.skip_batch - 1, run.accum, optimizer_resets(run.cfg, run.micro_per_epoch),
                                      run.total_micro)
        records.append({"change": "skip", "first": start + 1, "last": end})
    if options.resume_from is not None:
        moved = distributed.on_writer(
            lambda: str(set_aside_after(run.run_dir, options.resume_from, run.stage_ends) or ""), "set_aside")
        run.ckpt.reopen()
        records.append({"change": "resume_from", "step": options.resume_from, "set_aside": moved or None})
    recorded = distributed.on_writer(lambda: sorted(skipped_micro_steps(read_changes(run.run_dir))), "skips")
    run.skipped = set(recorded) | skipped_micro_steps(records)
    run.pending_changes = records


def record_resume_changes(run: Run, state: RunState, log) -> None:
    """The changes of this resume appended to changes.jsonl (at the micro-step it resumed from), then
    config.yaml with the values --allow-change let through. By process 0."""
    if not run.pending_changes:
        return
    records = [{"micro_step": state.micro_step, **r} for r in run.pending_changes]
    append_changes(run.run_dir, records)
    write_run_config(run.cfg)
    for record in records:
        log(f"recorded in {run.run_dir / CHANGES_FILE}: {describe_change(record)}")


def optimizer_resets(cfg: RunConfig, micro_per_epoch: int) -> tuple[int, ...]:
    """The micro-steps where the optimizer state starts afresh: 0, and each later stage's first micro-step
    with optim.reset_optimizer (`maybe_reset_optimizer`)."""
    per_stage = cfg.curriculum.epochs_per_stage
    later = range(per_stage, cfg.train.num_epochs, per_stage) if cfg.optim.reset_optimizer else ()
    return (0, *(epoch * micro_per_epoch for epoch in later))


def epoch_micro_batch_tokens(run: Run, epoch: int) -> list[int]:
    """Supervised tokens of each micro-batch of `epoch` (its seeded, wrapped order at its stage)."""
    stage, curriculum = stage_of_epoch(epoch, run.cfg.curriculum), run.cfg.curriculum
    order = wrapped_order(epoch_order(len(run.examples), run.cfg.seed, epoch), run.micro_per_epoch * run.global_batch)
    token_ids = (run.latent_cfg.latent_token_id, *run.markers)
    return micro_batch_tokens(lambda i: stage_tokens(run.examples[i], stage, curriculum, *token_ids)[1], order,
                              run.global_batch)


def check_start(cfg: RunConfig, options: ResumeOptions = ResumeOptions()) -> tuple[Path, dict[str, str]]:
    """The run folder is this run's (or differs in the keys --allow-change names), --resume-from and
    --skip-batch fit its checkpoints, the dashboards' packages are present (ivtlr_jax/events.py), and the
    base model and data hold what the run began with (train/fingerprints.py). -> (run folder, fingerprints)"""
    run_dir = check_run_folder(cfg, options.allow_change)
    check_resume_options(run_dir, options)
    check_backends(cfg.log)
    fingerprints = run_fingerprints(cfg)
    check_fingerprints(cfg, fingerprints)
    return run_dir, fingerprints


def load_training_examples(cfg: RunConfig, processor, family: str, image_token_id: int, latent_cfg: LatentConfig):
    """The training split's examples and the loading report; refuses no rows, or a K above a row's image
    tokens when a stage has latents."""
    examples, report = load_examples(cfg.data.dataset, cfg.data.source, cfg.data.train_split, processor, family,
                                     max_length=cfg.data.max_length, limit=cfg.data.limit,
                                     image_resize=cfg.data.image_resize)
    if not examples:
        raise ValueError(f"no usable training rows in {cfg.data.source} ({report})")
    if cfg.curriculum.max_latent_stage and cfg.train.num_epochs > cfg.curriculum.epochs_per_stage:  # latents
        check_patch_budget(examples, image_token_id, latent_cfg.num_selected_patches,
                           f"{cfg.data.source} ({cfg.data.train_split})")
    return examples, report


def resume_from_checkpoint(run: Run, state: RunState, log) -> None:
    """The latest checkpoint that restores, if any, into `state`: parameters, optimizer state, position."""
    restored = run.ckpt.restore_latest(state.trainable, state.opt_state, log=log,
                                       required_meta=("epoch", "batch_index", "micro_step"))
    if restored is None:  # none there (a new run), or every one damaged and moved aside
        distributed.on_writer(lambda: refuse_lost_progress(
            run.run_dir, f"none of its checkpoints could be restored (moved to {run.run_dir / DAMAGED_DIR})"),
            "progress", errors=(RunFolderError,))
        return
    latest, state.trainable, state.opt_state, meta = restored
    state.start_epoch, state.start_index, state.micro_step = meta["epoch"], meta["batch_index"], meta["micro_step"]
    if state.start_index >= run.micro_per_epoch:  # saved after an epoch's last batch: the next epoch begins
        state.start_epoch, state.start_index = state.start_epoch + 1, 0
    log(f"resumed from {run.folder.checkpoints} step {latest}: epoch {state.start_epoch}, "
        f"batch {state.start_index}")


def rebuild_finished_exports(run: Run, state: RunState, log) -> None:
    """Finished stages: is each export complete? (rebuilt from the stage's end checkpoint when not)"""
    for stage, end in sorted(run.stage_ends.items()):
        if end <= state.micro_step:
            rebuilt = ensure_stage_export(run, stage, end, state.trainable, log)
            state.exports += [rebuilt] if rebuilt else []


def log_run_start(run: Run, state: RunState, log) -> None:
    """The run's shape in one line (mesh, parameters, rows, batch), then each stage's epochs."""
    cfg = run.cfg
    n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    n_total = n_trainable + sum(x.size for x in jax.tree.leaves(run.frozen))
    memory = device_memory()
    log(f"run {run.run_dir} | mesh {dict(run.mesh.shape)} | params trainable {n_trainable:,} / total {n_total:,} | "
        f"train rows {len(run.examples)} ({run.data_report}) | {run.layout.describe()} | "
        f"{run.micro_per_epoch} micro-batches per epoch"
        + (f" | memory per device {memory}" if memory else ""))
    for stage in sorted(run.stage_ends):
        epochs = [e for e in range(cfg.train.num_epochs) if stage_of_epoch(e, cfg.curriculum) == stage]
        log(f"  stage {stage}: epochs {epochs}")


def wrapped_order(order: np.ndarray, length: int) -> np.ndarray:
    """The epoch's order filled to `length` rows (whole micro-batches) by starting it over, as often as needed:
    the tail wraps to the first rows, and an epoch shorter than one micro-batch repeats itself."""
    return np.resize(order, length)


class EpochPlan:
    """One epoch's data: its seeded order (the tail wrapped to whole micro-batches), the micro-batches
    prepared from it and their loss denominators."""

    def __init__(self, run: Run, epoch: int):
        cfg, curriculum = run.cfg, run.cfg.curriculum
        self.run, self.epoch, self.stage = run, epoch, stage_of_epoch(epoch, curriculum)
        order = epoch_order(len(run.examples), cfg.seed, epoch)
        self.order = wrapped_order(order, run.micro_per_epoch * run.global_batch)
        self.reset_at = epoch // curriculum.epochs_per_stage * curriculum.epochs_per_stage * run.micro_per_epoch \
            if cfg.optim.reset_optimizer else 0  # the micro-step where the optimizer's count restarted

    def prepare(self, index: int) -> PreparedBatch:
        """The epoch's micro-batch `index`, collated and placed on its devices."""
        run = self.run
        rows = [run.examples[i] for i in self.order[index * run.global_batch : (index + 1) * run.global_batch]]
        features = [(*stage_tokens(ex, self.stage, run.cfg.curriculum, run.latent_cfg.latent_token_id, *run.markers),
                     ex.image) for ex in rows]
        try:
            return prepare_batch(features, run.latent_cfg, run.pad_id, run.cfg.data, run.rules, run.image_token_id,
                                 [ex.id for ex in rows])
        except ValueError as e:
            raise ValueError(f"epoch {self.epoch}, batch {index} (rows {[ex.id for ex in rows]}): {e}") from e

    def denominator(self, index: int) -> jax.Array:
        """The loss denominator of micro-batch `index` under token_mean (its optimizer window's supervised
        tokens / the window's micro-batches, `TokenWindows`); 1 under micro_batch_mean, which does not use it."""
        windows = self.run.token_windows
        return jnp.float32(windows.denominator(self.epoch * self.run.micro_per_epoch + index) if windows else 1.0)

    def learning_rate(self, micro_step: int) -> float:
        """The learning rate that micro-step `micro_step` (counted from 1) trained with: the schedule at the
        optimizer steps made since the last reset (a window skipped by --skip-batch made none)."""
        run = self.run
        window = (micro_step - 1 - self.reset_at) // run.accum
        skipped = sum(1 for m in run.skipped if self.reset_at < m <= self.reset_at + window * run.accum)
        return float(run.lr_at(window - skipped // run.accum))


@dataclasses.dataclass
class StopCheck:
    """Asked before each micro-step: has this call done `max_steps` (-> stop quietly), or was a stop
    requested by a signal (-> checkpoint, then `Preempted`)?"""
    max_steps: int | None
    preemption: PreemptionWatch

    def reached_max_steps(self, done_here: int) -> bool:
        return self.max_steps is not None and done_here >= self.max_steps


def train_epoch(run: Run, state: RunState, plan: EpochPlan, recorder: StepRecorder, stop: StopCheck) -> bool:
    """The epoch's micro-batches from the state's position (each prepared while the previous step runs),
    each recorded and checkpointed as configured. -> False when `max_steps` stopped this call; a signal
    stops it with a checkpoint of the boundary it stopped at (`stop_preempted`)."""
    maybe_reset_optimizer(run, state, plan.epoch)
    first = state.start_index if plan.epoch == state.start_epoch else 0
    upcoming = Lookahead(plan.prepare, first) if first < run.micro_per_epoch else None
    recorder.restart_clock()
    for index in range(first, run.micro_per_epoch):
        if stop.reached_max_steps(state.done_here):
            return False
        if stop.preemption.requested(state.micro_step):
            stop_preempted(run, state, recorder, plan.epoch, index)
        current = upcoming.result()  # raises here what preparing this micro-batch raised
        if state.micro_step + 1 in run.skipped:  # --skip-batch: its window's gradients dropped, nothing trained
            state.opt_state, metrics = discard_accumulation(state.opt_state), None
        else:
            metrics = run_step(run, state, current, plan.denominator(index))
            if ends_cut_window(run, state.micro_step + 1):
                metrics = apply_cut_window(run, state, metrics)
        if index + 1 < run.micro_per_epoch:  # the step runs asynchronously: prepare the next one meanwhile
            upcoming = Lookahead(plan.prepare, index + 1)
        state.micro_step += 1
        record_step(run, state, recorder, plan, index, current, metrics)
        save_periodic_checkpoint(run, state, recorder, plan.epoch, index)
    return True


def maybe_reset_optimizer(run: Run, state: RunState, epoch: int) -> None:
    """optim.reset_optimizer: a fresh optimizer state at each stage's first epoch (not when resuming in it)."""
    per_stage = run.cfg.curriculum.epochs_per_stage
    if run.cfg.optim.reset_optimizer and epoch % per_stage == 0 and epoch > 0 \
            and not (epoch == state.start_epoch and state.start_index > 0):
        state.opt_state = init_optimizer(run.tx, state.trainable, run.rules)


def ends_cut_window(run: Run, micro_step: int) -> bool:
    """`micro_step` (from 1) ends a stage that an optimizer reset follows, inside an accumulation window the
    reset cuts short (the stage's micro-batches are not a multiple of the accumulation)."""
    resets = optimizer_resets(run.cfg, run.micro_per_epoch)
    if run.accum == 1 or micro_step not in resets:
        return False
    start, end = optimizer_window(micro_step - 1, run.accum, resets, run.total_micro)
    return end - start < run.accum


def apply_cut_window(run: Run, state: RunState, metrics: dict) -> dict:
    """The window cut short by the coming reset applied now as one optimizer step (the reset would drop its
    gradients), before this micro-step is recorded or saved; its parameters' finiteness joins the step's
    `finite` metric. -> the metrics."""
    apply = make_cut_window_step(run.tx, state.trainable, state.opt_state, run.rules)
    state.trainable, state.opt_state, finite = apply(state.trainable, state.opt_state)
    return {**metrics, "finite": metrics["finite"] & finite}


def run_step(run: Run, state: RunState, current: PreparedBatch, denominator: jax.Array) -> dict:
    """One micro-batch through the jitted sharded step (made at the first one); its dropout key is
    derived from (seed, micro-step). -> the step's metrics (device arrays)."""
    state.compiled.add(current.signature)
    if state.train_step is None:
        state.train_step = make_train_step(
            run.graphdef, run.tx, run.step_cfg, rules=run.rules,
            shardings=step_shardings(state.trainable, run.frozen, state.opt_state, current.batch, run.rules))
    key = jax.random.fold_in(jax.random.key(run.cfg.seed), state.micro_step)
    state.trainable, state.opt_state, metrics = state.train_step(
        state.trainable, run.frozen, state.opt_state, current.batch, key, denominator, current.shapes)
    return metrics


def record_step(run: Run, state: RunState, recorder: StepRecorder, plan: EpochPlan, index: int,
                current: PreparedBatch, metrics: dict) -> None:
    """A finished micro-step: its metrics line and dashboard copies, the stop on a non-finite step, this
    call's tallies, the zero-gradient watch, the progress bar (or a log line). `metrics` None: a skipped
    micro-step (--skip-batch), recorded as {"micro_step", "epoch", "stage", "skipped": true}."""
    if metrics is None:  # no dashboard point: nothing was trained
        recorder.metrics_file.write(MetricsRecord.skipped_step(state.micro_step, plan.epoch, plan.stage).to_line())
        state.done_here += 1
        recorder.bar.update(1)
        recorder.lap()  # the next micro-step's throughput counts from here
        return
    loss, grad_norm, finite = float(metrics["loss"]), float(metrics["grad_norm"]), bool(metrics["finite"])
    tokens = int(metrics["tokens"])
    elapsed = recorder.lap()
    record = MetricsRecord(micro_step=state.micro_step, epoch=plan.epoch, stage=plan.stage, loss=loss,
                           grad_norm=grad_norm, tokens=tokens, tokens_per_s=tokens / elapsed,
                           latents=current.shapes.num_latents, compilations=len(state.compiled),
                           lr=plan.learning_rate(state.micro_step))
    recorder.write(record)
    if not finite:
        raise non_finite_error(run, state, plan, index, current, loss, grad_norm)
    state.done_here += 1
    state.losses.append(loss)
    recorder.zero_grads.update(grad_norm, state.micro_step, stage=plan.stage, epoch=plan.epoch)
    recorder.progress(record, run.total_micro)


def non_finite_error(run: Run, state: RunState, plan: EpochPlan, index: int, current: PreparedBatch, loss: float,
                     grad_norm: float) -> NonFiniteError:
    """The stop's one-line message: where, the checkpoints kept with the sizes that show whether they have
    diverged already, and the ways on (train.py's --allow-change, --resume-from, --skip-batch)."""
    ckpt_dir, step, metrics_file = run.folder.checkpoints, state.micro_step, run.folder.metrics_file
    window = optimizer_window(step - 1, run.accum, optimizer_resets(run.cfg, run.micro_per_epoch), run.total_micro)
    skip = f"micro-steps {window[0] + 1}-{window[1]}" if window[1] - window[0] > 1 else f"micro-step {step}"
    where = (f"non-finite training state at stage {plan.stage}, epoch {plan.epoch}, micro-step {step} (batch "
             f"{index} of the epoch, rows {current.row_ids}): loss {loss}, gradient norm {grad_norm}; nothing of "
             "this step was saved. ")
    if run.ckpt.latest_step() is None:
        return NonFiniteError(
            where + "No checkpoint was saved, so there is nothing to resume from: to start over, move the record "
            f"aside (mv {metrics_file} {metrics_file}.old) and re-run the same command with a lower "
            "learning rate: optim.lr=<lower> --allow-change optim.lr")
    return NonFiniteError(
        where + f"The last good checkpoint is step {run.ckpt.latest_step()} in {ckpt_dir}; checkpoints kept "
        f"({checkpoint_sizes(run)}): a huge gradient norm or parameter means that one has diverged already. "
        "To go on, re-run the same command with: optim.lr=<lower> --allow-change optim.lr (recorded in "
        f"{run.run_dir / CHANGES_FILE}); --resume-from <step> to go back to an older checkpoint (the later ones "
        f"are moved to {run.run_dir / 'set_aside'}, not deleted); --skip-batch {step} to leave the optimizer "
        f"step of {skip} untrained; or several of these")


def checkpoint_sizes(run: Run) -> str:
    """'step S: gradient norm G, largest parameter P; ...' for the checkpoints kept (G as metrics.jsonl
    records it at step S, P from the checkpoint's meta record; '?' where unknown)."""
    grad_norms = {r.micro_step: r.grad_norm for r in run.folder.read_metrics()[0]}
    size = lambda v: f"{v:.3g}" if isinstance(v, (int, float)) else "?"
    parts = []
    for step in run.ckpt.all_steps():
        meta = run.ckpt.read_meta(step) or {}
        parts.append(f"step {step}: gradient norm {size(grad_norms.get(step))}, "
                     f"largest parameter {size(meta.get('param_max_abs'))}")
    return "; ".join(parts)


def save_checkpoint(run: Run, state: RunState, recorder: StepRecorder, epoch: int, batch_index: int, *,
                    force: bool = False) -> None:
    """A checkpoint of the state at (epoch, batch_index), after metrics.jsonl is on disk (a resume trims the
    metrics to the checkpoint it restores, so they must hold every step it covers)."""
    recorder.metrics_file.sync()
    meta = {"epoch": epoch, "batch_index": batch_index, "micro_step": state.micro_step,
            "param_max_abs": float(largest_magnitude(state.trainable))}  # for the non-finite stop's message
    run.ckpt.save(state.micro_step, state.trainable, state.opt_state, meta, force=force)


def save_periodic_checkpoint(run: Run, state: RunState, recorder: StepRecorder, epoch: int, index: int) -> None:
    """A checkpoint every train.save_every_steps optimizer steps, at the end of an accumulation window."""
    every = run.cfg.train.save_every_steps
    if state.micro_step % run.accum == 0 and every and (state.micro_step // run.accum) % every == 0:
        save_checkpoint(run, state, recorder, epoch, index + 1)


def stop_preempted(run: Run, state: RunState, recorder: StepRecorder, epoch: int, index: int) -> NoReturn:
    """A signal asked to stop before batch `index` of `epoch`: save this micro-step (unless saved
    already: a periodic or stage-end save), wait until it is on disk, raise `Preempted`."""
    if run.ckpt.latest_step() != state.micro_step:
        save_checkpoint(run, state, recorder, epoch, index, force=True)
    run.ckpt.wait()
    raise Preempted(state.micro_step, run.folder.checkpoints)


def finish_stage(run: Run, state: RunState, recorder: StepRecorder, epoch: int, log) -> None:
    """A stage's last epoch is done: its end checkpoint (always kept) and its merged export."""
    stage = stage_of_epoch(epoch, run.cfg.curriculum)
    if run.ckpt.latest_step() != state.micro_step:
        save_checkpoint(run, state, recorder, epoch + 1, 0, force=True)
    state.exports.append(export_stage(run, stage, state.trainable))
    log(f"stage {stage} done at epoch {epoch}: loss {np.mean(state.losses[-run.micro_per_epoch:] or [np.nan]):.4f}, "
        f"exported {state.exports[-1]}, {len(state.compiled)} compilation(s) so far")


class StepRecorder:
    """Where each micro-step goes: metrics.jsonl (line-buffered; process 0), the TensorBoard / W&B copies
    (ivtlr_jax/events.py), the progress bar (or a log line every train.log_every micro-steps off a terminal)
    and the zero-gradient watch."""

    def __init__(self, run: Run, micro_step: int, log):
        from tqdm import tqdm

        self.log, self.log_every = log, run.cfg.train.log_every
        metrics_file = run.folder.metrics_file if distributed.is_writer() else os.devnull
        self.metrics_file = LineLog(metrics_file)  # synced at saves
        self.events = train_events(run.cfg, micro_step)
        self.zero_grads = ZeroGradientWatch(log)
        self.bar = tqdm(total=run.total_micro, initial=micro_step, desc="train", dynamic_ncols=True,
                        disable=None if distributed.is_writer() else True)
        self._tick = time.perf_counter()

    def restart_clock(self) -> None:
        self._tick = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the last lap (or restart): one micro-step's wall time."""
        now = time.perf_counter()
        elapsed, self._tick = now - self._tick, time.perf_counter()
        return elapsed

    def write(self, record: MetricsRecord) -> None:
        self.metrics_file.write(record.to_line())
        log_train_step(self.events, record)

    def progress(self, record: MetricsRecord, total: int) -> None:
        rate = f"{record.tokens_per_s:.0f}"
        self.bar.update(1)
        self.bar.set_postfix(stage=record.stage, loss=f"{record.loss:.3f}", tok_s=rate, compiles=record.compilations)
        if self.bar.disable and record.micro_step % self.log_every == 0:  # no progress bar off a terminal
            self.log(f"step {record.micro_step}/{total} epoch {record.epoch} stage {record.stage} "
                     f"loss {record.loss:.4f} tokens/s {rate} compilations {record.compilations}")

@dataclasses.dataclass
class PreparedBatch:
    """A collated micro-batch on its devices, with the step's static shapes."""
    batch: dict
    shapes: LatentShapes
    signature: tuple  # the array shapes and static shapes: one compilation each
    row_ids: list = dataclasses.field(default_factory=list)  # the examples' ids, for messages


def prepare_batch(features, latent_cfg: LatentConfig, pad_id: int, data_cfg, rules: ShardingRules,
                  image_token_id: int | None = None, row_ids=()) -> PreparedBatch:
    batch, shapes = collate_local(  # images decoded for this process's rows only (multihost.py)
        features, rules, latent_id=latent_cfg.latent_token_id, pad_id=pad_id, length_buckets=data_cfg.length_buckets,
        prefix_buckets=data_cfg.prefix_buckets, image_token_id=image_token_id,
        num_selected_patches=latent_cfg.num_selected_patches)
    signature = (tuple((k, v.shape) for k, v in sorted(batch.items())), shapes)
    return PreparedBatch(place_batch(batch, rules), shapes, signature, list(row_ids))


class Lookahead:
    """`fn(index)` called now; its result, or the error it raised, handed over by `result()` later (so an
    error surfaces where the micro-batch is used, after the previous step's metrics and checkpoint)."""

    def __init__(self, fn, index: int):
        try:
            self._value, self._error = fn(index), None
        except Exception as e:  # re-raised unchanged by result()
            self._value, self._error = None, e

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


def device_memory() -> str | None:
    """Memory in use / the limit of the first local device, or None where the backend does not say (CPU)."""
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
    if not stats or "bytes_limit" not in stats:
        return None
    return f"{stats.get('bytes_in_use', 0) / 2**30:.1f} / {stats['bytes_limit'] / 2**30:.1f} GiB in use"


EXPORT_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def export_problem(folder: Path) -> str | None:
    """Why a stage export is not complete (None when it is): config, weights whose tensors all fit the
    file, tokenizer and image-processor files."""
    if not folder.is_dir():
        return "missing"
    for name in EXPORT_FILES:
        if not (folder / name).is_file():
            return f"no {name}"
    try:
        json.loads((folder / "config.json").read_text())
        header, _ = read_header(folder / "model.safetensors")
    except FileNotFoundError:
        return "no model.safetensors"
    except (ValueError, OSError) as e:
        return f"unreadable ({' '.join(str(e).split())[:200]})"
    return None if header else "model.safetensors holds no tensors"


def ensure_stage_export(run: Run, stage: int, end_step: int, trainable, log) -> Path | None:
    """A finished stage's export, rebuilt from the stage's end checkpoint when missing or incomplete (a crash
    during the export). Returns the rebuilt folder, or None when it was complete or cannot be rebuilt."""
    out, ckpt = run.folder.stage_export(stage), run.ckpt
    problem = distributed.on_writer(lambda: export_problem(recover_swap(out)), "export_check")  # process 0's folder
    if problem is None:
        return None
    if end_step not in ckpt.all_steps():
        log(f"warning: the export of stage {stage} ({out}) is {problem}, and its end checkpoint (step {end_step}) "
            "is gone, so it cannot be rebuilt")
        return None
    log(f"the export of stage {stage} ({out}) is {problem}: rebuilding it from checkpoint step {end_step}")
    try:
        stage_trainable = distributed.agree(lambda: ckpt.restore_trainable(end_step, trainable), "restore")
    except Exception as e:  # a damaged stage-end checkpoint: training itself can still go on
        log(f"warning: checkpoint step {end_step} could not be read ({type(e).__name__}: {e}); the export of "
            f"stage {stage} is not rebuilt")
        return None
    return export_stage(run, stage, stage_trainable)


def export_stage(run: Run, stage: int, trainable) -> Path:
    """A merged (LoRA folded in) Hugging Face folder loadable by `from_pretrained` and transformers, with the
    settings `ivtlr-ask` and `ivtlr-serve` ask it with (ivtlr_settings.json: the run's dataset, K, patch order,
    RoPE, dtype), written atomically (a `.partial` folder renamed when complete; an old export replaced only
    then)."""
    out = run.folder.stage_export(stage)
    copy = lambda state: jax.tree.map(lambda x: x, state)
    model = merge_lora(nnx.merge(run.graphdef, copy(trainable), copy(run.frozen)))
    if not distributed.is_writer():  # process 0 writes; the others take part in gathering sharded tensors
        read_hf_tensors(model)
        return out
    with atomic_output_folder(out, replace=True) as tmp:
        write_hf_folder(model, tmp, run.processor)
        write_settings(tmp, InferenceSettings.from_run(run.cfg))
    return out
