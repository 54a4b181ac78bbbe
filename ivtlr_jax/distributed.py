"""Multi-process runs on JAX's multi-controller runtime (one process per host, or several per host).

Start-up (`initialize`, called by `train.loop.train` and `eval.run.evaluate`; a no-op for one process):

- `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` name the
  run explicitly (all three, or the ones a detected cluster does not supply);
- otherwise a cluster that JAX detects by itself (SLURM `srun` with more than one task, Open MPI
  `mpirun`) fills them in;
- neither: one process, nothing initialised.

On CPU the cross-process collectives go through gloo (`jax_cpu_collectives_implementation`), so that
the multi-process tests run on one machine with host devices.

Host-level exchange (small Python objects: row counts, messages, evaluation records) goes through the
coordinator's key-value store (`allgather_objects`, `broadcast_object`, `on_writer`, `agree`), not through
device collectives; every process must call these in the same order (each call takes the next key). The
store is reached through `jax._src.distributed.global_state.client`, as `jax.experimental.multihost_utils`
and orbax do (no public accessor in jax 0.10).

Failures: `agree(fn)` runs a check on every process and raises the same error everywhere when one of
them failed (the run-folder and configuration checks, the images of a batch), so all processes stop
at the same point. `fail_together()` wraps a command-line entry point: an error in any process stops
every process (a watchdog thread ends the others, even inside a collective), process 0 prints it once
and the others exit with status 1 without printing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np

ADDRESS, COUNT, ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
PREFIX = "ivtlr_jax"  # key-value store namespace
FAILED = f"{PREFIX}/failed/"  # one key per failed process: its message
POLL_S = 0.2  # watchdog and blocking-get poll interval
EXIT_GRACE_S = 10.0  # process 0 (the coordinator) waits this long for the others to stop before it exits


class DistributedSetupError(RuntimeError):
    """The environment names a multi-process run incompletely or inconsistently."""


class PeerFailure(RuntimeError):
    """Another process failed; this one stops too (its message is printed by process 0)."""

    def __init__(self, process: int, message: str):
        super().__init__(f"process {process} failed: {message}")
        self.process, self.message = process, message

    def line(self) -> str:
        """The one line process 0 prints."""
        return _peer_message(self.process, self.message)


def _cluster() -> str | None:
    """A multi-process cluster environment that `jax.distributed.initialize()` detects by itself."""
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _int(env.get("OMPI_COMM_WORLD_SIZE", "1"), "OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    return None


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


def initialize() -> bool:
    """Join the multi-process run the environment describes (once; later calls return the same answer).
    -> True when this is one process of several."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    env = os.environ
    address = env.get(ADDRESS) or None
    count = _int(env[COUNT], COUNT) if env.get(COUNT) else None
    pid = _int(env[ID], ID) if env.get(ID) else None
    cluster = _cluster()
    if address is None and count is None and pid is None and cluster is None:
        return False
    if cluster is None:
        missing = [name for name, v in ((ADDRESS, address), (COUNT, count), (ID, pid)) if v is None]
        if missing:
            raise DistributedSetupError(
                f"a multi-process run needs {ADDRESS}, {COUNT} and {ID} (or a SLURM / Open MPI launch); "
                f"{', '.join(missing)} not set")
        if count == 1:
            return False
        if not 0 <= pid < count:
            raise DistributedSetupError(f"{ID}={pid} is outside 0..{count - 1} ({COUNT}={count})")
    if jax.config.jax_cpu_collectives_implementation != "mpi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid)
    return jax.process_count() > 1


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """Process 0 writes the run folder's and the evaluation's files."""
    return jax.process_index() == 0


# ---- host-level exchange through the coordinator's key-value store ----------------------------------------
_calls = {"n": 0}


def _client():
    from jax._src import distributed as _distributed  # the runtime client jax.distributed.initialize made

    client = _distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised")
    return client


def _next_key(tag: str) -> str:
    _calls["n"] += 1
    return f"{PREFIX}/{tag}/{_calls['n']}"


def _check_peers() -> None:
    failed = _failures()
    if failed:
        raise PeerFailure(*failed[0])


def _failures() -> list[tuple[int, str]]:
    out = []
    for key, value in _client().key_value_dir_get(FAILED):
        try:
            out.append((int(key.rsplit("/", 1)[1]), value))
        except ValueError:
            continue
    return sorted(out)


def _get(key: str) -> str:
    """A key's value, waiting for it (and stopping with `PeerFailure` when a process has failed)."""
    client = _client()
    while True:
        try:
            return client.blocking_key_value_get(key, int(POLL_S * 1000 * 5))
        except Exception as e:  # a timeout: has a process failed meanwhile?
            if "DEADLINE_EXCEEDED" not in str(e) and "deadline" not in str(e).lower():
                raise
            _check_peers()


def allgather_objects(value: Any, tag: str = "gather") -> list:
    """[the JSON-serialisable `value` of process 0, of process 1, ...] on every process."""
    if jax.process_count() == 1:
        return [value]
    key = _next_key(tag)
    _client().key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    return [json.loads(_get(f"{key}/{p}")) for p in range(jax.process_count())]


def broadcast_object(value: Any = None, tag: str = "broadcast") -> Any:
    """Process 0's `value` (JSON-serialisable) on every process; the others' argument is ignored."""
    if jax.process_count() == 1:
        return value
    key = _next_key(tag)
    if jax.process_index() == 0:
        _client().key_value_set(key, json.dumps(value))
        return value
    return json.loads(_get(key))


def agree(fn: Callable[[], Any], tag: str = "agree") -> Any:
    """`fn()` on every process; when it raised on any process, every process raises the first failing
    process's error (the same exception type when it can be rebuilt from its message, else RuntimeError),
    so all stop at the same point. -> fn's result."""
    try:
        result, error = fn(), None
    except Exception as e:  # exchanged, then re-raised here (or the first one's, everywhere)
        result, error = None, e
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return result
    status = allgather_objects(None if error is None else [type(error).__name__, str(error)], tag)
    failed = [(p, s) for p, s in enumerate(status) if s is not None]
    if not failed:
        return result
    if error is not None and failed[0][0] == jax.process_index():
        raise error
    p, (name, message) = failed[0]
    if error is not None and type(error).__name__ == name:
        raise type(error)(message) from error
    raise PeerFailure(p, f"{name}: {message}")


def on_writer(fn: Callable[[], Any], tag: str = "writer", errors: tuple[type[Exception], ...] = ()) -> Any:
    """`fn()` run by process 0 alone (it reads or writes files that only it keeps), its JSON-serialisable
    result handed to every process. When it raises, process 0 raises it and the others raise the same
    type if it is one of `errors` (rebuilt from its message), else `PeerFailure`."""
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:
            broadcast_object({"error": [type(e).__name__, str(e)]}, tag)
            raise
        return broadcast_object({"result": result}, tag)["result"]
    shared = broadcast_object(None, tag)
    if "error" in shared:
        name, message = shared["error"]
        rebuilt = next((t for t in errors if t.__name__ == name), None)
        raise rebuilt(message) if rebuilt else PeerFailure(0, f"{name}: {message}")
    return shared["result"]


def barrier(tag: str = "barrier", timeout_s: int = 3600) -> None:
    if jax.process_count() > 1:
        _client().wait_at_barrier(_next_key(tag).replace("/", "_"), timeout_s * 1000)


def fetch(x) -> np.ndarray:
    """A jax.Array's whole value on this host: directly when this process holds all of it (one process,
    or a replicated array), else gathered from the other processes (one array at a time)."""
    if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- stopping together -------------------------------------------------------------------------------------
_ending = threading.Lock()  # the first path that ends the process (main thread or watchdog) prints


def _publish_failure(message: str) -> None:
    with contextlib.suppress(Exception):
        _client().key_value_set(f"{FAILED}{jax.process_index()}", message or "failed", allow_overwrite=True)


def _peer_failures() -> list[tuple[int, str]]:
    """The failures other processes have published, or [] (also when the coordinator cannot be reached)."""
    with contextlib.suppress(Exception):
        return [(p, m) for p, m in _failures() if p != jax.process_index()]
    return []


def _watch(stop: threading.Event) -> None:
    """Ends this process when another one has failed (this one may be waiting inside a collective)."""
    me = jax.process_index()
    while not stop.wait(POLL_S):
        try:
            failed = [(p, m) for p, m in _failures() if p != me]
        except Exception:  # the coordinator is gone: process 0 has ended
            failed = [(0, "")]
        if failed and me == 0:
            if stop.wait(EXIT_GRACE_S / 4):  # this process may be failing the same way: its own message first
                return
        if failed and _ending.acquire(blocking=False):
            p, message = failed[0]
            if me == 0:
                print(_peer_message(p, message), file=sys.stderr, flush=True)
            _stopped()
            os._exit(1)


def _peer_message(p: int, message: str) -> str:
    return f"error (process {p}): {message.removeprefix('error: ')}"


def _stopped() -> None:
    """Process 0 hosts the coordinator: it waits (bounded) for the others to stop before it exits."""
    with contextlib.suppress(Exception):
        client = _client()
        client.key_value_set(f"{PREFIX}/stopped/{jax.process_index()}", "1", allow_overwrite=True)
        if jax.process_index() == 0:
            deadline = time.time() + EXIT_GRACE_S
            while time.time() < deadline and len(client.key_value_dir_get(f"{PREFIX}/stopped/")) < jax.process_count():
                time.sleep(POLL_S)
    sys.stdout.flush()
    sys.stderr.flush()


@contextlib.contextmanager
def fail_together():
    """Wrap a command-line entry point (after `initialize`). With several processes, an exception or a
    non-zero `sys.exit` in any of them stops all of them: process 0 prints the message once (its own
    error as usual, or another process's), the others exit with status 1 silently. On success every
    process waits for the others to finish too (a later failure elsewhere still stops it with status 1).
    One process: no-op."""
    if jax.process_count() == 1:
        yield
        return
    stop = threading.Event()
    threading.Thread(target=_watch, args=(stop,), daemon=True, name="ivtlr-peer-watch").start()
    try:
        yield
    except SystemExit as e:
        if e.code not in (None, 0):
            message = e.code if isinstance(e.code, str) else f"exit status {e.code}"
            _fail(message, lambda: print(message, file=sys.stderr), 1 if isinstance(e.code, str) else int(e.code))
    except PeerFailure as e:  # another process failed first and published its message
        text = e.line()
        _fail("", lambda: print(text, file=sys.stderr), 1)
    except BaseException as e:
        peers = _peer_failures()
        if peers:  # most likely a consequence (a collective broken by a process that failed first): report that one
            text = _peer_message(*peers[0])
            _fail("", lambda: print(text, file=sys.stderr), 1)
        _fail(f"{type(e).__name__}: {e}", traceback.print_exc, 1)
    try:
        allgather_objects("done", "finished")  # wait for the others; raises PeerFailure if one failed
    except PeerFailure as e:
        text = e.line()
        _fail("", lambda: print(text, file=sys.stderr), 1)
    stop.set()


def _fail(message: str, show: Callable[[], None], status: int) -> None:
    """Publish `message` (when this process's own failure), print on process 0, exit without JAX's
    shutdown barrier (the others may never reach it)."""
    if not _ending.acquire(blocking=False):  # the watchdog is already ending the process
        threading.Event().wait()
    if message:
        _publish_failure(message)
    if jax.process_index() == 0:
        show()
    _stopped()
    os._exit(status)
