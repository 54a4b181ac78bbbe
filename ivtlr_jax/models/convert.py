"""HF folder -> Flax folder (orbax parameters in our layout + config, tokenizer and processor files)."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from flax import nnx

from . import FLAX_MARKER, FLAX_PARAMS_DIR, from_pretrained, read_config, resolve_folder
from .checkpoint_io import save_params
from .common.layers import DTYPES

WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt")


def check_output_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose a new folder or empty it")


@contextlib.contextmanager
def atomic_output_folder(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield `out.partial` to write into; it becomes `out` when the block completes and is removed if the
    block fails, so an interrupted write never leaves a half-written model. `out` must be new or empty,
    unless `replace`: then an existing `out` is swapped out only once the new folder is complete."""
    if not replace:
        check_output_folder(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(out.name + ".replaced")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)  # never a moment without a complete folder under one of the two names
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def convert(hf: str, out: str | Path, dtype: str = "float32", log=print) -> Path:
    """`log` gets one line per phase (the folder found, the weights read, the parameters written)."""
    out = Path(out)
    check_output_folder(out)  # before the (long) load
    start = time.perf_counter()
    src = resolve_folder(hf)
    family, _, _ = read_config(src)  # fails early on an unsupported model type
    log(f"reading {src} ({family.name}) as {dtype}")
    model = from_pretrained(src, dtype=DTYPES[dtype])
    log(f"read the weights ({time.perf_counter() - start:.1f} s); writing the orbax parameters to {out}")
    with atomic_output_folder(out) as tmp:
        save_params(nnx.state(model), tmp / FLAX_PARAMS_DIR)
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        (tmp / FLAX_MARKER).write_text(json.dumps(
            {"format": "orbax", "source": str(hf), "param_dtype": dtype,
             "converted": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    return out
