"""Evaluation of a model folder on M3CoT / ScienceQA: batched jitted generation, scoring
(docs/method.md section 18), one JSON line per example, a summary, optional pictures of the selected patches.

Prompts are `question + <|latent|> x num_latents` in the training format (the default; docs/method.md section 17),
left-padded to a length bucket so that batches compile once per bucket.

- Batching (`EvalConfig.eval.batching`): "continuous" (and "auto", the default) keeps `batch_size` rows
  decoding and gives a finished row's slot to the next example (ivtlr_jax/continuous.py; each prompt
  padded to its own bucket, the prompts of a bucket started a process's slots at a time; the slots split
  over the processes, and each process's over its local devices, each decoding slots / devices of them with
  the same jitted step); "static" runs batches of `batch_size` prompts padded to the batch's bucket, each
  until its longest answer ends, and splits them over devices and processes. Either way a record is the
  one a batch of one writes, up to rounding (as with any batch size; in float32 the tests find them
  equal), and records are written in the examples' order.
- Precision: the model runs in `EvalConfig.model.dtype` (the run config's `model.dtype`; the official
  evaluation uses bfloat16) with its weights stored in `model.param_dtype`.
- Devices: each batch's rows are split over the local devices (a 1-D `data` mesh, parameters
  replicated); a short batch is filled with copies of its last row, whose outputs are dropped. Rows
  are independent, so in float32 the records equal a one-device run's (`EvalConfig.devices=1`); in
  bfloat16 they match up to rounding, which varies with the rows per device as with any batch size.
- Processes (hosts; `ivtlr_jax.distributed`): process 0 gathers the records, writes them in order, the
  setup and the summary. Continuous: each process runs its 1/P of the slots, on its own devices, on every
  P-th example (process p: examples p, p + P, ...; prompt i samples with the key one process gives it);
  the processes exchange their finished records each time every one has finished as many more as it has
  slots, and process 0 writes each record once those before it are written. Static: each process
  evaluates its contiguous share of every batch on its own devices (prompts padded to the whole batch's
  bucket, so every row sees what it would in one process).
- Resuming (eval/setup.py): the setup is written beside the output before the first record; re-running
  with the same output skips the examples already written when the setup is the same, and refuses
  (naming the differing keys) when it is not. The summary counts skipped rows by reason (no image, ...,
  already done).
- One evaluation per output: `<out>.lock` is held while it runs (io/lock.py); the records are fsynced
  after each static batch, each exchange of several processes and before the summary, which is written
  atomically.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .. import distributed
from ..data import SpecialTokens, load_examples, load_processor, materialize, special_tokens
from ..data.examples import fewest_image_tokens
from ..data.collate import left_padded_positions, smallest_bucket, stack_images
from ..continuous import generate_continuous
from ..generate import SamplingConfig, ivtlr_generate
from ..latent import LatentConfig
from ..config import ConfigError, DataSection, EvalSection, LatentSection, ModelSection, flat_items, replaced, to_dict
from ..io import from_pretrained, resolve_folder
from ..io.atomic import write_atomic
from ..io.durable import LineLog
from ..io.lock import output_lock
from ..models import ShardingRules, family_named, read_config
from ..events import log_evaluation
from ..models.common.sharding import batch_shardings, local_data_mesh
from .setup import INFORMATIVE_KEYS, EvalSetupError, eval_setup, prepare_output, read_records, summary_path
from .scoring import m3cot_official_correct, m3cot_strict_prediction, scienceqa_prediction
from .viz import draw_selection, picture_as_seen

SECTIONS = ("data", "latent", "model", "eval")  # EvalConfig's fields that are the run config's sections


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation: the run config's sections it reads (config.py: each setting's default and check is
    there) and what a command alone decides. `data`: the dataset, source and `eval_split` (the split
    evaluated); `latent`: K, patch order, RoPE, patch_deepstack; `model`: the compute dtype, the weights'
    storage dtype (`param_dtype`), scan_layers, attention_impl; `eval`: the whole section. A test or a
    command changes single settings with `replace` (`eval=dict(batch_size=4)`)."""
    data: DataSection
    latent: LatentSection = LatentSection()
    model: ModelSection = ModelSection()
    eval: EvalSection = EvalSection()
    limit: int | None = None  # evaluate only the first N examples
    devices: int | None = None  # local devices to split each batch's rows over (None: all)

    def __post_init__(self):
        if self.devices is not None and self.devices < 1:
            raise ConfigError(f"eval config: devices: {self.devices} must be >= 1 (or None for all local devices)")

    def replace(self, **changes) -> EvalConfig:
        """This config with `changes`: `limit` or `devices`, a section, or a mapping of some of a section's keys
        under its name (`eval=dict(batch_size=4), model=dict(dtype="float32")`; refused as a run config's keys
        are, e.g. "eval config: eval.batch_size: 0 must be >= 1"). A mapping reads as the YAML's section does;
        dotted keywords ("eval.batch_size") cannot be Python keywords."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"EvalConfig: unknown key(s) {unknown}; a section's keys go under its name "
                            f"({', '.join(SECTIONS)}), e.g. eval=dict(batch_size=4)")
        try:
            sections = {name: replaced(getattr(self, name), value, name)
                        for name, value in changes.items() if name in SECTIONS and isinstance(value, dict)}
        except ConfigError as e:
            raise ConfigError(f"eval config: {e}", e.keys) from None
        return dataclasses.replace(self, **{**changes, **sections})


def eval_config_from_run(cfg, **changes) -> EvalConfig:
    """An EvalConfig of a run configuration (`config.RunConfig`): its data, latent, model and eval sections;
    `changes` as `EvalConfig.replace` takes them (`data=dict(eval_split="dev"), limit=16`)."""
    return EvalConfig(cfg.data, cfg.latent, cfg.model, cfg.eval).replace(**changes)


def left_pad(prompts: list[list[int]], pad_id: int, buckets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts to a length bucket: (input_ids, attention_mask, position_ids)."""
    longest = max(map(len, prompts))
    length = smallest_bucket(longest, buckets) or longest
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    return ids, mask, left_padded_positions(mask)


# ---- evaluation -----------------------------------------------------------------------------------------
def eval_mesh(devices: int | None):
    """A 1-D `data` mesh over the first `devices` local devices (all when None)."""
    try:
        return local_data_mesh(devices)
    except ValueError as err:
        raise ValueError(f"eval config: {err}") from None


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
    """`evaluate` once the output is this process's: set up, generate the examples not yet in the output
    (continuous or static batches), then the summary (process 0 writes it; every process returns it)."""
    writer = distributed.is_writer()
    log = log if writer else (lambda *_: None)
    run = set_up_evaluation(model_dir, cfg, out_file, Path(save_attention) if save_attention else None, log)
    from tqdm import tqdm

    start = time.perf_counter()
    with LineLog(out_file if writer else os.devnull) as out, \
            tqdm(total=len(run.todo), desc="eval", disable=None if writer else True) as progress:
        generate = run_continuous if run.continuous else run_static
        generated_tokens = generate(run, out, progress)
    elapsed = time.perf_counter() - start
    if not writer:  # process 0 writes the summary and hands it over
        return distributed.broadcast_object(None, "eval_summary")
    summary = write_summary(run, out_file, elapsed, generated_tokens)
    log(result_line(summary))
    log_evaluation(events, summary, run.model_dir, out_file, split=cfg.data.eval_split,
                   prompt_format=cfg.eval.prompt_format, pictures_dir=save_attention)  # ivtlr_jax/events.py
    return distributed.broadcast_object(summary, "eval_summary")


@dataclasses.dataclass
class EvalRun:
    """One evaluation, set up (`set_up_evaluation`): its settings, devices, model, tokens and examples."""
    cfg: EvalConfig
    model_dir: Path
    family: str
    tok: Any
    special: SpecialTokens
    latent: LatentConfig
    sampling: SamplingConfig
    rules: ShardingRules
    rows: int  # rows per batch over all devices (the slots, when continuous)
    devices: int  # over all processes
    continuous: bool
    examples: list
    report: Any  # the data loading's SkipReport
    setup: dict  # the output's setup record
    done: list  # ids already in the output
    todo: list  # the examples to generate now
    save_attention: Path | None
    model: Any = None

    @property
    def mine(self) -> slice:
        """This process's rows of a batch."""
        share = self.rows // distributed.process_count()
        return slice(distributed.process_index() * share, (distributed.process_index() + 1) * share)

    def prompt_of(self, ex) -> list[int]:
        return ex.question_ids + [self.latent.latent_token_id] * self.cfg.eval.num_latents + ex.prompt_suffix

    def record_line(self, ex, tokens: np.ndarray, length: int, selected: np.ndarray, image: dict) -> str:
        """The JSON line of an example (its picture drawn with `save_attention`); selected [n, K] indexes its
        unpadded prompt."""
        cfg, tok = self.cfg, self.tok
        generated = tok.decode(tokens[:length], skip_special_tokens=True)
        prompt_text = tok.decode(ex.question_ids + ex.prompt_suffix, skip_special_tokens=True)
        record = score(cfg.data.dataset, ex, prompt_text, generated)
        steps = image_patches(ex.question_ids, self.model.config.image_token_id, selected)
        record.update(selected_patches=steps, generated_tokens=int(length))
        if self.save_attention:
            save_picture(ex, image, steps, self.family, self.save_attention / f"{ex.id}.png", record=record,
                         ranked=cfg.latent.patch_order == "score", dataset=cfg.data.dataset,
                         split=cfg.data.eval_split)
        return json.dumps(record) + "\n"


def evaluation_devices(cfg: EvalConfig) -> tuple[ShardingRules, int, int, bool]:
    """(rules of the local mesh, rows per batch, devices over all processes, continuous batching?)."""
    procs = distributed.process_count()
    mesh = eval_mesh(cfg.devices)
    devices = mesh.devices.size * procs
    batching = cfg.eval.batching
    continuous = batching != "static"  # auto: continuous, on any number of devices and processes
    rows = -(-cfg.eval.batch_size // devices) * devices  # a multiple of every process's devices
    return ShardingRules(mesh), rows, devices, continuous


def set_up_evaluation(model_dir: str | Path, cfg: EvalConfig, out_file: Path, save_attention: Path | None,
                      log) -> EvalRun:
    """Devices, the model folder's processor and tokens, the examples (K checked against their image
    tokens), the output's setup (process 0's output decides: refused when of another setup, else the
    examples already done), then the model; one log line says what will run."""
    rules, rows, devices, continuous = evaluation_devices(cfg)
    model_dir = resolve_folder(model_dir)
    family = read_config(model_dir)[0].name
    processor = load_processor(model_dir)
    special = special_tokens(processor)
    data, ev, model = cfg.data, cfg.eval, cfg.model
    latent = cfg.latent.latent_config(special.latent_id)  # K, patch order, RoPE, DeepStack: the run's
    sampling = SamplingConfig(ev.max_new_tokens, eos_token_id=special.eos_token_id, pad_token_id=special.eos_token_id)
    examples, report = load_examples(data.dataset, data.source, data.eval_split, processor, family, limit=cfg.limit,
                                     max_length=10**9, prompt_format=ev.prompt_format,
                                     image_resize=data.image_resize)
    check_patch_budget(examples, special.image_token_id, cfg)

    setup = distributed.agree(lambda: eval_setup(model_dir, cfg, sampling), "eval_setup")  # every process's own
    distributed.same_everywhere({**{k: v for k, v in setup.items() if k not in INFORMATIVE_KEYS},
                                 **{f"eval config {k}": v for k, v in flat_items(to_dict(cfg)).items()}},
                                "evaluation settings or files", "eval_same")
    done = distributed.on_writer(lambda: sorted(prepare_output(out_file, setup, [ex.id for ex in examples], log)),
                                 "eval_output", errors=(EvalSetupError,))
    finished = set(done)
    run = EvalRun(cfg, model_dir, family, getattr(processor, "tokenizer", processor), special, latent, sampling, rules,
                  rows, devices, continuous, examples, report, setup, done,
                  [ex for ex in examples if ex.id not in finished], save_attention)
    run.model = from_pretrained(model_dir, dtype=jnp.dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype),
                                rules=rules, scan_layers=model.scan_layers, attention_impl=model.attention_impl)
    log(f"evaluating {model_dir} on {data.dataset}/{data.eval_split} ({ev.prompt_format} prompts, {model.dtype}): "
        f"{len(examples)} examples ({report}); {len(done)} already in {out_file}, {len(run.todo)} to do; "
        + batching_words(rows, devices, continuous)
        + (f" (batch_size {ev.batch_size} rounded up to a multiple of the devices)" if rows != ev.batch_size else ""))
    if save_attention:  # each process draws its own rows
        save_attention.mkdir(parents=True, exist_ok=True)
    return run


def batching_words(rows: int, devices: int, continuous: bool) -> str:
    """How the rows run, for the start's log line: "continuous batching, 8 slots (4 in each of 2 processes)"."""
    procs = distributed.process_count()
    if continuous:
        return f"continuous batching, {rows} slots" + (f" ({rows // procs} in each of {procs} processes)"
                                                       if procs > 1 else "")
    return f"{rows} rows per batch over {devices} device(s)" + (f" of {procs} processes" if procs > 1 else "")


def check_patch_budget(examples: list, image_token_id: int, cfg: EvalConfig) -> None:
    """Each latent step inserts K of a row's image tokens: refused at the start when a row has fewer."""
    if examples and cfg.eval.num_latents:
        fewest, row = fewest_image_tokens(examples, image_token_id)
        k = cfg.latent.num_selected_patches
        if fewest < k:
            raise EvalSetupError(f"latent.num_selected_patches={k} is larger than the {fewest} image tokens of "
                                 f"row {row!r} of {cfg.data.source} ({cfg.data.eval_split}): each latent step "
                                 f"inserts K patches of the row's image; choose K <= {fewest}")


def run_continuous(run: EvalRun, out: LineLog, progress) -> int:
    """Continuous batching in every process: process p of P takes examples p, p + P, p + 2P, ... of `run.todo`
    into its `run.rows // P` slots (split over its local devices). The finished records are exchanged each
    time every process has finished `slots` more (every process joins each exchange, one with nothing left
    with none; one process: each record as it finishes, no exchange); process 0 writes each record once those
    before it are written, so the output is always a prefix of the examples' order. -> the tokens generated."""
    procs = distributed.process_count()
    slots = run.rows // procs
    every = slots if procs > 1 else 1  # a process's records per exchange
    most = len(range(0, len(run.todo), procs))  # process 0's examples: no process has more
    finishing = continuous_records(run, range(distributed.process_index(), len(run.todo), procs), slots)
    waiting, next_index, generated = {}, 0, 0  # records finished but not yet written: index -> line
    for _ in range(-(-most // every)):  # the same number of exchanges in every process
        finished = list(itertools.islice(finishing, every))  # [(index, line, tokens)]
        gathered = [record for part in distributed.allgather_objects(finished, "eval_records") for record in part]
        for index, line, tokens in gathered:
            waiting[index] = line
            generated += tokens
        progress.update(len(gathered))
        while next_index in waiting:  # in the examples' order
            out.write(waiting.pop(next_index))
            next_index += 1
        if procs > 1:
            out.sync()  # an exchange's records survive a power cut (as a static batch's)
    return generated


def continuous_records(run: EvalRun, indices: range, slots: int) -> Iterator[tuple[int, str, int]]:
    """(index, JSON line, tokens generated) of each example `run.todo[index]` for `index` in `indices`, in the
    order they finish: continuous batching in `slots` slots split over the local devices, each prompt padded
    to its own bucket; prompt `index` samples with `fold_in(key, index)`, as in one process."""
    images, pads = {}, {}

    def prompts():
        for index in indices:
            ex = run.todo[index]
            prompt = run.prompt_of(ex)
            input_ids, mask, pos = left_pad([prompt], run.special.eos_token_id, run.cfg.eval.length_buckets)
            images[index], pads[index] = materialize(ex.image), input_ids.shape[1] - len(prompt)
            yield {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos, **stack_images([images[index]])}

    for index, row in generate_continuous(run.model, prompts(), run.latent, run.sampling, slots=slots,
                                          rules=run.rules, indices=indices):
        line = run.record_line(run.todo[index], row.tokens, row.length, row.selected - pads.pop(index),
                               images.pop(index))
        yield index, line, row.length


def run_static(run: EvalRun, out: LineLog, progress) -> int:
    """Static batches of `run.rows` prompts (the last filled with copies, dropped) padded to the batch's bucket,
    each process generating its share on its devices; process 0 writes every batch's records. -> the tokens."""
    generated, mine = 0, run.mine
    for i in range(0, len(run.todo), run.rows):
        chunk = run.todo[i : i + run.rows]
        padded = chunk + [chunk[-1]] * (run.rows - len(chunk))  # dummy rows: copies, outputs dropped
        prompts = [run.prompt_of(ex) for ex in padded]
        input_ids, mask, pos = left_pad(prompts, run.special.eos_token_id, run.cfg.eval.length_buckets)  # the batch's
        lines = []
        first = mine.start  # the global index of this process's first row
        if first < len(chunk):  # (a process whose rows are all dummies has nothing to run)
            images = [materialize(ex.image) for ex in padded[mine]]
            batch = {"input_ids": input_ids[mine], "attention_mask": mask[mine], "position_ids": pos[mine],
                     **stack_images(images)}
            batch = jax.device_put(batch, batch_shardings(batch, run.rules))
            gen = ivtlr_generate(run.model, batch, run.latent, run.sampling)
            tokens, lengths, selected = np.asarray(gen.tokens), np.asarray(gen.lengths), np.asarray(gen.selected)
        for row, ex in enumerate(chunk[mine]):
            pad = input_ids.shape[1] - len(prompts[first + row])
            lines.append(run.record_line(ex, tokens[row], int(lengths[row]), selected[:, row] - pad, images[row]))
        lines = [line for part in distributed.allgather_objects(lines, "eval_records") for line in part]
        generated += sum(json.loads(line)["generated_tokens"] for line in lines)
        progress.update(len(chunk))
        out.write("".join(lines))
        out.sync()  # a batch's records survive a power cut (seconds of generation each)
    return generated


def write_summary(run: EvalRun, out_file: Path, elapsed: float, generated_tokens: int) -> dict:
    """The output's summary (accuracies over all its records, this call's speed, skips, setup), written
    atomically beside it."""
    cfg, procs = run.cfg, distributed.process_count()
    summary = summarize(out_file, cfg.data.dataset)
    skipped = dict(sorted(run.report.counts.items()))
    skipped["already_done"] = len(run.done)
    summary.update(time_per_example_s=elapsed / max(len(run.todo), 1),
                   generated_tokens_per_s=generated_tokens / max(elapsed, 1e-9), prompt_format=cfg.eval.prompt_format,
                   dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, devices=run.devices,
                   rows_per_batch=run.rows,
                   batching="continuous" if run.continuous else "static",
                   rows_read=run.report.rows, examples_in_set=len(run.examples), evaluated_now=len(run.todo),
                   skipped=skipped, setup=run.setup, **({"processes": procs} if procs > 1 else {}))
    write_atomic(summary_path(out_file), json.dumps(summary, indent=2))
    return summary


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
    grid, size = family_named(family).picture_geometry(image)
    picture = picture_as_seen(getattr(ex.image, "_data", None), size)  # a LazyImage keeps the encoded bytes
    record = record or {}
    title = " ".join(part for part in (ex.id, f"({dataset} {split})" if dataset else "") if part)
    draw_selection(picture, grid, steps, question=ex.meta.get("question"), choices=ex.meta.get("choices"),
                   prediction=record.get("prediction"), gold=record.get("gold"), correct=record.get("correct"),
                   correct_official=record.get("correct_official"), generated=record.get("generated"),
                   title=title, ranked=ranked).save(path)
