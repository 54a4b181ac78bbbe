"""One process at a time on a run folder or an evaluation output: a lock file beside it (`<path>.lock`)
that a crashed holder cannot leave stuck and that works on a filesystem shared by several hosts (NFS,
where fcntl / flock locks are unreliable).

- The lock file is a JSON record of its holder: host, boot id, pid and the pid's start time, when it
  was taken, a random token. It appears with its content in one step: written under a unique name
  (`<lock>.<token>`), then hard-linked to the lock's name; `link` fails when the name exists, also on
  NFS (a link that NFS retried after it succeeded is told by the file's link count); `O_EXCL` is the
  fallback for filesystems without hard links.
- While held, a heartbeat thread touches the file's mtime every `heartbeat_s` seconds (and notices, and
  says, if the file stopped being its own).
- A holder is gone (its lock stale) when, on the same host and boot, its pid is not running (or is a
  zombie, or a later process under the same pid); on the same host after a reboot, always; on another
  host, when the heartbeat is older than `stale_s`, measured on the filesystem's clock (the mtime of a
  file this process has just written), not on this host's.
- Take-over of a stale lock happens under a guard, `<lock>.break`, created exclusively (one contender at
  a time; the others wait a moment and look again): the guard's holder reads the lock again, and only if
  it still holds the token judged stale renames it to a name of its own, checks the token once more and
  removes it (or links it back, should that holder have been alive and let go meanwhile), then drops the
  guard. Then the lock's name is contested by link, as at first. Nothing but a guard holder ever removes
  another process's lock, so a late contender can never move a live lock aside. A guard left by a
  contender that died during its take-over (milliseconds) expires after `stale_s`.

`FileLock` is the lock of one process; `output_lock` the one of a (multi-process) command: process 0
takes it and every process learns the outcome (`distributed.on_writer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from .. import distributed

LOCK_SUFFIX = ".lock"
BREAK_SUFFIX = ".break"  # the take-over guard beside the lock file
HEARTBEAT_S = 5.0  # the holder touches the lock file this often
STALE_S = 60.0  # a lock of another host whose heartbeat is older is taken over
CONTEST_S = 5.0  # how long a contender keeps at a stale lock that other contenders are taking over
RETRY_S = 0.02  # (about) the wait before looking again while another contender takes a stale lock over
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class OutputInUseError(RuntimeError):
    """Another live process holds the lock of this run folder or evaluation output."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    token: str
    started: float  # time.time() when taken
    boot: str = ""  # the host's boot id (Linux), to tell a rebooted host
    pid_start: int | None = None  # the pid's start time in clock ticks since boot (Linux), to tell a reused pid

    @classmethod
    def this_process(cls) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, secrets.token_hex(8), time.time(), boot_id(), process_start(pid))

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"process {self.pid} on host {self.host} (since {since})"


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a run folder or output file: beside it, `<path>.lock`."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (None where there is no /proc entry)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_start(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of stat: starttime


def pid_running(pid: int, started: int | None) -> bool:
    """Is `pid` a live process of this host, the one that started at `started` (when known)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return sys.platform != "linux"  # no /proc to ask: alive as far as kill tells
    if fields[0] in ("Z", "X"):  # a zombie: dead, not yet reaped
        return False
    return started is None or process_start(pid) == started


def read_holder(path: Path) -> tuple[Holder | None, float] | None:
    """(the holder recorded in the lock file or None if unreadable, the file's mtime), or None when there
    is no file. Opening the file refreshes NFS's cached attributes (close-to-open), so the mtime is current."""
    try:
        with open(path) as f:
            mtime, text = os.fstat(f.fileno()).st_mtime, f.read()
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text)), mtime
    except (ValueError, TypeError):  # torn or foreign content: judged by its age alone
        return None, mtime


def _token(holder: Holder | None) -> str | None:
    return holder.token if holder else None


class FileLock:
    """The lock `path` of one process (`acquire` / `release`, or `with`). `log` says when a stale lock is
    taken over or the lock is lost."""

    def __init__(self, path: str | os.PathLike, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 log: Callable[[str], object] = print, holder: Holder | None = None):
        self.path = Path(path)
        self.heartbeat_s, self.stale_s, self.log = heartbeat_s, stale_s, log
        self.me = holder or Holder.this_process()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._made: list[Path] = []  # folders created for the lock, removed on release when empty

    # ---- taking it ----------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock, or raise OutputInUseError naming the live holder."""
        self._made_folders()
        mine = self.path.with_name(f"{self.path.name}.{self.me.token}")
        won, holder = False, None
        try:
            mine.write_text(json.dumps(dataclasses.asdict(self.me)))
            won, holder = self._contest(mine)
        finally:
            with contextlib.suppress(OSError):
                mine.unlink()
            if not won:
                self._remove_made_folders()
        if not won:
            raise OutputInUseError(self.busy_message(holder))
        self._start_heartbeat()

    def _contest(self, mine: Path) -> tuple[bool, Holder | None]:
        """Link `mine` to the lock's name, taking over stale locks on the way. -> (won, the live holder)."""
        seen, deadline = None, time.monotonic() + CONTEST_S
        while time.monotonic() < deadline:
            if self._link(mine):
                return True, None
            seen = read_holder(self.path)
            if seen is None:  # released meanwhile
                continue
            if not self.is_stale(*seen, now=os.stat(mine).st_mtime):
                break
            if not self._take_over(*seen, now=os.stat(mine).st_mtime):
                time.sleep(RETRY_S * (0.5 + secrets.randbelow(1000) / 1000))  # another contender is at it
        return False, seen[0] if seen else None

    def _made_folders(self) -> None:
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing  # deepest first

    def _link(self, mine: Path) -> bool:
        """Create the lock file from `mine` unless it exists: True when this call created it."""
        try:
            os.link(mine, self.path)
            return True
        except FileExistsError:  # or NFS retried a link that had succeeded: then `mine` has two names
            return os.stat(mine).st_nlink == 2
        except OSError as e:
            if e.errno not in NO_HARD_LINKS:
                raise
        try:  # a filesystem without hard links: exclusive create (the content follows at once)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(mine.read_text())
        return True

    def is_stale(self, holder: Holder | None, mtime: float, *, now: float) -> bool:
        """Is the lock of `holder` (None: unreadable), last touched at `mtime`, left by a process that is gone?
        `now`: the filesystem's present time."""
        if holder is None or holder.host != self.me.host:
            return now - mtime > self.stale_s
        if holder.boot and self.me.boot and holder.boot != self.me.boot:  # the host has restarted since
            return True
        return not pid_running(holder.pid, holder.pid_start)

    def _take_over(self, stale: Holder | None, mtime: float, *, now: float) -> bool:
        """Remove the stale lock of `stale`, and only that one, under the take-over guard (module docstring).
        -> False when another contender holds the guard."""
        guard = self.path.with_name(self.path.name + BREAK_SUFFIX)
        if not self._take_guard(guard, now):
            return False
        try:
            seen = read_holder(self.path)
            if seen is None or _token(seen[0]) != _token(stale):  # changed since we looked: contest again
                return True
            moved = self.path.with_name(f"{self.path.name}.{self.me.token}.stale")
            try:
                os.rename(self.path, moved)
            except FileNotFoundError:  # its holder was alive and let go
                return True
            seen = read_holder(moved)
            if _token(seen[0] if seen else None) != _token(stale):  # its holder was alive and let go: put back
                with contextlib.suppress(FileExistsError):
                    os.link(moved, self.path)
            else:
                self.log(f"{self.path}: took over the lock of {stale.describe() if stale else 'an unknown process'}, "
                         "which is gone")
            moved.unlink()
            return True
        finally:
            guard.unlink()

    def _take_guard(self, guard: Path, now: float) -> bool:
        """The take-over guard `<lock>.break`, created exclusively; one left by a contender that died
        during its take-over (older than `stale_s`) is removed for the next look."""
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if now - os.stat(guard).st_mtime > self.stale_s:
                    guard.unlink()
            return False

    def busy_message(self, holder: Holder | None) -> str:
        who = holder.describe() if holder else "another process (its lock file is unreadable)"
        target = self.path.with_name(self.path.name.removesuffix(LOCK_SUFFIX))
        return (f"{target} is in use by {who}; wait for it to end or stop it (a lock of a process that is gone "
                f"is taken over: {self.path})")

    # ---- holding it ---------------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"lock-heartbeat {self.path.name}")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.holds():
                self.log(f"warning: {self.path} is no longer this process's lock (taken over while held)")
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def holds(self) -> bool:
        """Is the lock file this lock's own?"""
        seen = read_holder(self.path)
        return bool(seen and seen[0] and seen[0].token == self.me.token)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.holds():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        for folder in self._made:  # deepest first; one that is not empty stays, and so do those above it
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, log: Callable[[str], object] = print, **options) -> Iterator[None]:
    """Hold the lock of `path` (a run folder, an evaluation output; the file `<path>.lock`) for the block.
    Several processes: process 0 takes it and every process raises OutputInUseError when it is held
    elsewhere. `options`: FileLock's (`heartbeat_s`, `stale_s`)."""
    lock = FileLock(lock_path(path), log=log, **options)
    distributed.on_writer(lock.acquire, "output_lock", errors=(OutputInUseError,))
    try:
        yield
    finally:
        if distributed.is_writer():
            lock.release()
