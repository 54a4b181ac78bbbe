"""JAX's persistent compilation cache for the commands (train.py, infer.py, the demo): XLA programs
compiled once are written to a folder and read back by the next run of the same shapes, so a re-run
or a resume starts without recompiling (bench/compile_cache.py measures it).

The folder is `$IVTLR_JAX_CACHE` when set, else `$XDG_CACHE_HOME/ivtlr_jax/xla` (`~/.cache/ivtlr_jax/xla`);
`IVTLR_JAX_CACHE=off` (or 0, false, no, none, or empty) turns it off. Where `JAX_COMPILATION_CACHE_DIR`
is set and `IVTLR_JAX_CACHE` is not, JAX's own setting is kept. Entries are keyed by the program, the
compile options, the devices and the jax/jaxlib versions, so a stale entry is never used; the folder
can be deleted or moved at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "IVTLR_JAX_CACHE"
OFF = ("", "0", "off", "false", "no", "none")
MIN_COMPILE_TIME_S = 0.0  # cache every program: the tiny models' programs compile in well under JAX's 1 s default
MIN_ENTRY_BYTES = 0


def cache_dir(environ=os.environ) -> Path | None:
    """The cache folder the environment asks for (None: off, or left to JAX_COMPILATION_CACHE_DIR)."""
    value = environ.get(ENV)
    if value is None:
        if environ.get("JAX_COMPILATION_CACHE_DIR"):
            return None
        base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "ivtlr_jax" / "xla"
    if value.strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def enable_compilation_cache(environ=os.environ, log=None) -> Path | None:
    """Turn the persistent cache on (call before the first compilation); -> its folder, or None when off.
    A folder that cannot be created leaves the cache off, with one line to `log`."""
    import jax

    folder = cache_dir(environ)
    if folder is None:
        if environ.get(ENV) is None and environ.get("JAX_COMPILATION_CACHE_DIR"):  # JAX's own setting
            _thresholds(jax)
            return Path(environ["JAX_COMPILATION_CACHE_DIR"])
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if log:
            log(f"compilation cache off: cannot create {folder} ({e}); set {ENV} to another folder or to off")
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    _thresholds(jax)
    return folder


def _thresholds(jax) -> None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_BYTES)
