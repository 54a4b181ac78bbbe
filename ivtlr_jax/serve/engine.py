"""The server's engine: one thread that owns the model and its decoding slots (`continuous.SlotEngine`) and
serves requests as they arrive.

Each turn of its loop: start the waiting requests, one at a time (each alone, so a greedy answer is the one
`ivtlr_generate` gives the request alone, whatever else is in flight), into the free slots; decode every live
slot for up to `chunk` steps (fewer when a slot frees and requests wait); hand each request its new tokens;
free the slots of finished and cancelled requests. Requests beyond the slots wait in a queue of at most
`max_waiting` (`submit` refuses more: `Busy`). `drain` stops admitting and lets the requests in flight end;
`close` also cancels them.

A request's events go to its `Ticket` (thread-safe; the HTTP side reads them on its event loop):
`("started", {selected patches ...})`, then `("tokens", [ids so far])` after each turn, then
`("done", Answer)`, or `("error", message)`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..continuous import SlotEngine
from ..decoding import RowSampling, SamplingConfig
from ..predict import Encoded, Predictor


class Busy(RuntimeError):
    """No room: the waiting queue is full, or the server is shutting down."""


@dataclasses.dataclass
class Ticket:
    """One request: what to generate, and the queue its events go to (on the HTTP side's event loop)."""
    encoded: Encoded
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # wants its tokens after every turn (else only the answer)
    cancelled: bool = False
    selected: Any = None  # [c, K] selected positions of its prompt, once started
    tokens_sent: int = 0  # the tokens already sent in "tokens" events

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class ServingEngine:
    """Continuous batching for the server (module docstring)."""

    def __init__(self, predictor: Predictor, *, slots: int = 8, max_waiting: int = 64, chunk: int = 8,
                 max_new_tokens: int | None = None):
        self.predictor = predictor
        self.max_new_tokens = max_new_tokens or predictor.settings.max_new_tokens
        self.greedy = predictor.sampling(self.max_new_tokens)
        self.sampled = predictor.sampling(self.max_new_tokens, temperature=1.0)  # compiles sampling in
        self.slots, self.max_waiting, self.chunk = slots, max_waiting, chunk
        self.engine = SlotEngine(predictor.model, predictor.latent, self.greedy, slots, predictor.rules)
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.lock = threading.Condition()
        self.admitting, self.stopped = True, False
        self.seeds = itertools.count()
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}  # requests ended, by how
        self.thread = threading.Thread(target=self._loop, name="ivtlr-engine", daemon=True)

    def start(self) -> "ServingEngine":
        self.thread.start()
        return self

    # ---- the HTTP side ------------------------------------------------------------------------------
    def submit(self, ticket: Ticket) -> None:
        """Queue a request; Busy when the queue is full or the server no longer admits."""
        with self.lock:
            if not self.admitting:
                raise Busy("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are waiting (the most this server queues)")
            self.waiting.append(ticket)
            self.lock.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: its slot (or place in the queue) is freed at the next turn."""
        with self.lock:
            ticket.cancelled = True
            self.lock.notify()

    def drain(self) -> None:
        """Stop admitting; the requests in flight and waiting still end."""
        with self.lock:
            self.admitting = False
            self.lock.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Stop: cancel whatever has not ended, and wait for the loop to exit."""
        with self.lock:
            self.admitting, self.stopped = False, True
            self.lock.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def running(self) -> dict[int, Ticket]:
        """slot -> the request in it (the slot engine's owners: each started request is its slot's tag)."""
        return self.engine.owner

    def next_seed(self) -> int:
        return next(self.seeds)

    @property
    def load(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.slots,
                "max_waiting": self.max_waiting, "admitting": self.admitting, **self.counts}

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.running or self.stopped):
                    self.lock.wait()
                if self.stopped:
                    break
                admitted = self._take_admissible()
            for ticket in admitted:
                self._start(ticket)
            self._drop_cancelled()
            if self.running:
                try:
                    self._decode_turn()
                except Exception as err:  # noqa: BLE001 - fail the requests in flight, keep serving
                    self._fail_running(f"generation failed: {type(err).__name__}: {err}")
        for ticket in list(self.running.values()) + list(self.waiting):
            ticket.send("error", "the server shut down before this request finished")

    def _take_admissible(self) -> list[Ticket]:
        """The waiting requests that fit in the free slots (cancelled ones dropped); under the lock."""
        taken = []
        while self.waiting and len(self.running) + len(taken) < self.slots:
            ticket = self.waiting.popleft()
            if ticket.cancelled:
                self.counts["cancelled"] += 1
            else:
                taken.append(ticket)
        return taken

    def _start(self, ticket: Ticket) -> None:
        """Prefill and latent passes of one request, alone, into a free slot."""
        try:
            rows = RowSampling(jax.random.key(ticket.seed)[None], jnp.asarray([ticket.temperature], jnp.float32),
                               jnp.asarray([ticket.top_p], jnp.float32))
            [ready] = self.engine.start([ticket], [ticket.encoded.prompt], rows, self._sampling([ticket]))
            self.engine.insert(ready)  # the ticket is its slot's owner from now on (`running`)
        except Exception as err:  # noqa: BLE001 - one bad request never stops the server
            self.counts["failed"] += 1
            ticket.send("error", f"generation failed: {type(err).__name__}: {err}")
            return
        ticket.selected = ready.selected
        steps, grid = self.predictor.patches(ticket.encoded, ready.selected)
        ticket.send("started", {"selected_patches": steps, "patch_grid": list(grid), "latents": len(steps),
                                "prompt_tokens": ticket.encoded.prompt_tokens})

    def _sampling(self, tickets) -> SamplingConfig:
        """Greedy decoding compiled alone while no request samples (no sort over the vocabulary per step)."""
        return self.sampled if any(t.temperature > 0 for t in tickets) else self.greedy

    def _decode_turn(self) -> None:
        # the slots that finished leave `running` here
        finished = dict(self.engine.run(max_steps=self.chunk, stop_when_freed=bool(self.waiting),
                                        sampling=self._sampling(self.running.values())))
        state = self.engine.state
        tokens, counts, lengths = np.asarray(state.tokens), np.asarray(state.count), np.asarray(state.lengths)
        for slot, ticket in [*finished.items(), *self.running.items()]:
            count = int(counts[slot])
            if slot not in finished and count < ticket.max_tokens:
                if ticket.stream and count > ticket.tokens_sent:  # only the new tokens
                    ticket.send("tokens", [int(t) for t in tokens[slot][ticket.tokens_sent:count]])
                    ticket.tokens_sent = count
                continue
            if slot not in finished:  # reached the request's own max_tokens: free the slot now
                self.engine.release(slot)
            length = min(int(lengths[slot]), ticket.max_tokens)
            self.counts["finished"] += 1
            ticket.send("done", self.predictor.answer_of(ticket.encoded, tokens[slot][:ticket.max_tokens], length,
                                                         ticket.selected, self.predictor.sampling(ticket.max_tokens)))

    def _fail_running(self, message: str) -> None:
        """Every request in flight gets `message`; the slots start afresh."""
        for ticket in self.running.values():
            self.counts["failed"] += 1
            ticket.send("error", message)
        self.engine = SlotEngine(self.predictor.model, self.predictor.latent, self.greedy, self.slots,
                                 self.predictor.rules)

    def _drop_cancelled(self) -> None:
        for slot, ticket in list(self.running.items()):
            if ticket.cancelled:
                self.engine.release(slot)
                self.counts["cancelled"] += 1
