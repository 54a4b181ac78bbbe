"""Closing everything a run opened, whatever fails: `close_all` (the `finally` of `train.loop.train`)."""

from __future__ import annotations

import inspect
import sys
from types import FrameType
from typing import Callable


def close_all(*closers: Callable[[], object]) -> None:
    """Call every closer in order, also when one raises (the checkpointer's close, which waits for the
    save in flight, still runs when closing the event log failed). Called in a `finally`:

    - with an exception propagating through the caller, that exception stays the one raised and each
      closer's error is added to it as a note (a failing close never masks the first error);
    - otherwise the first closer's error is raised after all ran, the later ones added as notes."""
    pending = _propagating(inspect.currentframe().f_back)
    errors = []
    for close in closers:
        try:
            close()
        except BaseException as e:  # every closer runs; reported below
            errors.append(e)
    if not errors:
        return
    first = pending or errors[0]
    for e in errors:
        if e is not first:
            first.add_note(f"also, while closing: {type(e).__name__}: {e}")
    if pending is None:
        raise first


def _propagating(frame: FrameType | None) -> BaseException | None:
    """The exception propagating through `frame` (whose `finally` is running), or None: one that an outer
    `except` block is handling, which did not pass through `frame`, does not count."""
    error = sys.exc_info()[1]
    tb = error.__traceback__ if error is not None else None
    while tb is not None:
        if tb.tb_frame is frame:
            return error
        tb = tb.tb_next
    return None
