"""A model folder's fingerprint: its contents, not its name (a folder moved or copied keeps it; one
tensor rescaled in place changes it). Recorded by training runs (`<run>/fingerprints.json`) and
evaluation outputs (`<out stem>.setup.json`), checked on resume, and compared between the processes of a
multi-process run.

Cost: the config, tokenizer and processor files are hashed whole; a safetensors file contributes its
size, its header and 3 x 256 bytes of every tensor: about 2,200 small reads for a 7B model's ~730
tensors, whatever its 15 GB (0.03 s for 4 shards of 15.2 GB and 732 tensors in the page cache; from a
cold disk, one seek per read).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".msgpack")
SETUP_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
               "ivtlr_jax.json")
SMALL_FILE = 8 << 20  # files up to this size are hashed whole
SAMPLE = 256  # bytes read at each sampled place
SAMPLES_PER_FILE = 256  # evenly spaced samples of a large file that is not safetensors


class FingerprintError(ValueError):
    """A folder with nothing to fingerprint, or a weight file that is not what its name says."""


def _is_weights(path: Path, folder: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or "flax_params" in path.relative_to(folder).parts


def weights_fingerprint(folder: Path) -> str:
    """A sha256 over the model folder's weight, config and tokenizer files, cheap at any size: small
    files whole; a safetensors file's size, header (every tensor's name, dtype, shape and offsets) and
    the first, middle and last 256 bytes of every tensor; any other large file (e.g. orbax data) its
    size and 256 evenly spaced samples. A fine-tuned or merged model changes every tensor it trains,
    so a sample of every tensor tells stage exports apart; a full hash of a 7B model would read 15 GB."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (p.name in SETUP_FILES or _is_weights(p, folder)))
    if not any(_is_weights(p, folder) for p in files):
        raise FingerprintError(f"{folder}: no weight files (*.safetensors or flax_params/) to fingerprint")
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
        raise FingerprintError(f"{path}: not a safetensors file (header length {n} > file size {size})")
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
