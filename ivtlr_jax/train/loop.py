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
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from ..config import RunConfig, to_dict
from ..data import (CurriculumConfig, collate, epoch_order, load_examples, load_processor, special_token_ids,
                    stage_of_epoch, stage_tokens, shared_prefix_bound)
from ..data.tokenizer import save_processor
from ..latent import LatentConfig
from ..models import from_pretrained, read_config, resolve_folder
from ..models.common.sharding import ShardingRules, make_mesh, state_shardings
from ..models.export import save_hf
from ..models.qwen2vl.modeling import uniform_frame_len
from .checkpoint import TrainCheckpointer
from .lora import LoRAConfig, add_lora, merge_lora, trainable_filter
from .optim import make_optimizer
from .step import StepConfig, batch_shardings, init_optimizer, make_train_step, split_trainable, step_shardings
from .vocab import LATENT_TOKENS, resize_vocab

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FAMILY_OF = {"qwen2_vl": "qwen2vl", "chameleon": "chameleon"}


class RunFolderError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    exports: list[Path]
    losses: list[float]


def maybe_init_distributed() -> None:
    """Multi-host: initialise when the environment names a coordinator (or a cluster JAX detects)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()


def prepare_run_folder(cfg: RunConfig) -> Path:
    """The run folder holds config.yaml, metrics.jsonl, checkpoints/ and exports. An existing folder is
    resumed only if it was started with the same configuration; anything else is refused."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    current = yaml.safe_dump(to_dict(cfg), sort_keys=True)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not saved.exists():
            raise RunFolderError(f"output folder {run_dir} is not empty and is not a run folder; choose another name")
        if saved.read_text() != current:
            raise RunFolderError(f"output folder {run_dir} holds a run with a different configuration "
                                 f"(see {saved}); choose another name or restore that configuration")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(current)
    return run_dir


def add_latent_tokens(model, processor) -> dict:
    """REFERENCE 2: add the three tokens to the tokenizer (if missing), resize the embedding and LM
    head to len(tokenizer), and set the new tokens' LM-head rows to the row of `<<`."""
    tok = getattr(processor, "tokenizer", processor)
    added = tok.add_tokens(list(LATENT_TOKENS))
    ids = special_token_ids(processor)
    new_ids = [ids["start_latent_id"], ids["end_latent_id"], ids["latent_id"]]
    copy_from = tok.convert_tokens_to_ids("<<")
    if ids["vocab_size"] != model.config.vocab_size or added:
        if copy_from is None or copy_from == tok.unk_token_id:
            raise ValueError("the tokenizer has no '<<' token to initialise the latent tokens' LM-head rows from")
        resize_vocab(model, ids["vocab_size"], new_ids, copy_from)
    return ids


def train(cfg: RunConfig, *, max_steps: int | None = None, log=print) -> TrainResult:
    """Run (or resume) training. `max_steps`: stop after this many micro-batches in this call (used to
    simulate an interrupted run)."""
    maybe_init_distributed()
    run_dir = prepare_run_folder(cfg)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = ShardingRules(mesh)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = cfg.train.batch_size_training * replicas

    folder = resolve_folder(cfg.model.model_id)
    family_obj, _, _ = read_config(folder)
    family = FAMILY_OF[family_obj.config_cls.model_type]
    processor = load_processor(folder)
    lora_cfg = LoRAConfig(cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    param_dtype = DTYPES[cfg.model.param_dtype] if cfg.lora.enabled else jnp.float32  # trainable weights in fp32
    model = from_pretrained(folder, dtype=DTYPES[cfg.model.dtype], param_dtype=param_dtype, remat=cfg.model.remat,
                            rules=rules, scan_layers=cfg.model.scan_layers)
    ids = add_latent_tokens(model, processor)
    if lora_cfg.enabled:
        add_lora(model, lora_cfg, seed=cfg.seed)
    latent_cfg = LatentConfig(ids["latent_id"], cfg.latent.num_selected_patches, cfg.latent.patch_order,
                              cfg.latent.latent_grad, cfg.latent.rope, cfg.latent.ce_chunk)
    pad_id = ids["eos_token_id"]  # REFERENCE 2: pad = EOS

    examples, report = load_examples(cfg.data.dataset, cfg.data.source, cfg.data.train_split, processor, family,
                                     max_length=cfg.data.max_length, limit=cfg.data.limit)
    if not examples:
        raise ValueError(f"no usable training rows in {cfg.data.source} ({report})")
    curriculum = CurriculumConfig(cfg.curriculum.epochs_per_stage, cfg.curriculum.max_latent_stage,
                                  cfg.curriculum.pad_latent_to_max)
    micro_per_epoch = math.ceil(len(examples) / global_batch)
    accum = cfg.optim.gradient_accumulation_steps
    opt_per_epoch = max(micro_per_epoch // accum, 1)
    tx = make_optimizer(cfg.optim, opt_per_epoch * cfg.train.num_epochs, opt_per_epoch * curriculum.epochs_per_stage)

    graphdef, trainable, frozen = split_trainable(model, trainable_filter(lora_cfg))
    trainable = jax.device_put(trainable, state_shardings(trainable, rules))
    opt_state = init_optimizer(tx, trainable, rules)
    step_cfg = StepConfig(latent_cfg, cfg.train.batch_size_training, cfg.optim.loss_scale)

    ckpt = TrainCheckpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    start_epoch, start_index, micro_step = 0, 0, 0
    latest = ckpt.latest_step()
    if latest is not None:
        trainable, opt_state, meta = ckpt.restore(latest, trainable, opt_state)
        start_epoch, start_index, micro_step = meta["epoch"], meta["batch_index"], meta["micro_step"]
        log(f"resumed from {run_dir / 'checkpoints'} step {latest}: epoch {start_epoch}, batch {start_index}")

    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_total = n_trainable + sum(x.size for x in jax.tree.leaves(frozen))
    log(f"run {run_dir} | mesh {dict(mesh.shape)} | params trainable {n_trainable:,} / total {n_total:,} | "
        f"train rows {len(examples)} ({report}) | global batch {global_batch} x accumulation {accum} | "
        f"{micro_per_epoch} micro-batches per epoch | memory per device {device_memory()}")
    for stage in sorted({stage_of_epoch(e, curriculum) for e in range(cfg.train.num_epochs)}):
        epochs = [e for e in range(cfg.train.num_epochs) if stage_of_epoch(e, curriculum) == stage]
        log(f"  stage {stage}: epochs {epochs}")

    steps_cache: dict = {}
    compiled: set = set()
    base_key = jax.random.key(cfg.seed)
    metrics_file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: readable while training
    losses, exports = [], []
    done_here = 0
    try:
        from tqdm import tqdm

        total_micro = micro_per_epoch * cfg.train.num_epochs
        bar = tqdm(total=total_micro, initial=micro_step, desc="train", dynamic_ncols=True, disable=None)
        for epoch in range(start_epoch, cfg.train.num_epochs):
            stage = stage_of_epoch(epoch, curriculum)
            if cfg.optim.reset_optimizer and epoch % curriculum.epochs_per_stage == 0 and epoch > 0 \
                    and not (epoch == start_epoch and start_index > 0):
                opt_state = init_optimizer(tx, trainable, rules)
            order = epoch_order(len(examples), cfg.seed, epoch)
            order = np.concatenate([order, order[: micro_per_epoch * global_batch - len(order)]])  # wrap the tail
            window_tokens = accumulation_window_tokens(examples, order, stage, curriculum, latent_cfg.latent_token_id,
                                                       global_batch, accum)
            first = start_index if epoch == start_epoch else 0

            def prepare(index: int) -> PreparedBatch:
                rows = [examples[i] for i in order[index * global_batch : (index + 1) * global_batch]]
                features = [(*stage_tokens(ex, stage, curriculum, latent_cfg.latent_token_id), ex.image) for ex in rows]
                return prepare_batch(features, latent_cfg.latent_token_id, pad_id, cfg.data, rules)

            upcoming = Lookahead(prepare, first) if first < micro_per_epoch else None
            tick = time.perf_counter()
            for index in range(first, micro_per_epoch):
                if max_steps is not None and done_here >= max_steps:
                    return TrainResult(run_dir, micro_step, exports, losses)
                current = upcoming.result()  # raises here what preparing this micro-batch raised
                batch, n = current.batch, current.static[0]
                compiled.add(current.signature)
                if "sharded" not in steps_cache:
                    steps_cache["sharded"] = make_train_step(
                        graphdef, tx, step_cfg, rules=rules,
                        shardings=step_shardings(trainable, frozen, opt_state, batch, rules))
                denominator = jnp.float32(max(window_tokens[index // accum] / accum, 1.0))
                key = jax.random.fold_in(base_key, micro_step)
                trainable, opt_state, m = steps_cache["sharded"](trainable, frozen, opt_state, batch, key, denominator,
                                                                 *current.static)
                if index + 1 < micro_per_epoch:  # the step runs asynchronously: prepare the next one meanwhile
                    upcoming = Lookahead(prepare, index + 1)
                micro_step += 1
                done_here += 1
                loss = float(m["loss"])
                losses.append(loss)
                tokens = int(m["tokens"])
                elapsed = time.perf_counter() - tick
                tick = time.perf_counter()
                record = {"micro_step": micro_step, "epoch": epoch, "stage": stage, "loss": loss,
                          "grad_norm": float(m["grad_norm"]), "tokens": tokens, "tokens_per_s": tokens / elapsed,
                          "latents": n, "compilations": len(compiled)}
                metrics_file.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:.0f}",
                                compiles=len(compiled))
                if bar.disable and micro_step % cfg.train.log_every == 0:  # no progress bar off a terminal
                    log(f"step {micro_step}/{total_micro} epoch {epoch} stage {stage} loss {loss:.4f} "
                        f"tokens/s {tokens / elapsed:.0f} compilations {len(compiled)}")
                opt_step_done = micro_step % accum == 0
                every = cfg.train.save_every_steps
                if opt_step_done and every and (micro_step // accum) % every == 0:
                    ckpt.save(micro_step, trainable, opt_state,
                              {"epoch": epoch, "batch_index": index + 1, "micro_step": micro_step})
            stage_ends = (epoch + 1) % curriculum.epochs_per_stage == 0 or epoch + 1 == cfg.train.num_epochs
            if stage_ends:
                if ckpt.latest_step() != micro_step:
                    ckpt.save(micro_step, trainable, opt_state,
                              {"epoch": epoch + 1, "batch_index": 0, "micro_step": micro_step}, force=True)
                exports.append(export_stage(run_dir, stage, graphdef, trainable, frozen, processor))
                log(f"stage {stage} done at epoch {epoch}: loss {np.mean(losses[-micro_per_epoch:]):.4f}, "
                    f"exported {exports[-1]}, {len(compiled)} compilation(s) so far")
        bar.close()
    finally:
        metrics_file.close()
        ckpt.close()
    return TrainResult(run_dir, micro_step, exports, losses)


@dataclasses.dataclass
class PreparedBatch:
    """A collated micro-batch on its devices, with the step's static arguments."""
    batch: dict
    static: tuple  # (num_latents, prefix_len, frame_len, shared_prefix)
    signature: tuple  # the shapes and static arguments: one compilation each


def prepare_batch(features, latent_id: int, pad_id: int, data_cfg, rules: ShardingRules) -> PreparedBatch:
    batch, n, prefix_len = collate(features, latent_id=latent_id, pad_id=pad_id,
                                   length_buckets=data_cfg.length_buckets, prefix_buckets=data_cfg.prefix_buckets)
    frame_len = uniform_frame_len(batch["image_grid_thw"]) if "image_grid_thw" in batch else None
    shared = shared_prefix_bound(prefix_len, data_cfg.prefix_buckets) if n else 0
    signature = (tuple((k, v.shape) for k, v in sorted(batch.items())), n, prefix_len, frame_len)
    return PreparedBatch(jax.device_put(batch, batch_shardings(batch, rules)), (n, prefix_len, frame_len, shared),
                         signature)


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


def accumulation_window_tokens(examples, order, stage, curriculum, latent_id, global_batch, accum) -> list[int]:
    """Supervised tokens of each accumulation window of the epoch (for optim.loss_scale=token_mean: the
    loss of a window is its summed token losses over its token count)."""
    per_example = {}
    for i in set(order.tolist()):
        labels = stage_tokens(examples[i], stage, curriculum, latent_id)[1]
        per_example[i] = sum(1 for t in labels if t != -100)
    per_batch = [sum(per_example[i] for i in order[b : b + global_batch]) for b in range(0, len(order), global_batch)]
    return [sum(per_batch[w : w + accum]) for w in range(0, len(per_batch), accum)]


def device_memory() -> str:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if not stats or "bytes_limit" not in stats:
        return "unknown"
    return f"{stats.get('bytes_in_use', 0) / 2**30:.1f} / {stats['bytes_limit'] / 2**30:.1f} GiB in use"


def export_stage(run_dir: Path, stage: int, graphdef, trainable, frozen, processor) -> Path:
    """A merged (LoRA folded in) Hugging Face folder loadable by `from_pretrained` and transformers."""
    out = run_dir / f"stage_{stage}"
    if out.exists():
        shutil.rmtree(out)
    copy = lambda state: jax.tree.map(lambda x: x, state)
    model = merge_lora(nnx.merge(graphdef, copy(trainable), copy(frozen)))
    save_hf(model, out)
    save_processor(processor, out)
    return out
