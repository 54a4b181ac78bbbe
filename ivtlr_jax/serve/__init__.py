"""`ivtlr-serve`: a model folder over HTTP (OpenAI-compatible chat completions, a page to try it), on the
continuous-batching engine.

    from ivtlr_jax.predict import Predictor
    from ivtlr_jax.serve import serve
    serve(Predictor.from_folder("outputs/tiny/runs/tiny/stage_3"), port=8000)   # until SIGTERM / Ctrl-C

- `engine.py`: the engine thread (slots, the waiting queue, streaming tokens to each request);
- `openai_api.py`: the request and response shapes, checked without HTTP;
- `app.py`: the Starlette application (routes, errors, server-sent events, disconnects);
- `page.html`: the page at `/`.
"""

from __future__ import annotations

import signal

from ..predict import Predictor
from .app import make_app
from .engine import ServingEngine

__all__ = ["ServingEngine", "make_app", "serve", "server"]


def server(predictor: Predictor, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
           max_waiting: int = 64, chunk: int = 8, max_new_tokens: int | None = None, graceful_s: float = 30.0,
           model_name: str | None = None, log_level: str = "info"):
    """A uvicorn server (not yet running) whose first SIGTERM / Ctrl-C stops admitting before uvicorn's own
    graceful shutdown (requests in flight end within `graceful_s`, then are cancelled)."""
    import uvicorn

    engine = ServingEngine(predictor, slots=slots, max_waiting=max_waiting, chunk=chunk,
                           max_new_tokens=max_new_tokens)
    app = make_app(engine, model_name or predictor.folder.name)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's, but the process then exits 0 (it re-raises the signal)
            engine.drain()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for the requests in flight
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_s,
                            lifespan="on")
    return Server(config), engine


def serve(predictor: Predictor, **options) -> None:
    """Run the server until SIGTERM or Ctrl-C (`server`'s options); one line says how it ended."""
    srv, engine = server(predictor, **options)
    srv.run()
    counts = engine.load
    print(f"stopped: {counts['finished']} requests answered, {counts['cancelled']} cancelled by their clients, "
          f"{counts['failed']} failed", flush=True)
