"""Preemption: SIGTERM (a scheduler's notice) or SIGINT (Ctrl-C) stops training at the next micro-step
boundary with a checkpoint of that step (data position, optimizer state; the dropout keys derive from
the step), so that re-running the same command resumes exactly.

One process: Python handlers set a flag that the loop reads between micro-steps; later signals (a
second Ctrl-C while the checkpoint is written) are noted on stderr and do not interrupt the save.
Several processes (or any run under `jax.distributed.initialize`) must stop at the same step, so the
decision is JAX's preemption sync point (`jax.experimental.multihost_utils.reached_preemption_sync_point`,
asked at every micro-step): JAX's own SIGTERM notifier (installed by `jax.distributed.initialize`) tells
the coordination service, which picks the step at which every process stops; SIGINT is forwarded to it
as a SIGTERM to this process.
The handlers live as long as the `PreemptionWatch` context (the training loop of a `train()` call: before
it nothing new would be saved, so a signal during the set-up acts as usual) and are restored after.
"""

from __future__ import annotations

import os
import signal
import threading

PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL (sysexits.h): stopped on purpose, a re-run resumes
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint of micro-step `step` in `directory`."""

    def __init__(self, step: int, directory):
        super().__init__(f"preempted at micro-step {step}; saved checkpoint step {step} in {directory}; "
                         "re-run the same command to resume")
        self.step, self.directory = step, directory


def _sync_point_available() -> bool:
    """JAX's distributed client is up with its preemption sync manager (`jax.distributed.initialize`)."""
    from jax._src import distributed as jax_distributed  # where multihost_utils looks too

    state = jax_distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionWatch:
    """`with PreemptionWatch(several_processes) as watch:` ... `watch.requested(micro_step)` at every
    micro-step boundary (every process, every step). Outside the main thread no handler is installed
    (`requested`: the sync point alone, or never); several processes without JAX's preemption service
    (`jax_enable_preemption_service` off) keep the default signal handling, since they could not agree."""

    def __init__(self, several_processes: bool):
        self.signal_name: str | None = None  # the first signal received
        self._sync = _sync_point_available()  # (also one process under jax.distributed.initialize)
        self._handles = self._sync or not several_processes
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        if not self._handles or threading.current_thread() is not threading.main_thread():
            return self
        # with the sync point, SIGTERM stays with JAX's notifier (a Python handler would replace it); a
        # handler installed outside Python (getsignal: None) could not be put back, so it is left alone
        for sig in (signal.SIGINT,) if self._sync else SIGNALS:
            if signal.getsignal(sig) is not None:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal_name is not None:  # the checkpoint is being written: not interrupted
            os.write(2, f"{signal.Signals(signum).name} again: still stopping; the checkpoint is being "
                        "saved (kill -9 would lose this save, not the earlier ones)\n".encode())
            return
        self.signal_name = signal.Signals(signum).name
        if self._sync:
            os.kill(os.getpid(), signal.SIGTERM)  # through JAX's notifier, so that every process stops

    def requested(self, micro_step: int) -> bool:
        """Stop now, at `micro_step` (micro-steps done)? Several processes: the same answer on every one."""
        if self._sync:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(micro_step)
        return self.signal_name is not None
