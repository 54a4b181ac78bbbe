"""A data split's fingerprint: what its rows hold, not where they are stored or what they are called.

`data_fingerprint`: a sha256 over every row of the split, every column (an image by the sha256 of its
  encoded bytes, whether the cell holds them or names a file); `ordered` for training (the data order
  is a function of each row's position), unordered for evaluation (records are matched by id). Recorded
by training runs and evaluation setups, checked on resume, compared between processes. Cost: one read
of the split and a sha256 of its bytes (no image decoded), a small part of loading it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..models.common.choices import names
from . import DATASETS, Dataset, read_rows, source_folder
from .examples import SkipRow, image_bytes

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_digest(cell, root: Path | None) -> str:
    try:
        data = image_bytes(cell, root)
    except (SkipRow, TypeError) as err:  # the same row is skipped when loaded: its reason counts instead
        return f"unreadable: {err}"
    return "none" if data is None else _sha(data)


def row_digest(row: dict, root: Path | None) -> str:
    """The sha256 of one row: every column by name, the image by its bytes."""
    parts = {name: _image_digest(value, root) if name == "image" else value for name, value in row.items()}
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False,
                      default=lambda v: _sha(bytes(v)) if isinstance(v, (bytes, bytearray, memoryview)) else str(v))
    return _sha(text.encode())


def data_fingerprint(dataset: str, source: str, split: str, *, ordered: bool) -> str:
    """The sha256 of a split's rows (`row_digest`), in their order or as a set (`ordered=False`)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {names(Dataset)}")
    root = source_folder(source)
    digests = [row_digest(row, root) for row in read_rows(source, split, DATASETS[dataset].REQUIRED_COLUMNS)]
    return _sha("\n".join(digests if ordered else sorted(digests)).encode())
