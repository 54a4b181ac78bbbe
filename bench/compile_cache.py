"""Cold start vs warm re-run of the same tiny training command with JAX's persistent compilation cache
(ivtlr_jax/compilation_cache.py): two subprocesses of `train.py` share a fresh, empty cache folder; the
first compiles and fills it, the second reads it back.

    python bench/compile_cache.py [--steps 4] [--keep DIR]

The command trains the demo's tiny Qwen2-VL (`configs/tiny.yaml`, generated here in a temporary folder)
for `--steps` micro-batches over two curriculum stages (one epoch each, so the step compiles twice: no
latents, then one latent pass) and exports both stages. Each run writes a run folder of its own (only
`name=` differs, which no compiled program depends on). Printed per run: wall time of the process,
and the time of the micro-steps that compiled (from metrics.jsonl: tokens / tokens_per_s of the steps
where the compilation count grew); then warm / cold ratios and the cache's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ivtlr_jax.run_folder import RunFolder  # noqa: E402


def compiling_steps_time(run_dir: Path) -> tuple[float, int]:
    """(seconds, count) of the micro-steps whose metrics record shows a new compilation."""
    seconds, count, seen = 0.0, 0, 0
    for record in RunFolder(run_dir).read_metrics()[0]:
        if record.compilations > seen and record.tokens_per_s:
            seconds += record.tokens / record.tokens_per_s
            count += 1
        seen = max(seen, record.compilations)
    return seconds, count


def run(config: Path, name: str, steps: int, cache: Path) -> dict:
    env = dict(os.environ, IVTLR_JAX_CACHE=str(cache), PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--max-steps", str(steps),
               f"name={name}"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    run_dir = Path(yaml.safe_load(config.read_text())["save_path"]) / name
    compile_s, compiles = compiling_steps_time(run_dir)
    return {"wall_s": wall, "compile_steps_s": compile_s, "compiles": compiles}


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="micro-batches per run (default 4: 2 per stage)")
    p.add_argument("--rows", type=int, default=32, help="training rows (default 32: 2 micro-batches of 16)")
    p.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)

    from ivtlr_jax.demo import prepare

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="compile_cache_"))
    try:
        assets, cache = work / "assets", work / "xla-cache"
        if cache.exists():
            shutil.rmtree(cache)
        if not (assets / "model" / "config.json").exists():
            prepare(assets, seed=0, num_train=args.rows, num_test=4)
        cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        cfg["save_path"] = str(work / "runs")
        cfg["model"]["model_id"] = str(assets / "model")
        cfg["data"].update(source=str(assets / "data"), limit=args.rows)
        cfg["curriculum"]["epochs_per_stage"] = 1
        cfg["train"]["num_epochs"] = 2
        config = work / "tiny_bench.yaml"
        config.write_text(yaml.safe_dump(cfg))
        shutil.rmtree(work / "runs", ignore_errors=True)

        command = f"python train.py --config {config.name} --max-steps {args.steps} (tiny Qwen2-VL, 2 stages)"
        print(f"command: {command}; fresh cache {cache}")
        cold = run(config, "cold", args.steps, cache)
        entries, size = folder_size(cache)
        warm = run(config, "warm", args.steps, cache)
        for label, r in (("cold (empty cache)", cold), ("warm (re-run)", warm)):
            print(f"{label:20s} wall {r['wall_s']:7.1f} s | micro-steps that compiled: {r['compiles']}, "
                  f"{r['compile_steps_s']:6.1f} s")
        wall, steps = warm["wall_s"] / cold["wall_s"], warm["compile_steps_s"] / cold["compile_steps_s"]
        print(f"warm / cold: wall {wall:.2f} (cold is {1 / wall:.2f}x the warm run), compiling micro-steps "
              f"{steps:.2f} (cold is {1 / steps:.1f}x)")
        print(f"cache after the cold run: {entries} files, {size / 2**20:.1f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
