"""HF folder -> Flax folder (orbax parameters in our layout + config, tokenizer and processor files)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flax import nnx

from ..models import read_config
from ..models.common.layers import DTYPES
from .atomic import atomic_output_folder, check_output_folder, write_atomic
from .model_folder import FLAX_MARKER, FLAX_PARAMS_DIR, copy_side_files, from_pretrained, resolve_folder
from .orbax_params import save_params


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
        copy_side_files(src, tmp)
        write_atomic(tmp / FLAX_MARKER, json.dumps(
            {"format": "orbax", "source": str(hf), "param_dtype": dtype,
             "converted": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    return out
