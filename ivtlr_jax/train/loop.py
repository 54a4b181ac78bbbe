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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from .. import distributed
from ..build import build_model
from ..config import ConfigError, RunConfig, differing_keys, to_dict
from ..data import LatentShapes, epoch_order, load_examples, stage_of_epoch, stage_tokens
from ..io.atomic import atomic_output_folder, recover_swap, write_atomic
from ..io.durable import LineLog
from ..io.hf_export import write_hf_folder
from ..io.safetensors import read_header
from ..latent import LatentConfig
from ..models.common.lora import merge_lora, trainable_filter
from ..models.common.sharding import ShardingRules, make_mesh, state_shardings
from .checkpoint import TrainCheckpointer
from .cleanup import close_all
from .events import check_backends, log_train_step, train_events
from .multihost import collate_local, place_batch, read_hf_tensors
from .optim import learning_rate, make_optimizer
from .step import StepConfig, init_optimizer, make_train_step, split_trainable, step_shardings

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


def check_run_folder(cfg: RunConfig) -> Path:
    """Refuse, before anything is loaded or written, a folder that is not this run's: one with other
    content, or a run of a different configuration (the error names the keys that differ). Keys of
    `RESUME_NEUTRAL_KEYS` (where the folder is, logging) do not count. Writes nothing."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return run_dir
    if not saved.exists():
        raise RunFolderError(f"output folder {run_dir} is not empty and is not a run folder; choose another name")
    diff = differing_keys(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
    if diff:
        keys = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in diff.items())
        raise RunFolderError(f"output folder {run_dir} holds a run with a different configuration ({keys}); "
                             f"choose another name or restore those values (see {saved})")
    return run_dir


def write_run_config(cfg: RunConfig) -> None:
    """config.yaml, written once the model and data have loaded (a failed start leaves no trace)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(cfg.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=True))


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


def train(cfg: RunConfig, *, max_steps: int | None = None, log=print) -> TrainResult:
    """Run (or resume) training. `max_steps`: stop after this many micro-batches in this call (used to
    simulate an interrupted run)."""
    maybe_init_distributed()
    log = log if distributed.is_writer() else (lambda *_: None)  # process 0 speaks for the run

    def check_start() -> Path:
        run_dir = check_run_folder(cfg)
        check_backends(cfg.log)  # TensorBoard / W&B packages present (train/events.py)
        return run_dir

    run_dir = distributed.agree(check_start, "run_folder")  # every process checks; all stop
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = ShardingRules(mesh)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = cfg.train.batch_size_training * replicas

    built = build_model(cfg, rules=rules)
    model, processor, ids, family = built.model, built.processor, built.ids, built.family.name
    latent_cfg = cfg.latent.latent_config(ids["latent_id"])
    pad_id = ids["eos_token_id"]  # docs/method.md section 3: pad = EOS
    image_token_id = model.config.image_token_id
    markers = (ids["start_latent_id"], ids["end_latent_id"])  # used when curriculum.use_latent_markers

    curriculum = cfg.curriculum

    def load_and_check():
        examples, report = load_examples(cfg.data.dataset, cfg.data.source, cfg.data.train_split, processor, family,
                                         max_length=cfg.data.max_length, limit=cfg.data.limit)
        if not examples:
            raise ValueError(f"no usable training rows in {cfg.data.source} ({report})")
        if curriculum.max_latent_stage and cfg.train.num_epochs > curriculum.epochs_per_stage:  # a stage with latents
            check_patch_budget(examples, image_token_id, latent_cfg.num_selected_patches,
                               f"{cfg.data.source} ({cfg.data.train_split})")
        return examples, report

    examples, report = distributed.agree(load_and_check, "examples")  # every process loaded, or all stop here
    if distributed.is_writer():
        write_run_config(cfg)  # the model and the data loaded: from here on this folder is this run's

    micro_per_epoch = math.ceil(len(examples) / global_batch)
    total_micro = micro_per_epoch * cfg.train.num_epochs
    accum = cfg.optim.gradient_accumulation_steps
    opt_per_epoch = max(micro_per_epoch // accum, 1)
    schedule_steps = (opt_per_epoch * cfg.train.num_epochs, opt_per_epoch * curriculum.epochs_per_stage)
    tx = make_optimizer(cfg.optim, *schedule_steps)
    lr_at = learning_rate(cfg.optim, *schedule_steps)  # of an optimizer step (as counted since the last reset)

    graphdef, trainable, frozen = split_trainable(model, trainable_filter(cfg.lora))
    trainable = jax.device_put(trainable, state_shardings(trainable, rules))
    opt_state = init_optimizer(tx, trainable, rules)
    step_cfg = StepConfig(latent_cfg, cfg.train.batch_size_training, cfg.optim.loss_scale)

    stage_ends = stage_end_steps(cfg.train.num_epochs, micro_per_epoch, curriculum)
    ckpt = TrainCheckpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                             preserve=tuple(stage_ends.values()))
    start_epoch, start_index, micro_step = 0, 0, 0
    restored = ckpt.restore_latest(trainable, opt_state, log=log, required_meta=("epoch", "batch_index", "micro_step"))
    if restored is not None:
        latest, trainable, opt_state, meta = restored
        start_epoch, start_index, micro_step = meta["epoch"], meta["batch_index"], meta["micro_step"]
        if start_index >= micro_per_epoch:  # saved after an epoch's last batch: the next epoch begins
            start_epoch, start_index = start_epoch + 1, 0
        log(f"resumed from {run_dir / 'checkpoints'} step {latest}: epoch {start_epoch}, batch {start_index}")
    metrics_path = run_dir / "metrics.jsonl"
    if distributed.is_writer():
        trim_metrics(metrics_path, micro_step)

    exports = []
    for stage, end in sorted(stage_ends.items()):  # finished stages: is each export complete?
        if end <= micro_step:
            rebuilt = ensure_stage_export(run_dir, stage, end, ckpt, graphdef, trainable, frozen, processor, log)
            exports += [rebuilt] if rebuilt else []

    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_total = n_trainable + sum(x.size for x in jax.tree.leaves(frozen))
    memory = device_memory()
    log(f"run {run_dir} | mesh {dict(mesh.shape)} | params trainable {n_trainable:,} / total {n_total:,} | "
        f"train rows {len(examples)} ({report}) | global batch {global_batch} x accumulation {accum} | "
        f"{micro_per_epoch} micro-batches per epoch" + (f" | memory per device {memory}" if memory else ""))
    for stage in sorted(stage_ends):
        epochs = [e for e in range(cfg.train.num_epochs) if stage_of_epoch(e, curriculum) == stage]
        log(f"  stage {stage}: epochs {epochs}")

    steps_cache: dict = {}
    compiled: set = set()
    base_key = jax.random.key(cfg.seed)
    metrics_file = LineLog(metrics_path if distributed.is_writer() else os.devnull)  # synced at each save
    events = train_events(cfg, micro_step, metrics_path)  # TensorBoard / W&B copies (train/events.py; process 0)
    losses = []
    done_here = 0
    zero_grads = ZeroGradientWatch(log)
    result = lambda: TrainResult(run_dir, micro_step, exports, losses, done_here, total_micro)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_micro, initial=micro_step, desc="train", dynamic_ncols=True,
                   disable=None if distributed.is_writer() else True)
        for epoch in range(start_epoch, cfg.train.num_epochs):
            stage = stage_of_epoch(epoch, curriculum)
            if cfg.optim.reset_optimizer and epoch % curriculum.epochs_per_stage == 0 and epoch > 0 \
                    and not (epoch == start_epoch and start_index > 0):
                opt_state = init_optimizer(tx, trainable, rules)
            order = epoch_order(len(examples), cfg.seed, epoch)
            order = np.concatenate([order, order[: micro_per_epoch * global_batch - len(order)]])  # wrap the tail
            window_tokens = accumulation_window_tokens(examples, order, stage, curriculum,
                                                       (latent_cfg.latent_token_id, *markers), global_batch, accum)
            first = start_index if epoch == start_epoch else 0
            reset_at = epoch // curriculum.epochs_per_stage * curriculum.epochs_per_stage * micro_per_epoch \
                if cfg.optim.reset_optimizer else 0  # the micro-step where the optimizer's count restarted

            def prepare(index: int) -> PreparedBatch:
                rows = [examples[i] for i in order[index * global_batch : (index + 1) * global_batch]]
                features = [(*stage_tokens(ex, stage, curriculum, latent_cfg.latent_token_id, *markers), ex.image)
                            for ex in rows]
                try:
                    return prepare_batch(features, latent_cfg, pad_id, cfg.data, rules, image_token_id,
                                         [ex.id for ex in rows])
                except ValueError as e:
                    raise ValueError(f"epoch {epoch}, batch {index} (rows {[ex.id for ex in rows]}): {e}") from e

            upcoming = Lookahead(prepare, first) if first < micro_per_epoch else None
            tick = time.perf_counter()
            for index in range(first, micro_per_epoch):
                if max_steps is not None and done_here >= max_steps:
                    return result()
                current = upcoming.result()  # raises here what preparing this micro-batch raised
                batch, n = current.batch, current.shapes.num_latents
                compiled.add(current.signature)
                if "sharded" not in steps_cache:
                    steps_cache["sharded"] = make_train_step(
                        graphdef, tx, step_cfg, rules=rules,
                        shardings=step_shardings(trainable, frozen, opt_state, batch, rules))
                denominator = jnp.float32(max(window_tokens[index // accum] / accum, 1.0))
                key = jax.random.fold_in(base_key, micro_step)
                trainable, opt_state, m = steps_cache["sharded"](trainable, frozen, opt_state, batch, key, denominator,
                                                                 current.shapes)
                if index + 1 < micro_per_epoch:  # the step runs asynchronously: prepare the next one meanwhile
                    upcoming = Lookahead(prepare, index + 1)
                micro_step += 1
                loss, grad_norm, finite = float(m["loss"]), float(m["grad_norm"]), bool(m["finite"])
                tokens = int(m["tokens"])
                elapsed = time.perf_counter() - tick
                tick = time.perf_counter()
                record = {"micro_step": micro_step, "epoch": epoch, "stage": stage, "loss": loss,
                          "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                          "latents": n, "compilations": len(compiled),
                          "lr": float(lr_at((micro_step - 1 - reset_at) // accum))}
                metrics_file.write(json_line(record))
                log_train_step(events, record)
                if not finite:
                    last = ckpt.latest_step()
                    raise NonFiniteError(
                        f"non-finite training state at stage {stage}, epoch {epoch}, micro-step {micro_step} "
                        f"(batch {index} of the epoch, rows {current.row_ids}): loss {loss}, gradient norm "
                        f"{grad_norm}; nothing of this step was saved. The last good checkpoint is "
                        + (f"step {last} in {run_dir / 'checkpoints'}" if last is not None else "none (no step saved)")
                        + "; lower optim.lr or check these rows, then re-run the same command to resume from it")
                done_here += 1
                losses.append(loss)
                zero_grads.update(grad_norm, micro_step, stage=stage, epoch=epoch)
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:.0f}",
                                compiles=len(compiled))
                if bar.disable and micro_step % cfg.train.log_every == 0:  # no progress bar off a terminal
                    log(f"step {micro_step}/{total_micro} epoch {epoch} stage {stage} loss {loss:.4f} "
                        f"tokens/s {tokens / elapsed:.0f} compilations {len(compiled)}")
                opt_step_done = micro_step % accum == 0
                every = cfg.train.save_every_steps
                if opt_step_done and every and (micro_step // accum) % every == 0:
                    metrics_file.sync()  # on disk before the checkpoint that a resume trims them to
                    ckpt.save(micro_step, trainable, opt_state,
                              {"epoch": epoch, "batch_index": index + 1, "micro_step": micro_step})
            if micro_step == stage_ends[stage]:
                if ckpt.latest_step() != micro_step:
                    metrics_file.sync()
                    ckpt.save(micro_step, trainable, opt_state,
                              {"epoch": epoch + 1, "batch_index": 0, "micro_step": micro_step}, force=True)
                exports.append(export_stage(run_dir, stage, graphdef, trainable, frozen, processor))
                log(f"stage {stage} done at epoch {epoch}: loss {np.mean(losses[-micro_per_epoch:] or [np.nan]):.4f}, "
                    f"exported {exports[-1]}, {len(compiled)} compilation(s) so far")
        bar.close()
    finally:  # every close runs (the checkpointer's awaits the save in flight); the first error is raised
        close_all(metrics_file.close, events.close, ckpt.close)
    return result()


def json_line(record: dict) -> str:
    """One strict-JSON line: NaN and infinities written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def trim_metrics(path: Path, micro_step: int) -> None:
    """Keep the records up to the restored `micro_step` (a resumed run re-logs the steps after it) and
    drop a torn last line; rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("micro_step") if isinstance(record, dict) else None
        if isinstance(step, int) and step <= micro_step:
            kept.append(json_line(record))
    write_atomic(path, "".join(kept))


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


def accumulation_window_tokens(examples, order, stage, curriculum, token_ids, global_batch, accum) -> list[int]:
    """Supervised tokens of each accumulation window of the epoch (for optim.loss_scale=token_mean: the
    loss of a window is its summed token losses over its token count). token_ids: (latent, start, end)."""
    per_example = {}
    for i in set(order.tolist()):
        labels = stage_tokens(examples[i], stage, curriculum, *token_ids)[1]
        per_example[i] = sum(1 for t in labels if t != -100)
    per_batch = [sum(per_example[i] for i in order[b : b + global_batch]) for b in range(0, len(order), global_batch)]
    return [sum(per_batch[w : w + accum]) for w in range(0, len(per_batch), accum)]


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


def ensure_stage_export(run_dir: Path, stage: int, end_step: int, ckpt: TrainCheckpointer, graphdef, trainable,
                        frozen, processor, log) -> Path | None:
    """A finished stage's export, rebuilt from the stage's end checkpoint when missing or incomplete (a crash
    during the export). Returns the rebuilt folder, or None when it was complete or cannot be rebuilt."""
    out = run_dir / f"stage_{stage}"
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
    return export_stage(run_dir, stage, graphdef, stage_trainable, frozen, processor)


def export_stage(run_dir: Path, stage: int, graphdef, trainable, frozen, processor) -> Path:
    """A merged (LoRA folded in) Hugging Face folder loadable by `from_pretrained` and transformers,
    written atomically (a `.partial` folder renamed when complete; an old export replaced only then)."""
    out = run_dir / f"stage_{stage}"
    copy = lambda state: jax.tree.map(lambda x: x, state)
    model = merge_lora(nnx.merge(graphdef, copy(trainable), copy(frozen)))
    if not distributed.is_writer():  # process 0 writes; the others take part in gathering sharded tensors
        read_hf_tensors(model)
        return out
    with atomic_output_folder(out, replace=True) as tmp:
        write_hf_folder(model, tmp, processor)
    return out
