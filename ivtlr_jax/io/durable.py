"""Writes that survive a power cut: a file's data is on disk only once it is fsynced, and a name created,
renamed or removed in a folder only once the folder is fsynced (ext4, XFS and NFS promise no more).

- `fsync_file`, `fsync_folder`, `fsync_tree`: flush one file, one folder's entries, or a whole tree.
- `LineLog`: a line-buffered append-only text file (metrics.jsonl, an evaluation's records) whose `sync()`
  makes the lines written so far durable; called where the lines must outlive a crash together with
  something else (a checkpoint, a summary), not after every line.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

UNSYNCABLE = (errno.EINVAL, errno.ENOTSUP, errno.EROFS)  # special files (/dev/null), read-only mounts


def fsync_file(path: str | os.PathLike) -> None:
    """The data of the file at `path` is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: str | os.PathLike) -> None:
    """The entries of the folder `path` (names created, renamed, removed) are on disk. Platforms whose
    folders cannot be opened or fsynced (Windows; some network filesystems refuse) are left as they are."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in UNSYNCABLE:
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Every file and folder under `folder` (and `folder` itself) is on disk, deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(os.path.join(root, name))
        fsync_folder(root)


class LineLog:
    """An append-only text file, line-buffered (each line reaches the OS when written, so a killed process
    loses none); `sync()` also makes it survive a power cut."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        created = not self.path.exists()
        self._file = open(self.path, "a", buffering=1)
        if created:  # the new name itself must be on disk too
            fsync_folder(self.path.parent)

    def write(self, line: str) -> None:
        self._file.write(line)

    def sync(self) -> None:
        """Everything written so far is on disk (a special file such as /dev/null: nothing to do)."""
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError as e:
            if e.errno not in UNSYNCABLE:
                raise

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self.sync()
        finally:
            self._file.close()

    def __enter__(self) -> LineLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
