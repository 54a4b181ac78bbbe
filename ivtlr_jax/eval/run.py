"""Evaluation of a model folder on M3CoT / ScienceQA: batched jitted generation, scoring
(docs/method.md section 18), one JSON line per example, a summary, optional pictures of the selected patches.

Prompts are `question + <|latent|> x num_latents` in the training format (the default; docs/method.md section 17),
left-padded to a length bucket so that batches compile once per bucket.

- Batching (`EvalConfig.batching`): "continuous" keeps `batch_size` rows decoding and gives a finished
  row's slot to the next example (ivtlr_jax/continuous.py; each prompt padded to its own bucket, the
  prompts of a bucket started `batch_size` at a time); "static" runs batches of `batch_size` prompts
  padded to the batch's bucket, each until its longest answer ends, and splits them over devices and
  processes. "auto" (the default): continuous on one device in one process, else static. Either way a
  record is the one a batch of one writes, up to rounding (as with any batch size; in float32 the
  tests find them equal), and records are written in the examples' order.
- Precision: the model runs in `EvalConfig.dtype` (the run config's `model.dtype`; the official
  evaluation uses bfloat16) with its weights stored in `param_dtype` (default: the same).
- Devices: each batch's rows are split over the local devices (a 1-D `data` mesh, parameters
  replicated); a short batch is filled with copies of its last row, whose outputs are dropped. Rows
  are independent, so in float32 the records equal a one-device run's (`EvalConfig.devices=1`); in
  bfloat16 they match up to rounding, which varies with the rows per device as with any batch size.
- Processes (hosts; `ivtlr_jax.distributed`): each process evaluates its contiguous share of every
  batch on its own devices (prompts padded to the whole batch's bucket, so every row sees what it
  would in one process), process 0 gathers the records, writes them in order, the setup and the summary.
- Resuming: the setup (model folder, a fingerprint of its weights and tokenizer files, data, prompt
  format, latents, K, patch order, RoPE, dtypes, sampling, limit) is written beside the output before
  the first record (`setup_path`: eval_test.jsonl -> eval_test.setup.json). Re-running with the same
  output skips the examples already written when the setup is the same, and refuses (naming the
  differing keys) when it is not. A torn last line (a crash mid-write) is cut off and its example
  redone. The summary counts skipped rows by reason (no image, ..., already done).
- One evaluation per output: `<out>.lock` is held while it runs (io/lock.py); the records are fsynced
  after each static batch and before the summary, which is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import distributed
from ..data import load_examples, load_processor, materialize, special_token_ids
from ..data.examples import fewest_image_tokens
from ..data.collate import left_padded_positions, smallest_bucket, stack_images
from ..continuous import generate_continuous
from ..generate import SamplingConfig, ivtlr_generate
from ..latent import LatentConfig
from ..models.common.attention import ATTENTION_IMPLS
from ..models.common.layers import DTYPES
from ..io import from_pretrained, resolve_folder
from ..io.atomic import write_atomic
from ..io.durable import LineLog
from ..io.lock import output_lock
from ..models import ShardingRules, family_named, make_mesh, read_config
from ..events import STAGE_FOLDER, log_evaluation
from ..models.common.sharding import batch_shardings
from .scoring import m3cot_official_correct, m3cot_strict_prediction, scienceqa_prediction
from .viz import draw_selection

SETUP_VERSION = 1
# setup keys that describe but do not decide: the weights' fingerprint identifies the model, so a
# moved or copied folder still resumes
INFORMATIVE_KEYS = ("model",)
BATCHINGS = ("auto", "static", "continuous")
# prompt lengths evaluation pads to (left), so that batches compile once per bucket; also the Predictor's
EVAL_LENGTH_BUCKETS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


class EvalSetupError(ValueError):
    """An output file that cannot be resumed with this setup (or cannot be read)."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    dataset: str
    source: str
    split: str = "test"
    num_latents: int = 3
    num_selected_patches: int = 32
    patch_order: str = "score"
    rope: str = "1d"
    batch_size: int = 8  # rows per batch over all devices (rounded up to a multiple of the device count)
    max_new_tokens: int = 512
    limit: int | None = None
    length_buckets: tuple[int, ...] = EVAL_LENGTH_BUCKETS
    scan_layers: bool = True  # see DecoderLM
    attention_impl: str = "xla"  # see DecoderLM: xla | fused
    prompt_format: str = "train"  # or "official": the official evaluation scripts' prompts (data.load_examples)
    dtype: str = "bfloat16"  # compute dtype (docs/method.md section 16: the official evaluation runs in bfloat16)
    param_dtype: str | None = None  # storage dtype of the weights (None: dtype)
    devices: int | None = None  # local devices to split each batch's rows over (None: all)
    batching: str = "auto"  # one of BATCHINGS (module docstring)

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"eval config: {name}={value!r} is not supported; choose from {list(DTYPES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"eval config: attention_impl={self.attention_impl!r} is not supported; choose from "
                             f"{list(ATTENTION_IMPLS)}")
        if self.devices is not None and self.devices < 1:
            raise ValueError(f"eval config: devices={self.devices}; must be >= 1 (or None for all local devices)")
        if self.batch_size < 1:
            raise ValueError(f"eval config: batch_size={self.batch_size}; must be >= 1")
        if self.batching not in BATCHINGS:
            raise ValueError(f"eval config: batching={self.batching!r} is not supported; choose from {list(BATCHINGS)}")

    @property
    def storage_dtype(self) -> str:
        return self.param_dtype or self.dtype


def eval_config_from_run(cfg, **overrides) -> EvalConfig:
    """An EvalConfig from a run configuration (`config.RunConfig`): its data, latent settings, layer
    scanning and dtypes (`model.dtype`, `model.param_dtype`); `overrides` replace any field."""
    base = dict(dataset=cfg.data.dataset, source=cfg.data.source, split=cfg.data.eval_split,
                num_selected_patches=cfg.latent.num_selected_patches, patch_order=cfg.latent.patch_order,
                rope=cfg.latent.rope, scan_layers=cfg.model.scan_layers, attention_impl=cfg.model.attention_impl,
                dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    base.update(overrides)
    return EvalConfig(**base)


def left_pad(prompts: list[list[int]], pad_id: int, buckets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts to a length bucket: (input_ids, attention_mask, position_ids)."""
    longest = max(map(len, prompts))
    length = smallest_bucket(longest, buckets) or longest
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    return ids, mask, left_padded_positions(mask)


# ---- the setup an output belongs to --------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".msgpack")
SETUP_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
               "ivtlr_jax.json")
SMALL_FILE = 8 << 20  # files up to this size are hashed whole
SAMPLE = 256  # bytes read at each sampled place
SAMPLES_PER_FILE = 256  # evenly spaced samples of a large file that is not safetensors


def weights_fingerprint(folder: Path) -> str:
    """A sha256 over the model folder's weight, config and tokenizer files, cheap at any size: small
    files whole; a safetensors file's size, header (every tensor's name, dtype, shape and offsets) and
    the first, middle and last 256 bytes of every tensor; any other large file (e.g. orbax data) its
    size and 256 evenly spaced samples. A fine-tuned or merged model changes every tensor it trains,
    so a sample of every tensor tells stage exports apart; a full hash of a 7B model would read 15 GB."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (
        p.name in SETUP_FILES or p.suffix in WEIGHT_SUFFIXES or "flax_params" in p.relative_to(folder).parts))
    if not any(p.suffix in WEIGHT_SUFFIXES or "flax_params" in p.relative_to(folder).parts for p in files):
        raise EvalSetupError(f"{folder}: no weight files (*.safetensors or flax_params/) to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= SMALL_FILE:
                digest.update(f.read())
            elif path.suffix == ".safetensors":
                _safetensors_samples(f, size, digest, path)
            else:
                for offset in np.linspace(0, max(size - SAMPLE, 0), SAMPLES_PER_FILE).astype(np.int64):
                    f.seek(int(offset))
                    digest.update(f.read(SAMPLE))
    return digest.hexdigest()


def _safetensors_samples(f, size: int, digest, path: Path) -> None:
    head = f.read(8)
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise EvalSetupError(f"{path}: not a safetensors file (header length {n} > file size {size})")
    header = f.read(n)
    digest.update(head + header)
    base = 8 + n
    for name, info in sorted(json.loads(header).items()):
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        for offset in sorted({start, max(start, (start + end) // 2 - SAMPLE // 2), max(start, end - SAMPLE)}):
            f.seek(base + offset)
            digest.update(f.read(min(SAMPLE, end - offset)))


def eval_setup(model_dir: Path, cfg: EvalConfig, sampling: SamplingConfig) -> dict:
    """What decides an output's records: two runs with equal setups write the same records."""
    source = Path(cfg.source)
    return {
        "version": SETUP_VERSION,
        "model": str(Path(model_dir).resolve()),
        "weights_fingerprint": weights_fingerprint(model_dir),
        "dataset": cfg.dataset,
        "source": str(source.resolve()) if source.exists() else cfg.source,
        "split": cfg.split,
        "prompt_format": cfg.prompt_format,
        "num_latents": cfg.num_latents,
        "num_selected_patches": cfg.num_selected_patches,
        "patch_order": cfg.patch_order,
        "rope": cfg.rope,
        "dtype": cfg.dtype,
        "param_dtype": cfg.storage_dtype,
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "limit": cfg.limit,
        # fused attention (cuDNN on GPU) rounds otherwise than the einsums in bf16; written only when chosen,
        # so the outputs of earlier setups (all "xla") still resume
        **({"attention_impl": cfg.attention_impl} if cfg.attention_impl != "xla" else {}),
    }


def default_output(checkpoint: str | Path, split: str) -> Path:
    """Where an evaluation writes unless told: beside a stage export `<run>/stage_<s>`, in `<run>/eval/stage_<s>/`
    (not inside the folder a re-export replaces); inside any other local folder; for a hub id under
    `evals/<owner>--<name>/` (a local folder `./<owner>/<name>` would shadow the hub id)."""
    path = Path(checkpoint)
    name = f"eval_{split}.jsonl"
    if path.is_dir():
        if STAGE_FOLDER.match(path.name) and (path.parent / "config.yaml").is_file():
            return path.parent / "eval" / path.name / name
        return path / name
    return Path("evals") / str(checkpoint).strip("/").replace("/", "--") / name


def setup_path(out_file: Path) -> Path:
    return Path(out_file).with_suffix(".setup.json")


def summary_path(out_file: Path) -> Path:
    return Path(out_file).with_suffix(".summary.json")


def setup_differences(recorded: dict, current: dict) -> list[str]:
    keys = sorted((set(recorded) | set(current)) - set(INFORMATIVE_KEYS))
    return [f"{k}: {recorded.get(k, '<absent>')!r} in the output, {current.get(k, '<absent>')!r} now"
            for k in keys if recorded.get(k, "<absent>") != current.get(k, "<absent>")]


def read_records(out_file: Path, log=print) -> list[dict]:
    """The records of an output file. A last line that is torn (not newline-terminated, or not JSON)
    is cut off the file (logged) so that its example is redone; any other bad line is an error naming
    the file and line."""
    data = Path(out_file).read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: b"" when the file ends with a newline
    records, keep, torn_line = [], 0, len(complete) + 1
    for number, raw in enumerate(complete, 1):
        if not raw.strip():
            keep += len(raw) + 1
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if number == len(complete) and not tail:  # the last line: torn
                tail, torn_line = raw, number
                break
            raise EvalSetupError(f"{out_file}, line {number}: not a JSON record ({err}); the file is damaged "
                                 f"(only a torn last line is repaired)") from None
        if not isinstance(record, dict) or "id" not in record:
            raise EvalSetupError(f"{out_file}, line {number}: a record without an 'id' key")
        records.append(record)
        keep += len(raw) + 1
    if tail:
        log(f"{out_file}: dropped a torn last line (line {torn_line}, {len(tail)} bytes, a run stopped "
            f"while writing it); its example is redone")
        os.truncate(out_file, keep)
    return records


def prepare_output(out_file: Path, setup: dict, example_ids: list[str], log=print) -> set[str]:
    """Check an existing output against `setup` (refusing another setup's output) or start a new one by
    writing the setup record; -> the ids already done."""
    record_file = setup_path(out_file)
    if out_file.exists() and out_file.stat().st_size > 0:
        if not record_file.exists():
            raise EvalSetupError(f"{out_file} holds results but has no setup record {record_file.name} beside it, so "
                                 f"the model and settings that made it are unknown; write to another output or "
                                 f"delete it")
        try:
            recorded = json.loads(record_file.read_text())
        except json.JSONDecodeError as err:
            raise EvalSetupError(f"{record_file}: not JSON ({err})") from None
        differences = setup_differences(recorded, setup)
        if differences:
            raise EvalSetupError(f"{out_file} was written with another setup ({record_file}); differing: "
                                 + "; ".join(differences) + ". Write to another output, or delete both files to "
                                 "start over")
        done = [r["id"] for r in read_records(out_file, log)]
        foreign = sorted(set(done) - set(example_ids))
        if foreign:
            raise EvalSetupError(f"{out_file}: {len(foreign)} record(s) are not examples of {setup['source']} "
                                 f"({setup['split']}) under this setup, e.g. {foreign[:3]}; the data changed")
        return set(done)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record_file, json.dumps(setup, indent=2) + "\n")
    out_file.write_text("")
    return set()


# ---- evaluation -----------------------------------------------------------------------------------------
def eval_mesh(devices: int | None):
    """A 1-D `data` mesh over the first `devices` local devices (all when None)."""
    local = jax.local_devices()
    count = len(local) if devices is None else devices
    if count > len(local):
        raise ValueError(f"eval config: devices={count} but only {len(local)} local devices: {local}")
    return make_mesh(data=count, devices=local[:count])


def evaluate(model_dir: str | Path, cfg: EvalConfig, out_file: str | Path, *, save_attention: str | Path | None = None,
             log=print, events=None) -> dict:
    """Evaluate `model_dir` into `out_file` (and its setup and summary beside it) -> the summary. `events`: a
    run config's `log` section; the summary (and a few pictures) also go to TensorBoard / W&B (by process
    0, which writes the output, the setup and the summary when several processes evaluate). The output is
    locked (`<out_file>.lock`, io/lock.py) before anything is loaded: a second evaluation into the same
    output is refused with OutputInUseError."""
    distributed.initialize()
    with output_lock(out_file, log=log if distributed.is_writer() else (lambda *_: None)):
        return evaluate_output(model_dir, cfg, Path(out_file), save_attention=save_attention, log=log, events=events)


def evaluate_output(model_dir: str | Path, cfg: EvalConfig, out_file: Path, *, save_attention: str | Path | None,
                    log, events) -> dict:
    """`evaluate` once the output is this process's."""
    writer, procs = distributed.is_writer(), distributed.process_count()
    log = log if writer else (lambda *_: None)
    mesh = eval_mesh(cfg.devices)
    rules = ShardingRules(mesh)
    n_dev = mesh.devices.size
    continuous = cfg.batching == "continuous" or (cfg.batching == "auto" and n_dev * procs == 1)
    if continuous and n_dev * procs > 1:
        raise ValueError(f"eval config: batching='continuous' runs on one device in one process; this run has "
                         f"{n_dev} device(s) in {procs} process(es): set devices=1 or batching='static'")
    rows = -(-cfg.batch_size // (n_dev * procs)) * n_dev * procs  # a multiple of every process's devices
    share = rows // procs
    mine = slice(distributed.process_index() * share, (distributed.process_index() + 1) * share)  # this process's
    model_dir = resolve_folder(model_dir)
    family_obj, _, _ = read_config(model_dir)
    family = family_obj.name
    processor = load_processor(model_dir)
    tok = getattr(processor, "tokenizer", processor)
    ids = special_token_ids(processor)
    latent = LatentConfig(ids["latent_id"], cfg.num_selected_patches, cfg.patch_order, rope=cfg.rope)
    sampling = SamplingConfig(cfg.max_new_tokens, eos_token_id=ids["eos_token_id"], pad_token_id=ids["eos_token_id"])

    examples, report = load_examples(cfg.dataset, cfg.source, cfg.split, processor, family, limit=cfg.limit,
                                     max_length=10**9, prompt_format=cfg.prompt_format)
    if examples and cfg.num_latents:
        fewest, row = fewest_image_tokens(examples, ids["image_token_id"])
        if fewest < cfg.num_selected_patches:
            raise EvalSetupError(f"latent.num_selected_patches={cfg.num_selected_patches} is larger than the {fewest} "
                                 f"image tokens of row {row!r} of {cfg.source} ({cfg.split}): each latent step "
                                 f"inserts K patches of the row's image; choose K <= {fewest}")

    def open_output() -> tuple[dict, list[str]]:  # process 0's output decides (setup check, examples done)
        setup = eval_setup(model_dir, cfg, sampling)
        return setup, sorted(prepare_output(out_file, setup, [ex.id for ex in examples], log))

    setup, done = distributed.on_writer(open_output, "eval_output", errors=(EvalSetupError,))
    finished = set(done)
    todo = [ex for ex in examples if ex.id not in finished]

    model = from_pretrained(model_dir, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.storage_dtype),
                            rules=rules, scan_layers=cfg.scan_layers, attention_impl=cfg.attention_impl)
    log(f"evaluating {model_dir} on {cfg.dataset}/{cfg.split} ({cfg.prompt_format} prompts, {cfg.dtype}): "
        f"{len(examples)} examples ({report}); {len(done)} already in {out_file}, {len(todo)} to do; "
        + (f"continuous batching, {rows} slots" if continuous else
           f"{rows} rows per batch over {n_dev * procs} device(s)" + (f" of {procs} processes" if procs > 1 else ""))
        + (f" (batch_size {cfg.batch_size} rounded up to a multiple of the devices)" if rows != cfg.batch_size else ""))
    if save_attention:  # each process draws its own rows
        Path(save_attention).mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    def record_line(ex, tokens: np.ndarray, length: int, selected: np.ndarray, image: dict) -> str:
        """The JSON line of an example; selected [n, K] indexes its unpadded prompt."""
        generated = tok.decode(tokens[:length], skip_special_tokens=True)
        prompt_text = tok.decode(ex.question_ids + ex.prompt_suffix, skip_special_tokens=True)
        record = score(cfg.dataset, ex, prompt_text, generated)
        steps = image_patches(ex.question_ids, model.config.image_token_id, selected)
        record.update(selected_patches=steps, generated_tokens=int(length))
        if save_attention:
            save_picture(ex, image, steps, family, Path(save_attention) / f"{ex.id}.png", record=record,
                         ranked=cfg.patch_order == "score", dataset=cfg.dataset, split=cfg.split)
        return json.dumps(record) + "\n"

    def prompt_of(ex) -> list[int]:
        return ex.question_ids + [latent.latent_token_id] * cfg.num_latents + ex.prompt_suffix

    start = time.perf_counter()
    gen_tokens = 0
    with LineLog(out_file if writer else os.devnull) as f, \
            tqdm(total=len(todo), desc="eval", disable=None if writer else True) as progress:
        if continuous:  # one process, one device
            pending_images, pads = {}, {}

            def prompts():
                for index, ex in enumerate(todo):
                    prompt = prompt_of(ex)
                    input_ids, mask, pos = left_pad([prompt], ids["eos_token_id"], cfg.length_buckets)
                    image = materialize(ex.image)
                    pending_images[index], pads[index] = image, input_ids.shape[1] - len(prompt)
                    yield {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos, **stack_images([image])}

            done_lines, next_index = {}, 0
            for index, row in generate_continuous(model, prompts(), latent, sampling, slots=rows):
                done_lines[index] = record_line(todo[index], row.tokens, row.length, row.selected - pads.pop(index),
                                                pending_images.pop(index))
                gen_tokens += row.length
                progress.update(1)
                while next_index in done_lines:  # in the examples' order
                    f.write(done_lines.pop(next_index))
                    next_index += 1
        for i in range(0, 0 if continuous else len(todo), rows):
            chunk = todo[i : i + rows]
            padded = chunk + [chunk[-1]] * (rows - len(chunk))  # dummy rows: copies, outputs dropped
            prompts = [prompt_of(ex) for ex in padded]
            input_ids, mask, pos = left_pad(prompts, ids["eos_token_id"], cfg.length_buckets)  # the whole batch's
            lines = []
            first = mine.start  # the global index of this process's first row
            if first < len(chunk):  # (a process whose rows are all dummies has nothing to run)
                images = [materialize(ex.image) for ex in padded[mine]]
                batch = {"input_ids": input_ids[mine], "attention_mask": mask[mine], "position_ids": pos[mine],
                         **stack_images(images)}
                batch = jax.device_put(batch, batch_shardings(batch, rules))
                out = ivtlr_generate(model, batch, latent, sampling)
                tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
                selected = np.asarray(out.selected)
            for row, ex in enumerate(chunk[mine]):
                pad = input_ids.shape[1] - len(prompts[first + row])
                lines.append(record_line(ex, tokens[row], int(lengths[row]), selected[:, row] - pad, images[row]))
            lines = [line for part in distributed.allgather_objects(lines, "eval_records") for line in part]
            gen_tokens += sum(json.loads(line)["generated_tokens"] for line in lines)
            progress.update(len(chunk))
            f.write("".join(lines))
            f.sync()  # a batch's records survive a power cut (seconds of generation each)
    elapsed = time.perf_counter() - start
    if not writer:  # process 0 writes the summary and hands it over
        return distributed.broadcast_object(None, "eval_summary")
    summary = summarize(out_file, cfg.dataset)
    skipped = dict(sorted(report.counts.items()))
    skipped["already_done"] = len(done)
    summary.update(time_per_example_s=elapsed / max(len(todo), 1),
                   generated_tokens_per_s=gen_tokens / max(elapsed, 1e-9), prompt_format=cfg.prompt_format,
                   dtype=cfg.dtype, param_dtype=cfg.storage_dtype, devices=n_dev * procs, rows_per_batch=rows,
                   batching="continuous" if continuous else "static",
                   rows_read=report.rows, examples_in_set=len(examples), evaluated_now=len(todo),
                   skipped=skipped, setup=setup, **({"processes": procs} if procs > 1 else {}))
    write_atomic(summary_path(out_file), json.dumps(summary, indent=2))
    log(result_line(summary))
    log_evaluation(events, summary, model_dir, out_file, split=cfg.split, prompt_format=cfg.prompt_format,
                   pictures_dir=save_attention)  # ivtlr_jax/events.py
    return distributed.broadcast_object(summary, "eval_summary")


def image_patches(question_ids: list[int], image_token_id: int, selected: np.ndarray) -> list[list[int]]:
    """Selected prompt positions [n, K] (of the unpadded prompt) -> per latent step, the indices of the
    patches within the image (row-major over its token grid), in insertion order."""
    patch_of = {j: i for i, j in enumerate(j for j, t in enumerate(question_ids) if t == image_token_id)}
    return [[patch_of[int(s)] for s in step] for step in selected]


def score(dataset: str, ex, prompt_text: str, generated: str) -> dict:
    meta = ex.meta
    record = {"id": ex.id, "prompt": prompt_text, "generated": generated, "choices": meta.get("choices"),
              "domain": meta.get("domain") or meta.get("subject"), "topic": meta.get("topic")}
    if dataset == "m3cot":
        gold = str(meta["answer"]).strip().upper()
        strict = m3cot_strict_prediction(generated)
        record.update(gold=gold, prediction=strict, correct=strict == gold,
                      correct_official=m3cot_official_correct(prompt_text + generated, gold))
    else:
        gold = int(meta["answer"])
        pred = scienceqa_prediction(generated)
        record.update(gold=gold, prediction=pred, correct=pred == gold, correct_official=pred == gold)
    return record


def summarize(out_file: Path, dataset: str) -> dict:
    records = read_records(out_file)
    by_domain = defaultdict(list)
    for r in records:
        by_domain[str(r.get("domain"))].append(r["correct"])
    n = len(records)
    mean = lambda values: sum(values) / n if n else None  # no figure over no examples
    return {
        "dataset": dataset,
        "examples": n,
        "accuracy_strict": mean([r["correct"] for r in records]),
        "accuracy_official": mean([r["correct_official"] for r in records]),
        "accuracy_by_domain": {d: sum(v) / len(v) for d, v in sorted(by_domain.items())},
        "avg_generated_tokens": mean([r["generated_tokens"] for r in records]),
    }


def result_line(summary: dict) -> str:
    """One line: the accuracy over the examples, or why there is none."""
    if not summary["examples"]:
        skipped = ", ".join(f"{k}: {v}" for k, v in summary.get("skipped", {}).items() if v) or "none"
        return (f"no accuracy: 0 examples evaluated ({summary.get('rows_read', 0)} rows read; skipped: {skipped}; "
                f"limit {summary.get('setup', {}).get('limit')})")
    return (f"accuracy {summary['accuracy_strict']:.3f} (strict), {summary['accuracy_official']:.3f} (official "
            f"scoring) on {summary['examples']} examples")


def save_picture(ex, image: dict, steps: list[list[int]], family: str, path: Path, *, record: dict | None = None,
                 ranked: bool = True, dataset: str = "", split: str = "") -> None:
    """The image as the model saw it, one panel per latent step with its selected patches, under the
    question, choices, generated text and prediction against the gold answer (see `viz`)."""
    from ..data import decode_image

    raw = getattr(ex.image, "_data", None)  # a LazyImage keeps the encoded bytes
    grid, size = family_named(family).picture_geometry(image)
    picture = np.asarray(decode_image(raw).convert("RGB").resize(size)) if raw is not None else \
        np.full((size[1], size[0], 3), 127, np.uint8)
    record = record or {}
    title = " ".join(part for part in (ex.id, f"({dataset} {split})" if dataset else "") if part)
    draw_selection(picture, grid, steps, question=ex.meta.get("question"), choices=ex.meta.get("choices"),
                   prediction=record.get("prediction"), gold=record.get("gold"), correct=record.get("correct"),
                   correct_official=record.get("correct_official"), generated=record.get("generated"),
                   title=title, ranked=ranked).save(path)
