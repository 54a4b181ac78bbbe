"""The setup an evaluation output belongs to, and resuming it (`eval.run` writes the records).

The setup (model folder, a fingerprint of its weights and tokenizer files, data and a fingerprint of the
split's rows, prompt format, latents, K, patch order, RoPE, dtypes, sampling, limit) is written beside the
output before the first record
(`setup_path`: eval_test.jsonl -> eval_test.setup.json). Re-running with the same output skips the examples
already written when the setup is the same, and refuses (naming the differing keys) when it is not. A torn
last line (a crash mid-write) is cut off and its example redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.fingerprint import data_fingerprint
from ..decoding import SamplingConfig
from ..run_folder import RunFolder
from ..io.atomic import write_atomic
from ..io.fingerprint import FingerprintError, weights_fingerprint
from ..models.common.choices import plain

if TYPE_CHECKING:
    from .run import EvalConfig

SETUP_VERSION = 2  # 2: ScienceQA ids from the content (1: `<split>-<row>`), the data's fingerprint
# setup keys that describe but do not decide: the fingerprints identify the model and the data, so a
# moved or copied folder still resumes
INFORMATIVE_KEYS = ("model", "source")


class EvalSetupError(ValueError):
    """An output file that cannot be resumed with this setup (or cannot be read)."""


def eval_setup(model_dir: Path, cfg: EvalConfig, sampling: SamplingConfig) -> dict:
    """What decides an output's records: two runs with equal setups write the same records."""
    data, latent, model = cfg.data, cfg.latent, cfg.model
    source = Path(data.source)
    try:
        weights = weights_fingerprint(model_dir)
    except FingerprintError as err:
        raise EvalSetupError(str(err)) from None
    setup = {
        "version": SETUP_VERSION,
        "model": str(Path(model_dir).resolve()),
        "weights_fingerprint": weights,
        "dataset": data.dataset,
        "source": str(source.resolve()) if source.exists() else data.source,
        "split": data.eval_split,
        "data_fingerprint": data_fingerprint(data.dataset, data.source, data.eval_split, ordered=False),  # by id
        "prompt_format": cfg.eval.prompt_format,
        "num_latents": cfg.eval.num_latents,
        "num_selected_patches": latent.num_selected_patches,
        "patch_order": latent.patch_order,
        "rope": latent.rope,
        "dtype": model.dtype,
        "param_dtype": model.param_dtype,
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "limit": cfg.limit,
        # fused attention (cuDNN on GPU) rounds otherwise than the einsums in bf16; written only when chosen,
        # so the outputs of earlier setups (all "xla") still resume
        **({"attention_impl": model.attention_impl} if model.attention_impl != "xla" else {}),
        # Qwen3-VL's patch copies without their DeepStack features: written only when chosen, as above
        **({"patch_deepstack": False} if not latent.patch_deepstack else {}),
        # images sized by the processor's rules: written only when chosen, as above
        **({"image_resize": data.image_resize} if data.image_resize != "square" else {}),
    }
    return {key: plain(value) for key, value in setup.items()}  # choices as their strings, as the file has them


def default_output(checkpoint: str | Path, split: str) -> Path:
    """Where an evaluation writes unless told: beside a stage export `<run>/stage_<s>`, in `<run>/eval/stage_<s>/`
    (not inside the folder a re-export replaces); inside any other local folder; for a hub id under
    `evals/<owner>--<name>/` (a local folder `./<owner>/<name>` would shadow the hub id)."""
    path = Path(checkpoint)
    name = f"eval_{split}.jsonl"
    if path.is_dir():
        of_run = RunFolder.of_stage_export(path)
        return (of_run[0].stage_eval_dir(of_run[1]) if of_run else path) / name
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


