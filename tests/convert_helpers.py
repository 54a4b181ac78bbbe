"""What the converter tests share: a script of `convert/` loaded as a module (as `python convert/X.py`
runs it), and the tensors of a folder's safetensors files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from ivtlr_jax.io.safetensors import SafetensorsFolder

ROOT = Path(__file__).resolve().parents[1]


def convert_script(name: str):
    """`convert/<name>.py` as the module `convert_<name>`."""
    spec = importlib.util.spec_from_file_location(f"convert_{name}", ROOT / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"convert_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def tensors_of(folder) -> dict[str, np.ndarray]:
    """Every tensor of a folder's safetensors files (sharded or not), by name."""
    src = SafetensorsFolder(folder)
    return {k: np.array(src.get(k)) for k in src.keys()}
