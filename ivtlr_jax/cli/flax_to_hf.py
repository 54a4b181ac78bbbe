"""Write a model of this project as a Hugging Face folder that transformers loads
(Qwen2VLForConditionalGeneration / ChameleonForConditionalGeneration): safetensors + config.json +
tokenizer and processor files (`ivtlr-convert-flax-to-hf`, or `python convert/flax_to_hf.py`).

    ivtlr-convert-flax-to-hf --checkpoint runs/qwen2vl-m3cot --out hf/qwen2vl-m3cot
    ivtlr-convert-flax-to-hf --checkpoint runs/qwen2vl-m3cot --out hf/qwen2vl-m3cot-peft --peft

--checkpoint is either
- a model folder that `from_pretrained` loads: a stage export (`<run>/stage_N`), a folder written by
  ivtlr-convert-hf-to-flax or ivtlr-convert-official, or any Hugging Face folder; or
- a training run folder (`save_path/name`, holding config.yaml and checkpoints/): the base model named
  by `model.model_id` in config.yaml is loaded, the latent tokens are added as the trainer adds them,
  LoRA is attached as configured and the latest checkpoint's trained parameters (or --step's) are
  restored into it.

By default LoRA is merged into the weights. With --peft (a run folder trained with LoRA) the output
holds `base/` (the base model with the latent tokens added: a Hugging Face folder) and `adapter/`
(a PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors), loadable with
`PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained("OUT/base"), "OUT/adapter")`.
Adapter tensor names follow the module names of the installed transformers (--peft-layout auto):
Qwen2-VL's language model is `model.language_model.layers.*` from transformers 4.52 on and
`model.layers.*` before (the official IVT-LR environment, transformers 4.51.3: --peft-layout v4).
The adapter's target_modules is a regex of the decoder layers' projections (bare names like `gate_proj` would
also adapt Qwen2.5-VL's vision MLPs).

The output folder must not exist or be empty; it is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from ..io.atomic import atomic_output_folder, check_output_folder
from ..io.hf_export import ExportError, save_hf
from ..io.model_folder import FLAX_MARKER, WEIGHT_FILES, from_pretrained, resolve_folder, stored_dtype
from ..io.peft import default_peft_layout, write_adapter
from ..models import read_config
from ..models.common.loading import WeightLoadError, variables_by_path, with_values
from ..models.common.layers import DTYPES
from . import make_parser

COPY_SKIP_NAMES = ("config.json", "model.safetensors.index.json", FLAX_MARKER)


@dataclasses.dataclass
class Loaded:
    model: nnx.Module
    processor: object | None  # the processor to write (run folders: with the latent tokens added)
    files_from: Path | None  # a folder whose tokenizer / processor / generation files are copied
    kind: str  # "run" or "model"
    step: int | None = None


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "trainable").is_dir())


def load_run(run: Path, step: int | None = None) -> Loaded:
    """The model of a training run at a checkpoint, rebuilt as the trainer built it."""
    from ..build import build_model
    from ..config import load_config
    from ..io.orbax_params import restore_params
    from ..models.common.lora import trainable_filter

    cfg = load_config(run / "config.yaml")
    steps = checkpoint_steps(run)
    if not steps:
        raise ExportError(f"{run / 'checkpoints'}: no complete checkpoint (no <step>/trainable folder)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"{run / 'checkpoints'}: no checkpoint for step {step} (have {steps})")
    built = build_model(cfg, dtype=jnp.float32, remat="none")  # the model as train() built it
    model, processor, folder = built.model, built.processor, built.folder
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg.lora), ...)
    trainable = restore_params(run / "checkpoints" / str(step) / "trainable", trainable)
    return Loaded(nnx.merge(graphdef, trainable, frozen), processor, folder, "run", step)


def load_model_folder(path: Path, dtype: str) -> Loaded:
    folder = resolve_folder(path)
    read_config(folder)
    param_dtype = DTYPES[stored_dtype(folder) if dtype == "auto" else dtype]
    return Loaded(from_pretrained(folder, dtype=jnp.float32, param_dtype=param_dtype), None, folder, "model")


def cast_params(model: nnx.Module, dtype) -> nnx.Module:
    graphdef, state = nnx.split(model)
    values = {p: (v[...].astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v[...])
              for p, v in variables_by_path(state).items()}
    return nnx.merge(graphdef, with_values(state, values))


def without_lora(model: nnx.Module) -> tuple[nnx.Module, object | None]:
    lora = getattr(model.layers, "lora", None)
    if lora is not None:
        del model.layers.lora
    return model, lora


def write_hf(model: nnx.Module, folder: Path, loaded: Loaded, dtype: str) -> None:
    if dtype != "auto":
        model = cast_params(model, DTYPES[dtype])
    save_hf(model, folder)
    if loaded.files_from is not None:  # tokenizer, processor, chat template, generation config
        for f in loaded.files_from.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name not in COPY_SKIP_NAMES:
                shutil.copy2(f, folder / f.name)
    if loaded.processor is not None:
        from ..data.tokenizer import save_processor

        save_processor(loaded.processor, folder)


def export(checkpoint: str | Path, out: str | Path, *, peft: bool = False, dtype: str = "auto", step: int | None = None,
           peft_layout: str = "auto", log=print) -> Path:
    """See the module docstring. Returns the output folder."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_output_folder(out)  # before the (long) load
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto or one of {sorted(DTYPES)}")
    start = time.perf_counter()
    if checkpoint.is_dir() and is_run_folder(checkpoint):
        log(f"loading training run {checkpoint}: its base model, then the checkpoint's trained parameters")
        loaded = load_run(checkpoint, step)
        log(f"{checkpoint}: training run, checkpoint step {loaded.step} ({time.perf_counter() - start:.1f} s)")
    else:
        if step is not None:
            raise ExportError(f"--step applies to a training run folder; {checkpoint} is a model folder")
        log(f"loading model folder {checkpoint}")
        loaded = load_model_folder(checkpoint, dtype)
        log(f"{checkpoint}: loaded ({time.perf_counter() - start:.1f} s)")
    model = loaded.model
    if peft and getattr(model.layers, "lora", None) is None:
        raise ExportError(f"--peft needs LoRA adapters, and {checkpoint} has none (a model folder is already "
                          "merged; give the training run folder of a run with lora.enabled)")

    what = "base model + PEFT adapter" if peft else "LoRA merged" if getattr(model.layers, "lora", None) else "weights"
    log(f"writing {out} ({what}, dtype {dtype})")
    with atomic_output_folder(out) as tmp:
        if peft:
            layout = default_peft_layout() if peft_layout == "auto" else peft_layout
            dropout = model.layers.lora.dropout
            model, lora = without_lora(model)
            write_hf(model, tmp / "base", loaded, dtype)
            write_adapter(model, lora, tmp / "adapter", out / "base", dropout, layout)
        else:
            from ..models.common.lora import merge_lora

            write_hf(merge_lora(model), tmp, loaded, dtype)
    return out


USAGE = "%(prog)s --checkpoint DIR --out DIR [--peft] [options]"


def main(argv=None, prog: str = "ivtlr-convert-flax-to-hf") -> None:
    head, _, rest = __doc__.partition("\n\n")
    p = make_parser(prog, USAGE, head, rest)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a model folder or a training run folder")
    p.add_argument("--out", required=True, metavar="DIR", help="new output folder")
    p.add_argument("--peft", action="store_true", help="write base/ + a PEFT adapter/ instead of merging LoRA")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="storage dtype of the written weights (auto: as loaded / as trained)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="run folder: the checkpoint step (default: the latest)")
    p.add_argument("--peft-layout", default="auto", choices=["auto", "v4", "v5"],
                   help="adapter module names for transformers < 4.52 (v4) or >= 4.52 (v5); auto: installed")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, peft=args.peft, dtype=args.dtype, step=args.step,
                     peft_layout=args.peft_layout)
    except (FileExistsError, FileNotFoundError, ExportError, WeightLoadError) as e:
        p.exit(2, f"{prog}: error: {e}\n")
    print(f"wrote {out}")
