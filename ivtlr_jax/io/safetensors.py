"""Streaming safetensors reading and writing without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw bytes. Tensors are returned as read-only numpy views of a
memory map, so reading a 15 GB checkpoint costs no memory beyond what is copied out of it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"  # the shard index of sharded weights


class CorruptCheckpointError(ValueError):
    pass


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data section)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CorruptCheckpointError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(DTYPES[info["dtype"]]).itemsize
        if end > data_size or end - begin != expected:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} byte range {begin}..{end} does not fit its shape {info['shape']} "
                f"or the file ({data_size} data bytes); the file is truncated or corrupt"
            )
    return header, 8 + n


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header, self.offset = read_header(self.path)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        begin, end = info["data_offsets"]
        raw = self._mmap[self.offset + begin : self.offset + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write_streaming(
    path: str | os.PathLike,
    entries: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors one at a time: each entry is (name, shape, dtype, fetch); `fetch()` is called only
    when that tensor's bytes are written, so at most one tensor is in memory."""
    entries = list(entries)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, fetch in entries:
            arr = np.ascontiguousarray(fetch(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {arr.shape}, announced {tuple(shape)}")
            f.write(arr.tobytes())


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    write_streaming(path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()], metadata)


class SafetensorsFolder:
    """All tensors of a Hugging Face model folder (`model.safetensors` or a sharded index)."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {missing}")
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors files (and no model.safetensors.index.json)")
        self.files = {f: SafetensorsFile(folder / f) for f in files}
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for k in f.keys():
                self.where[k] = f

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)
