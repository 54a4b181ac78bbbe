"""Writes that are never seen half done: a text file (`write_atomic`) and a folder
(`atomic_output_folder`), each written under a temporary name and renamed into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text`: written to `<path>.tmp`, then renamed over `path` (the old content or the new
    one, never a torn file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
