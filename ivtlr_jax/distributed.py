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
at the same point; `same_everywhere(values)` refuses, on every process, values that differ between
processes (the resolved configuration, the fingerprints of the data and the base model), naming them.
`fail_together()` wraps a command-line entry point: an error in any process stops every process (a
watchdog thread ends the others, even inside a collective), process 0 prints it once and the others exit
with status 1 without printing.

Bounded waits (each one line on stderr and status 1, never JAX's abort):

- joining: a process that cannot reach the coordinator, or a process 0 that the others do not join,
  gives up after `IVTLR_JAX_INIT_TIMEOUT_S` seconds (default 120);
- a peer that dies (SIGKILL, the OOM killer, a lost host): every process publishes a heartbeat each
  second through the key-value store while inside `fail_together`; a process silent for
  `IVTLR_JAX_PEER_TIMEOUT_S` seconds (default 30) is named by every survivor, which then stops; when
  process 0 (which hosts the coordinator) dies, the others name it at once. JAX's own limits are set
  `JAX_SLACK_S` beyond these, so these speak first.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
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
ALIVE = f"{PREFIX}/alive/"  # one key per process: its heartbeat count
POLL_S = 0.2  # watchdog and blocking-get poll interval
HEARTBEAT_S = 1.0  # a process inside fail_together publishes a heartbeat this often
EXIT_GRACE_S = 10.0  # process 0 (the coordinator) waits this long for the others to stop before it exits
INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S = "IVTLR_JAX_INIT_TIMEOUT_S", 120  # joining the run
PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT_S = "IVTLR_JAX_PEER_TIMEOUT_S", 30  # a silent peer is dead after this
JAX_SLACK_S = 60  # JAX's own join and heartbeat limits lie this far beyond ours (it aborts the process)


class DistributedSetupError(RuntimeError):
    """The environment names a multi-process run incompletely or inconsistently."""


class DisagreementError(RuntimeError):
    """The processes of one run were started with different configurations or files."""


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


def timeout_setting(name: str, default: int) -> int:
    """A positive whole number of seconds from the environment variable `name` (default when unset)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    seconds = _int(value, name)
    if seconds < 1:
        raise DistributedSetupError(f"{name}={value!r} must be a positive number of seconds")
    return seconds


def initialize() -> bool:
    """Join the multi-process run the environment describes (once; later calls return the same answer),
    giving up with one line after `IVTLR_JAX_INIT_TIMEOUT_S` seconds. -> True when this is one process of
    several."""
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
    join_s, peer_s = timeout_setting(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S), peer_timeout_s()
    if jax.config.jax_cpu_collectives_implementation != "mpi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    with _give_up_after(join_s, _join_failure(address, count, pid, join_s)):
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid,
                                   initialization_timeout=join_s + JAX_SLACK_S,
                                   heartbeat_timeout_seconds=peer_s + JAX_SLACK_S)
    return jax.process_count() > 1


def peer_timeout_s() -> int:
    return timeout_setting(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT_S)


def _join_failure(address: str | None, count: int | None, pid: int | None, seconds: int) -> str:
    """The line a process that could not join within `seconds` prints."""
    where = f"the coordinator at {address}" if address else "the coordinator the cluster names"
    setting = f"({INIT_TIMEOUT_ENV}={seconds} s; raise it if hosts start slowly)"
    if pid == 0:
        return (f"error: process 0 of {count} waited {seconds} s at {where} and not every process joined; start "
                f"every process ({ID} 0..{count - 1}) with the same {ADDRESS} {setting}")
    me = "?" if pid is None else pid
    return (f"error: process {me} of {count or '?'} could not join the run within {seconds} s: "
            f"no answer from {where} (process 0); check that process 0 is running and that {ADDRESS} names its "
            f"host {setting}")


@contextlib.contextmanager
def _give_up_after(seconds: float, line: str):
    """Print `line` and exit with status 1 unless the block ends within `seconds` (JAX releases the
    interpreter while it connects, so the timer runs)."""
    timer = threading.Timer(seconds, lambda: _say_and_exit(line))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _say_and_exit(line: str, status: int = 1) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


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


def same_everywhere(values: dict[str, Any], what: str, tag: str = "same") -> None:
    """Refuse, on every process, `values` ({name: JSON value}) that are not the same on every process:
    DisagreementError naming each name that differs and which processes hold which value."""
    if jax.process_count() == 1:
        return
    mine = json.loads(json.dumps(values, default=str))  # as the others' arrive
    everyone = allgather_objects(mine, tag)
    differing = []
    for name in sorted(set().union(*everyone)):
        held = {}
        for p, theirs in enumerate(everyone):
            held.setdefault(json.dumps(theirs.get(name, "<absent>"), sort_keys=True), []).append(p)
        if len(held) > 1:
            differing.append(f"{name}: " + ", ".join(f"{value} on {_processes(ps)}" for value, ps in held.items()))
    if differing:
        raise DisagreementError(f"the processes were started with different {what}: " + "; ".join(differing)
                                + "; start every process with the same command, configuration and files")


def _processes(ps: list[int]) -> str:
    return f"process {ps[0]}" if len(ps) == 1 else "processes " + ", ".join(map(str, ps))


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


class Heartbeats:
    """This process's heartbeat (a count in the key-value store, raised every HEARTBEAT_S) and how long
    each other process's has stood still, on this process's clock (hosts' clocks need not agree)."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.count, self.due = timeout_s, 0, 0.0
        self.changed: dict[int, tuple[str | None, float]] = {}  # process -> (its last count, when it changed)

    def tick(self, now: float) -> int | None:
        """Publish and read the heartbeats when due. -> the first process silent for timeout_s, or None."""
        if now < self.due:
            return None
        self.due, self.count = now + HEARTBEAT_S, self.count + 1
        client, me = _client(), jax.process_index()
        client.key_value_set(f"{ALIVE}{me}", str(self.count), allow_overwrite=True)
        beats = {key.rsplit("/", 1)[1]: value for key, value in client.key_value_dir_get(ALIVE)}
        for p in range(jax.process_count()):
            if p != me and (p not in self.changed or self.changed[p][0] != beats.get(str(p))):
                self.changed[p] = (beats.get(str(p)), now)
        silent = [p for p, (_, since) in self.changed.items() if now - since >= self.timeout_s]
        return min(silent) if silent else None


def _watch(stop: threading.Event, heartbeats: Heartbeats) -> None:
    """Ends this process when another one has failed (this one may be waiting inside a collective), has
    stopped sending heartbeats, or (process 0, the coordinator) can no longer be reached."""
    me = jax.process_index()
    while not stop.wait(POLL_S):
        try:
            failed = [(p, m) for p, m in _failures() if p != me]
            silent = None if failed else heartbeats.tick(time.monotonic())
        except Exception:  # the coordinator cannot be reached: process 0 has ended
            failed, silent = [(0, "")], None
            if me != 0:
                _end_watched(_gone_line(me), alive=0)
        if failed and me == 0:
            if stop.wait(EXIT_GRACE_S / 4):  # this process may be failing the same way: its own message first
                return
        if failed:
            _end_watched(_peer_message(*failed[0]) if me == 0 else None, alive=jax.process_count())
        elif silent is not None:
            _end_watched(f"error: process {silent} stopped responding: no heartbeat for {heartbeats.timeout_s:g} s "
                         f"(killed, e.g. by the OOM killer, or its host is down); process {me} stops too",
                         alive=jax.process_count() - 1)


def _end_watched(line: str | None, alive: int) -> None:
    """The watchdog ends the process (unless the main thread already is): `line` printed, status 1."""
    if _ending.acquire(blocking=False):
        if line:
            print(line, file=sys.stderr, flush=True)
        _stopped(alive)
        os._exit(1)


def _coordinator_address() -> str:
    from jax._src import distributed as _distributed

    return str(_distributed.global_state.coordinator_address or os.environ.get(ADDRESS, "?"))


def _gone_line(me: int) -> str:
    return (f"error: process 0 (the coordinator at {_coordinator_address()}) is gone (killed, e.g. by the OOM "
            f"killer, or its host is down); process {me} stops too")


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
        return True
    except (OSError, ValueError):
        return False


_ABORT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


@contextlib.contextmanager
def _coordinator_loss_named():
    """JAX aborts a process (SIGABRT, after its own multi-line log) the moment its link to the coordinator
    breaks, before the watchdog can speak: when the coordinator cannot be reached, this process prints
    that process 0 is gone and exits with status 1 instead; any other abort goes on as usual. Process 0
    hosts the coordinator itself: nothing to do there."""
    if jax.process_index() == 0:
        yield
        return
    libc = ctypes.CDLL(None)
    libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, (ctypes.c_int, ctypes.c_void_p)
    me, address = jax.process_index(), _coordinator_address()

    def on_abort(signum):
        if not _reachable(address):
            if _ending.acquire(blocking=False):  # else the process is already ending, its message given
                os.write(2, (_gone_line(me) + "\n").encode())
            os._exit(1)
        libc.signal(signum, None)  # the default action: abort() raises the signal again

    handler = _ABORT_HANDLER(on_abort)
    previous = libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
    try:
        yield
    finally:
        libc.signal(signal.SIGABRT, previous)


def _peer_message(p: int, message: str) -> str:
    return f"error (process {p}): {message.removeprefix('error: ')}"


def _stopped(alive: int | None = None) -> None:
    """Process 0 hosts the coordinator: it waits (bounded) for the `alive` others (default: all) to stop
    before it exits."""
    alive = jax.process_count() if alive is None else alive
    with contextlib.suppress(Exception):
        client = _client()
        client.key_value_set(f"{PREFIX}/stopped/{jax.process_index()}", "1", allow_overwrite=True)
        if jax.process_index() == 0:
            deadline = time.time() + EXIT_GRACE_S
            while time.time() < deadline and len(client.key_value_dir_get(f"{PREFIX}/stopped/")) < alive:
                time.sleep(POLL_S)
    sys.stdout.flush()
    sys.stderr.flush()


@contextlib.contextmanager
def fail_together():
    """Wrap a command-line entry point (after `initialize`). With several processes, an exception or a
    non-zero `sys.exit` in any of them stops all of them: process 0 prints the message once (its own
    error as usual, or another process's), the others exit with status 1 silently. On success every
    process waits for the others to finish too (a later failure elsewhere still stops it with status 1).
    A process that dies (no heartbeat for IVTLR_JAX_PEER_TIMEOUT_S; process 0: the coordinator gone) is
    named by every other process, which exits with status 1. One process: no-op."""
    if jax.process_count() == 1:
        yield
        return
    stop, peer_s = threading.Event(), peer_timeout_s()
    threading.Thread(target=_watch, args=(stop, Heartbeats(peer_s)), daemon=True, name="ivtlr-peer-watch").start()
    with _coordinator_loss_named():
        try:
            yield
        except BaseException as e:  # noqa: B036 - every way out of the block ends every process
            _end_with(e, peer_s)
        try:
            allgather_objects("done", "finished")  # wait for the others; raises PeerFailure if one failed
        except PeerFailure as e:
            text = e.line()
            _fail("", lambda: print(text, file=sys.stderr), 1)
        stop.set()


def _end_with(e: BaseException, peer_s: float) -> None:
    """The block of `fail_together` raised `e`: a clean exit passes, anything else ends the process."""
    if isinstance(e, SystemExit):
        if e.code in (None, 0):
            return
        message = e.code if isinstance(e.code, str) else f"exit status {e.code}"
        _fail(message, lambda: print(message, file=sys.stderr), 1 if isinstance(e.code, str) else int(e.code))
    if isinstance(e, PeerFailure):  # another process failed first and published its message
        text = e.line()
        _fail("", lambda: print(text, file=sys.stderr), 1)
    if isinstance(e, jax.errors.JaxRuntimeError):  # perhaps a collective broken by a process that died:
        time.sleep(peer_s + 2 * HEARTBEAT_S)  # the watchdog names it (and ends this process) within this
    peers = _peer_failures()
    if peers:  # most likely a consequence (a collective broken by a process that failed first): report that one
        text = _peer_message(*peers[0])
        _fail("", lambda: print(text, file=sys.stderr), 1)
    _fail(f"{type(e).__name__}: {e}", traceback.print_exc, 1)


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
