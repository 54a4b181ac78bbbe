"""One command started twice at once (two train.py on one run folder, two infer.py on one output)."""

import os
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_twice(command: list[str], refusal: str, timeout_s: float = 300) -> subprocess.Popen:
    """Start `command` twice together: one must be refused while the other still runs, with status 2 and
    one line, `refusal` followed by the other's pid and host -> the other one."""
    procs = [subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    deadline = time.time() + timeout_s
    while all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    ended = next(p for p in procs if p.poll() is not None)
    other = next(p for p in procs if p is not ended)
    assert other.poll() is None, "both ended: neither was refused while the other ran"
    err = ended.communicate()[1]
    assert ended.returncode == 2 and len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert err.startswith(f"{refusal} is in use by process {other.pid} on host {socket.gethostname()} (since "), err
    return other
