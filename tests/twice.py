"""One command started twice at once (two train.py on one run folder, two infer.py on one output)."""

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_twice(command: list[str], timeout_s: float = 300) -> tuple[subprocess.Popen, str, subprocess.Popen]:
    """Start `command` twice together; wait for the first to end -> (it, its stderr, the other one, which
    must still be running: the first was refused while the other held the folder)."""
    procs = [subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    deadline = time.time() + timeout_s
    while all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    ended = next(p for p in procs if p.poll() is not None)
    other = next(p for p in procs if p is not ended)
    assert other.poll() is None, "both ended: neither was refused while the other ran"
    return ended, ended.communicate()[1], other
