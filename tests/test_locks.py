"""The lock of a run folder or an evaluation output (ivtlr_jax/io/lock.py): who counts as gone, the race of
several contenders for a stale lock, a live lock never removed by a late contender, the heartbeat. The
commands' refusals and the take-over of a lock left by a SIGKILLed trainer: test_train_loop.py and
test_eval_run.py."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from ivtlr_jax.io.lock import FileLock, Holder, OutputInUseError, lock_path, output_lock, read_holder

quiet = lambda *_: None


def holder(host: str, pid: int | None = None, **kw) -> Holder:
    return Holder(host, os.getpid() if pid is None else pid, os.urandom(8).hex(), time.time(), **kw)


def write_lock(path, who: Holder, age_s: float = 0.0) -> None:
    path.write_text(json.dumps(who.__dict__))
    past = time.time() - age_s
    os.utime(path, (past, past))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_who_counts_as_gone(tmp_path):
    path = tmp_path / "run.lock"
    me = Holder.this_process()
    lock = FileLock(path, stale_s=60, log=quiet)
    now = time.time()
    assert not lock.is_stale(me, now, now=now)  # this very process
    assert lock.is_stale(holder(me.host, dead_pid(), boot=me.boot), now, now=now)  # same host, pid gone
    if me.pid_start is not None:  # Linux: a later process under a recorded pid is not the holder
        assert lock.is_stale(holder(me.host, boot=me.boot, pid_start=me.pid_start + 1), now, now=now)
    if me.boot:
        assert lock.is_stale(holder(me.host, boot="another boot"), now, now=now)  # the host restarted
    other = holder("another-host", 1)  # another host: its heartbeat's age on the filesystem's clock
    assert not lock.is_stale(other, now - 59, now=now) and lock.is_stale(other, now - 61, now=now)
    assert not lock.is_stale(None, now - 1, now=now) and lock.is_stale(None, now - 61, now=now)  # unreadable


def test_a_second_holder_is_refused_naming_the_first_and_release_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "deeper" / "eval.jsonl"
    with output_lock(out, log=quiet):
        assert lock_path(out).is_file()
        with pytest.raises(OutputInUseError, match=rf"eval.jsonl is in use by process {os.getpid()} on host "):
            with output_lock(out, log=quiet):
                pass
    assert not (tmp_path / "new").exists()  # the folders made for the lock went with it


def test_the_heartbeat_keeps_a_lock_fresh_and_says_when_it_was_lost(tmp_path):
    path = tmp_path / "run.lock"
    said = []
    lock = FileLock(path, heartbeat_s=0.05, log=said.append, holder=holder("host-a"))
    lock.acquire()
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5  # touched again
    write_lock(path, holder("host-b"))  # taken over while held (a heartbeat stalled past the bound)
    time.sleep(0.3)
    assert any("no longer this process's lock" in s for s in said), said
    lock.release()
    assert read_holder(path)[0].host == "host-b"  # the new holder's lock is left alone


@pytest.mark.parametrize("round", range(8))  # a race: several rounds to catch a rare interleaving
def test_one_of_many_contenders_takes_a_stale_lock(tmp_path, round):
    """Eight contenders (as many hosts) at once on the lock of a host gone silent: one takes it, the others
    are refused naming that one, and no file but the winner's lock is left."""
    path = tmp_path / "run.lock"
    write_lock(path, holder("gone-host", 1), age_s=3600)
    start = threading.Barrier(8)
    won, refused, said = [], [], []

    def contend(i):
        lock = FileLock(path, log=said.append, holder=holder(f"host-{i}"))
        start.wait()
        try:
            lock.acquire()
            won.append(lock)
        except OutputInUseError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    winner = won[0].me
    assert all(f"process {winner.pid} on host {winner.host}" in r for r in refused), refused
    assert read_holder(path)[0] == winner and sorted(os.listdir(tmp_path)) == ["run.lock"]
    assert sum("took over the lock of process 1 on host gone-host" in s for s in said) == 1, said
    won[0].release()
    assert os.listdir(tmp_path) == []


def test_a_late_contender_leaves_a_live_lock_alone(tmp_path, monkeypatch):
    """A contender that judged the gone holder's lock stale but acts only after another contender has taken
    the lock over: it must not move the live lock away, not even for a moment in which a third contender
    could link its own (here: one tries right after any rename of the lock file)."""
    path = tmp_path / "run.lock"
    write_lock(path, holder("gone-host", 1), age_s=3600)
    late = FileLock(path, log=quiet, holder=holder("host-late"))
    seen = read_holder(path)
    fast = FileLock(path, log=quiet, holder=holder("host-fast"))
    fast.acquire()  # took it over meanwhile
    third, real_rename = FileLock(path, log=quiet, holder=holder("host-third")), os.rename

    def rename_then_a_third_contender(src, dst):
        real_rename(src, dst)
        if str(src) == str(path):
            with contextlib.suppress(OutputInUseError):
                third.acquire()

    monkeypatch.setattr(os, "rename", rename_then_a_third_contender)
    late._take_over(*seen, now=time.time())  # the late contender acts on what it saw
    assert fast.holds() and not third.holds() and sorted(os.listdir(tmp_path)) == ["run.lock"]
    with pytest.raises(OutputInUseError, match="on host host-fast"):
        late.acquire()
    fast.release()


def test_a_take_over_guard_left_by_a_dead_contender_expires(tmp_path):
    path = tmp_path / "run.lock"
    write_lock(path, holder("gone-host", 1), age_s=3600)
    guard = tmp_path / "run.lock.break"
    guard.write_text("")
    os.utime(guard, (time.time() - 3600,) * 2)  # a contender died during its take-over, long ago
    with FileLock(path, log=quiet, holder=holder("host-a")) as lock:
        assert lock.holds() and sorted(os.listdir(tmp_path)) == ["run.lock"]
