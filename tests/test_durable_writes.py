"""Writes that survive crashes and power cuts (ivtlr_jax/io/atomic.py, io/durable.py) and closing a run
whatever fails (train/cleanup.py): crashes injected at each step of `write_atomic` and between the two
renames of a folder swap, the fsyncs that make each write durable before it becomes visible, `close_all`.
Where the run and the evaluation use them: test_train_loop.py (metrics synced at checkpoints, a torn swap
of a stage export recovered on resume) and test_eval_run.py (the summary)."""

import os
from pathlib import Path

import pytest

from ivtlr_jax.io import atomic
from ivtlr_jax.io.atomic import atomic_output_folder, recover_swap, write_atomic
from ivtlr_jax.io.durable import LineLog
from ivtlr_jax.io.model_folder import resolve_folder
from ivtlr_jax.train.cleanup import close_all


def test_write_atomic_makes_the_new_content_durable_before_it_is_visible(tmp_path, disk_calls):
    path = tmp_path / "config.yaml"
    write_atomic(path, "new\n")
    tmp = tmp_path / "config.yaml.tmp"
    assert disk_calls == [("fsync", tmp), ("rename", tmp, path), ("fsync", tmp_path)]
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["config.yaml"]


class Crash(Exception):
    pass


def crash_at(monkeypatch, name: str, call: int = 1):
    """os.<name> raises Crash at its `call`-th call."""
    real, count = getattr(os, name), [0]

    def crashing(*args):
        count[0] += 1
        if count[0] == call:
            raise Crash(f"os.{name} call {call}")
        return real(*args)

    monkeypatch.setattr(os, name, crashing)


class HalfWrite:
    """An open file whose write stops half way (a crash mid-write)."""

    def __init__(self, path, mode):
        self.f = open(path, mode)

    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise Crash("mid-write")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("where, expected", [
    ("write", "old"), ("fsync of the file", "old"), ("rename", "old"), ("fsync of the folder", "new"),
])
def test_write_atomic_crashed_at_each_step_leaves_the_old_or_the_new_content(tmp_path, monkeypatch, where, expected):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old")
    if where == "write":
        monkeypatch.setattr(atomic, "open", HalfWrite, raising=False)
    else:
        crash_at(monkeypatch, *{"fsync of the file": ("fsync", 1), "rename": ("replace", 1),
                                "fsync of the folder": ("fsync", 2)}[where])
    with pytest.raises(Crash):
        write_atomic(path, "new")
    assert path.read_text() == expected and os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left


def write_folder(folder: Path, text: str) -> None:
    (folder / "config.json").write_text(text)
    (folder / "sub").mkdir()
    (folder / "sub" / "weights.bin").write_text(text * 3)


def test_a_folder_is_durable_before_it_is_swapped_in(tmp_path, disk_calls):
    out = tmp_path / "stage_1"
    with atomic_output_folder(out, replace=True) as tmp:
        write_folder(tmp, "new")
    fsynced = [c[1] for c in disk_calls if c[0] == "fsync"]
    renamed = disk_calls.index(("rename", tmp, out))
    before = {Path(str(p).replace(".partial", "")) for p in fsynced[: renamed]}
    assert {out / "config.json", out / "sub" / "weights.bin", out / "sub", out} <= before
    assert disk_calls[renamed + 1:] == [("fsync", tmp_path)]  # the rename itself on disk


def test_a_swap_crashed_between_its_renames_is_recovered(tmp_path, monkeypatch):
    """The old folder, moved to stage_1.replaced by the first rename, is renamed back by the next writer or
    reader; the new folder's `.partial` is not trusted."""
    out = tmp_path / "stage_1"
    out.mkdir()
    write_folder(out, "old")
    crash_at(monkeypatch, "rename", 2)  # stage_1 -> stage_1.replaced, then stage_1.partial -> stage_1
    with pytest.raises(Crash):
        with atomic_output_folder(out, replace=True) as tmp:
            write_folder(tmp, "new")
    assert not out.exists() and (tmp_path / "stage_1.replaced").is_dir()  # the moment of the crash
    monkeypatch.undo()
    assert resolve_folder(out) == out  # a reader puts the old folder back
    assert (out / "config.json").read_text() == "old" and not (tmp_path / "stage_1.replaced").exists()

    crash_at(monkeypatch, "rename", 2)
    with pytest.raises(Crash):
        with atomic_output_folder(out, replace=True) as tmp:
            write_folder(tmp, "new")
    monkeypatch.undo()
    with atomic_output_folder(out, replace=True) as tmp:  # the next write recovers, then swaps
        write_folder(tmp, "newer")
    assert (out / "config.json").read_text() == "newer" and os.listdir(tmp_path) == ["stage_1"]


def test_a_swap_crashed_at_its_first_rename_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "stage_1"
    out.mkdir()
    write_folder(out, "old")
    crash_at(monkeypatch, "rename", 1)
    with pytest.raises(Crash):
        with atomic_output_folder(out, replace=True) as tmp:
            write_folder(tmp, "new")
    assert recover_swap(out) == out and (out / "config.json").read_text() == "old"


def test_line_log_syncs_its_lines_and_a_new_files_name(tmp_path, disk_calls):
    path = tmp_path / "metrics.jsonl"
    with LineLog(path) as log:
        assert disk_calls == [("fsync", tmp_path)]  # the new name
        log.write('{"micro_step": 1}\n')
        assert path.read_text() == '{"micro_step": 1}\n'  # line-buffered: a killed process loses no line
        log.sync()
        assert disk_calls[-1] == ("fsync", path)
    assert disk_calls[-1] == ("fsync", path)  # closing syncs too
    with LineLog(os.devnull) as log:  # other processes of a run write to /dev/null, which fsync refuses
        log.write("x\n")
        log.sync()


def failing(name: str, closed: list):
    def close():
        closed.append(name)
        raise OSError(f"{name} failed")
    return close


def test_close_all_runs_every_closer_and_raises_the_first_error():
    closed = []
    with pytest.raises(OSError, match="events failed") as err:
        close_all(lambda: closed.append("metrics"), failing("events", closed), failing("checkpoints", closed),
                  lambda: closed.append("last"))
    assert closed == ["metrics", "events", "checkpoints", "last"]  # none skipped
    assert err.value.__notes__ == ["also, while closing: OSError: checkpoints failed"]


def test_close_all_in_a_finally_keeps_the_error_that_stopped_the_run():
    closed = []

    def run():
        try:
            raise ValueError("the step failed")
        finally:
            close_all(failing("events", closed), lambda: closed.append("checkpoints"))

    with pytest.raises(ValueError, match="the step failed") as err:
        run()
    assert closed == ["events", "checkpoints"]
    assert err.value.__notes__ == ["also, while closing: OSError: events failed"]

    def finish():
        close_all(failing("events", closed))

    try:
        raise KeyError("handled by the caller")
    except KeyError:  # an exception handled outside the closing frame is not one to keep
        with pytest.raises(OSError, match="events failed"):
            finish()
