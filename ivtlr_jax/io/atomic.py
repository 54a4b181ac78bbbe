"""Writes that are never seen half done and survive a power cut: a text file (`write_atomic`) and a folder
(`atomic_output_folder`), each written under a temporary name, put on disk (fsync), renamed into place and
the rename itself put on disk (the parent folder fsynced).

A folder that replaces another is swapped in two renames (`out` -> `out.replaced`, `out.partial` -> `out`);
a crash between them leaves the old folder, complete, under `out.replaced`, and `recover_swap(out)` (called
by `atomic_output_folder` and by `model_folder.resolve_folder` before reading a folder) renames it back. The
new folder under `out.partial` is never trusted after a crash (nothing says it was complete): the next write
of `out` removes it and starts again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .durable import fsync_folder, fsync_tree

PARTIAL, REPLACED, TMP = ".partial", ".replaced", ".tmp"


def sibling(path: Path, suffix: str) -> Path:
    """`path` with `suffix` added to its name (`stage_1` -> `stage_1.partial`)."""
    return path.with_name(path.name + suffix)


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """`path` holds `text` (or bytes), also after a crash or a power cut at any moment: the old content or the new
    one, never an empty or torn file. Written to `<path>.tmp`, fsynced, renamed over `path`, the folder
    fsynced."""
    path = Path(path)
    tmp = sibling(path, TMP)
    try:
        with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)


def check_output_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose a new folder or empty it")


def recover_swap(out: str | os.PathLike) -> Path:
    """Undo a swap that a crash cut between its two renames: when `out` is missing and `out.replaced`
    holds the folder it was replacing (complete), rename that back. Leaves anything else as it is (a
    concurrent reader that restored it first is fine). -> `out` as a Path."""
    out = Path(out)
    old = sibling(out, REPLACED)
    if out.exists() or not old.is_dir():
        return out
    try:
        os.rename(old, out)
    except OSError:
        if not out.exists():  # not another process's restore
            raise
    fsync_folder(out.parent)
    return out


def swap_in(new: Path, out: Path) -> None:
    """The complete folder `new` becomes `out`; an existing `out` is moved to `out.replaced` first and
    removed last, so at every moment one complete folder is under `out` or `out.replaced`."""
    old = sibling(out, REPLACED)
    if old.exists():  # a leftover: recover_swap has already restored it if `out` was missing
        shutil.rmtree(old)
    if out.exists():
        os.rename(out, old)
    os.rename(new, out)
    fsync_folder(out.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_folder(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield `out.partial` to write into; when the block completes it is put on disk and becomes `out`,
    and it is removed if the block fails, so an interrupted write never leaves a half-written model. `out`
    must be new or empty, unless `replace`: then an existing `out` is swapped out only once the new folder
    is complete (`swap_in`)."""
    out = recover_swap(out)
    if not replace:
        check_output_folder(out)
    tmp = sibling(out, PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, out)
