"""A picture and a table of a training run: `python -m ivtlr_jax.report RUN_FOLDER [--out PNG]`.

Reads the run folder that `train.py` writes (`ivtlr_jax/train/loop.py`):

- `metrics.jsonl`: one JSON object per micro-step (`run_folder.MetricsRecord`: micro_step, epoch, stage,
  loss, grad_norm, tokens, tokens_per_s, latents, compilations, lr); non-finite values are written as null.
  Lines that do not parse (a torn last line of a crashed run) are skipped and counted.
- `config.yaml` (optional here): the run's name and model, for the title.
- `changes.jsonl` (optional): what resumes changed after a stop (`train.py --allow-change`, `--resume-from`,
  `--skip-batch`; `ivtlr_jax/train/run_changes.py`), listed one per line after the table.
- evaluations (optional): `stage_<s>/*.summary.json` (evaluations of stage s's export, `infer.py`'s
  default output) and `eval*.summary.json` in the run folder (e.g. `make demo`'s `eval_test`), whose stage
  is read from the evaluated model folder (`setup.model`, a `stage_<s>` folder).

Writes a PNG (default `RUN_FOLDER/report.png`) with three panels sharing the micro-step axis: training
loss, gradient norm (after the loss scale, before clipping) and throughput (supervised tokens, those
with a label, per second of the micro-step, as the trainer logs it), each raw and as a moving mean
restarted at every stage; stage boundaries are vertical lines labelled with the stage, its latents and
its accuracy where evaluated; null values are marked below the curves. Prints a per-stage table: stage,
epochs, micro-steps, final loss (mean loss of the stage's last epoch), mean tokens/s, accuracy where
evaluated.

Only numpy, PyYAML and matplotlib (Agg backend); no JAX, so it runs beside a training run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from .run_folder import METRICS_FILE, STAGE_PREFIX, MetricsRecord, RunFolder, stage_of_folder
from .train.run_changes import CHANGES_FILE, describe_change, read_changes

DEFAULT_SIZE = (1600, 1200)  # pixels of the PNG
DPI = 100
LOG_SCALE_RATIO = 20.0  # a panel's y axis is logarithmic when its positive values span more than this factor
BEST_LEGEND_MAX_POINTS = 5000  # matplotlib's "best" legend placement scans every point of every curve


class ReportError(RuntimeError):
    """A run folder that cannot be reported on (no metrics file, or no usable record in it)."""


# ---- reading ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Metrics:
    """The records of metrics.jsonl, one per micro-step, sorted by micro-step (the last record wins where a
    micro-step appears twice), as arrays; null values are NaN. `torn`: lines that did not parse."""

    micro_step: np.ndarray
    epoch: np.ndarray
    stage: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    tokens_per_s: np.ndarray
    latents: np.ndarray
    compilations: np.ndarray
    torn: int = 0

    def __len__(self) -> int:
        return len(self.micro_step)


def _number(value: float | None) -> float:
    """A float field of a record as a float; None -> NaN."""
    return math.nan if value is None else value


def metrics_from_records(records: list[MetricsRecord], torn: int = 0) -> Metrics:
    """Arrays of the records, sorted by micro-step, one per micro-step (the last record of a step wins)."""
    by_step = {r.micro_step: r for r in records}
    ordered = [by_step[s] for s in sorted(by_step)]
    column = lambda key: np.array([_number(getattr(r, key)) for r in ordered], np.float64)
    as_int = lambda key: np.array([getattr(r, key) for r in ordered], np.int64)
    return Metrics(micro_step=as_int("micro_step"), epoch=as_int("epoch"), stage=as_int("stage"),
                   loss=column("loss"), grad_norm=column("grad_norm"), tokens_per_s=column("tokens_per_s"),
                   latents=as_int("latents"), compilations=as_int("compilations"), torn=torn)


def read_metrics(run_dir: Path) -> Metrics:
    """The run folder's metrics.jsonl; ReportError naming the file when it is missing or holds no record."""
    run = RunFolder(run_dir)
    path = run.metrics_file
    if not path.is_file():
        raise ReportError(f"{path}: no such file (is {run_dir} a run folder of train.py? it writes {METRICS_FILE} "
                          "there from the first micro-step)")
    records, torn = run.read_metrics()
    records = [r for r in records if not r.skipped]  # steps `train.py --skip-batch` left untrained (changes.jsonl)
    if not records:
        raise ReportError(f"{path}: no metrics record in it ({torn} unparseable line(s))")
    return metrics_from_records(records, torn)


def read_run_config(run_dir: Path) -> dict:
    """config.yaml of the run as a plain dict ({} when missing or unreadable: it only names the run)."""
    import yaml

    try:
        config = yaml.safe_load(RunFolder(run_dir).config_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def evaluated_stage(summary_file: Path, summary: dict) -> int | None:
    """The stage whose export a summary evaluated: its own folder `stage_<s>`, or the `stage_<s>` folder
    its setup names as the model; None when neither says."""
    setup = summary.get("setup") if isinstance(summary.get("setup"), dict) else {}
    stages = (stage_of_folder(folder) for folder in (summary_file.parent, Path(str(setup.get("model", "")))))
    return next((stage for stage in stages if stage is not None), None)


def find_evaluations(run_dir: Path) -> tuple[dict[int, dict], list[Path]]:
    """({stage: summary} of the run's evaluations, summary files whose stage is unknown). Where a stage has
    several, the most recently written one is kept."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob(f"{STAGE_PREFIX}*/*.summary.json")) + list(run_dir.glob("eval*.summary.json"))
    found: dict[int, tuple[float, dict]] = {}
    unknown = []
    for path in files:
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            unknown.append(path)
            continue
        stage = evaluated_stage(path, summary if isinstance(summary, dict) else {})
        if stage is None or not isinstance(summary, dict):
            unknown.append(path)
            continue
        mtime = path.stat().st_mtime
        if stage not in found or mtime >= found[stage][0]:
            found[stage] = (mtime, dict(summary, file=str(path)))
    return {s: v[1] for s, v in found.items()}, sorted(unknown)


# ---- the table --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageRow:
    """One curriculum stage of the run, as far as it has trained."""

    stage: int
    epochs: list[int]
    micro_steps: int
    first_step: int
    last_step: int
    latents: int
    final_loss: float  # mean non-null loss of the stage's last (logged) epoch
    mean_tokens_per_s: float  # mean of the non-null tokens/s of the stage's micro-steps
    steady_tokens_per_s: float  # the same without the micro-steps that compiled a new shape
    null_losses: int
    accuracy_strict: float | None = None
    accuracy_official: float | None = None
    eval_examples: int | None = None


def compiling_steps(metrics: Metrics) -> np.ndarray:
    """Mask of the micro-steps that compiled a new shape (the compilation count grew): their time includes it."""
    return np.diff(np.concatenate([[0], metrics.compilations])) > 0


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def stage_rows(metrics: Metrics, evaluations: dict[int, dict] | None = None) -> list[StageRow]:
    """One row per stage present in the metrics, in stage order."""
    evaluations = evaluations or {}
    compiled = compiling_steps(metrics)
    rows = []
    for stage in np.unique(metrics.stage):
        sel = metrics.stage == stage
        epochs = sorted(int(e) for e in np.unique(metrics.epoch[sel]))
        last_epoch = sel & (metrics.epoch == epochs[-1])
        summary = evaluations.get(int(stage), {})
        rows.append(StageRow(
            stage=int(stage), epochs=epochs, micro_steps=int(sel.sum()),
            first_step=int(metrics.micro_step[sel].min()), last_step=int(metrics.micro_step[sel].max()),
            latents=int(metrics.latents[sel].max()), final_loss=_nanmean(metrics.loss[last_epoch]),
            mean_tokens_per_s=_nanmean(metrics.tokens_per_s[sel]),
            steady_tokens_per_s=_nanmean(metrics.tokens_per_s[sel & ~compiled]),
            null_losses=int(np.isnan(metrics.loss[sel]).sum()),
            accuracy_strict=summary.get("accuracy_strict"), accuracy_official=summary.get("accuracy_official"),
            eval_examples=summary.get("examples")))
    return rows


def _epochs_text(epochs: list[int]) -> str:
    """[3, 4, 5] -> "3-5"; a non-contiguous list is written out."""
    if epochs == list(range(epochs[0], epochs[-1] + 1)):
        return str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
    return ",".join(map(str, epochs))


def _float_text(value: float | None, fmt: str) -> str:
    """A table cell: the formatted number, or "-" for a missing or non-finite one."""
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


TABLE_NOTES = ("final loss: mean loss of the stage's last epoch; tokens/s: mean over the stage's micro-steps; "
               "steady tokens/s: the same without the micro-steps that compiled a new shape; acc: accuracy of the "
               "stage's export where evaluated")


def format_table(rows: list[StageRow]) -> str:
    """The per-stage table as aligned text."""
    header = ("stage", "latents", "epochs", "micro-steps", "final loss", "tokens/s", "steady tokens/s", "acc strict",
              "acc official", "eval examples")
    lines = [header]
    for r in rows:
        lines.append((str(r.stage), str(r.latents), _epochs_text(r.epochs), str(r.micro_steps),
                      _float_text(r.final_loss, ".4f"), _float_text(r.mean_tokens_per_s, ".0f"),
                      _float_text(r.steady_tokens_per_s, ".0f"),
                      _float_text(r.accuracy_strict, ".3f"), _float_text(r.accuracy_official, ".3f"),
                      "-" if r.eval_examples is None else str(r.eval_examples)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


# ---- the picture ------------------------------------------------------------------------------------------
def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the last `window` values, NaN-aware (NaN where the window holds no finite value)."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    n = counts[idx] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[idx] - sums[lo]) / np.maximum(n, 1), np.nan)


def smoothed_by_stage(metrics: Metrics, values: np.ndarray, window: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(micro-steps, moving mean)] of each stage: the mean restarts at every stage (a stage changes the
    task, so the loss level jumps), and the curves are drawn apart."""
    return [(metrics.micro_step[sel], moving_mean(values[sel], window))
            for sel in (metrics.stage == stage for stage in np.unique(metrics.stage))]


def smoothing_window(n: int) -> int:
    """Moving-mean window: about 2% of the run, between 1 and 200 micro-steps."""
    return int(min(max(n // 50, 1), 200))


def wants_log_scale(values: np.ndarray) -> bool:
    """Log scale when every finite value is positive and they span more than LOG_SCALE_RATIO."""
    finite = values[np.isfinite(values)]
    return bool(finite.size) and finite.min() > 0 and finite.max() / finite.min() > LOG_SCALE_RATIO


def legend_place(n: int) -> str:
    """Where the legends go: out of the curves' way ("best") unless that search would be slow (long runs)."""
    return "best" if n <= BEST_LEGEND_MAX_POINTS else "upper right"


def stage_label(row: StageRow) -> str:
    """The text above a stage: its number and epochs, its latents, its accuracy where evaluated."""
    latents = f"{row.latents} latent{'s' if row.latents != 1 else ''}"
    text = f"stage {row.stage} (epochs {_epochs_text(row.epochs)})\n{latents}"
    if row.accuracy_strict is not None:
        text += f"\naccuracy {row.accuracy_strict:.3f} (strict)"
    return text


def _draw_stages(axes, rows: list[StageRow], step_bounds: list[float]) -> None:
    """Vertical lines at the stage boundaries on every panel, shaded alternate stages, labels on the top one."""
    for i, row in enumerate(rows):
        start, end = step_bounds[i], step_bounds[i + 1]
        for ax in axes:
            if i % 2:
                ax.axvspan(start, end, color="0.94", zorder=0, lw=0)
            if i:
                ax.axvline(start, color="0.35", lw=1.0, ls="--", zorder=1)
        axes[0].text((start + end) / 2, 1.02, stage_label(row), transform=axes[0].get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=9, clip_on=False)


def _panel(ax, metrics: Metrics, values: np.ndarray, window: int, *, colour: str, label: str, ylabel: str,
           smooth_skip: np.ndarray | None = None, smooth_note: str = "", log_ok: bool = True) -> None:
    """Raw values (thin; with dots when unsmoothed, so that a value between two nulls shows), their moving
    mean by stage (thick; without the micro-steps of `smooth_skip`), and crosses under the curve where a
    value is null. The y axis is logarithmic when `log_ok` and the values span a wide range."""
    x = metrics.micro_step
    if window > 1:
        ax.plot(x, values, color=colour, alpha=0.3, lw=0.8, label=f"{label} per micro-step")
    else:
        ax.plot(x, values, color=colour, lw=1.5, marker=".", ms=6, label=f"{label} per micro-step")
    if window > 1:
        kept = values if smooth_skip is None else np.where(smooth_skip, np.nan, values)
        for i, (xs, ys) in enumerate(smoothed_by_stage(metrics, kept, window)):
            ax.plot(xs, ys, color=colour, lw=1.8,
                    label=None if i else f"moving mean ({window} micro-steps, per stage{smooth_note})")
    nulls = x[~np.isfinite(values)]
    if nulls.size:
        ax.plot(nulls, np.full(nulls.shape, 0.015), ls="none", marker="x", color="red", ms=7, mew=1.5,
                transform=ax.get_xaxis_transform(), clip_on=False, label=f"null (non-finite): {nulls.size}")
    if log_ok and wants_log_scale(values):
        ax.set_yscale("log")
        ylabel += " (log scale)"
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc=legend_place(len(metrics)), fontsize=8, framealpha=0.9)


def _mark_compilations(ax, metrics: Metrics) -> None:
    """Dots on the throughput curve at the micro-steps that compiled a new shape (their time includes it)."""
    new = compiling_steps(metrics)
    if new.any():
        ax.plot(metrics.micro_step[new], metrics.tokens_per_s[new], ls="none", marker="o", ms=4, color="black",
                label=f"new compilation ({int(metrics.compilations.max())} in all)")
        ax.legend(loc=legend_place(len(metrics)), fontsize=8, framealpha=0.9)


def plot_report(metrics: Metrics, rows: list[StageRow], out: Path, *, title: str = "",
                size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """Write the three-panel PNG (`size` in pixels) to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    window = smoothing_window(len(metrics))
    _panel(axes[0], metrics, metrics.loss, window, colour="tab:blue", label="loss", ylabel="training loss (nats/token)")
    _panel(axes[1], metrics, metrics.grad_norm, window, colour="tab:orange", label="gradient norm",
           ylabel="gradient norm (global L2)")
    _panel(axes[2], metrics, metrics.tokens_per_s, window, colour="tab:green", label="throughput",
           ylabel="throughput (supervised tokens/s)", smooth_skip=compiling_steps(metrics),
           smooth_note=", without compilations", log_ok=False)
    _mark_compilations(axes[2], metrics)
    bounds = [rows[0].first_step - 0.5] + [r.last_step + 0.5 for r in rows]
    _draw_stages(axes, rows, bounds)
    axes[-1].set_xlabel("micro-step")
    axes[-1].set_xlim(bounds[0], bounds[-1])
    fig.suptitle(title, fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


# ---- the command ------------------------------------------------------------------------------------------
def report_title(run_dir: Path, config: dict, metrics: Metrics) -> str:
    """The picture's title: run name, model, data and length."""
    model = (config.get("model") or {}).get("model_id", "") if isinstance(config.get("model"), dict) else ""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    parts = [f"run {config.get('name') or Path(run_dir).name}"]
    parts += [f"model {model}"] if model else []
    parts += [f"data {data.get('dataset')} ({data.get('source')})"] if data.get("dataset") else []
    parts.append(f"{len(metrics)} micro-steps")
    return " | ".join(parts)


def build_parser(prog: str = "ivtlr-report") -> argparse.ArgumentParser:
    """The command line: RUN_FOLDER [--out PNG] (`ivtlr-report`, or `python -m ivtlr_jax.report`)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_folder", metavar="RUN_FOLDER", help="a run folder of train.py (save_path/name)")
    p.add_argument("--out", metavar="PNG", default=None, help="the picture (default: RUN_FOLDER/report.png)")
    return p


def main(argv=None, prog: str = "ivtlr-report") -> int:
    """Print the per-stage table and write the PNG; exit with a message naming the file on a bad run folder."""
    args = build_parser(prog).parse_args(argv)
    run_dir = Path(args.run_folder)
    try:
        metrics = read_metrics(run_dir)
    except ReportError as e:
        sys.exit(f"error: {e}")
    evaluations, unknown = find_evaluations(run_dir)
    rows = stage_rows(metrics, evaluations)
    out = plot_report(metrics, rows, Path(args.out) if args.out else run_dir / "report.png",
                      title=report_title(run_dir, read_run_config(run_dir), metrics))
    print(f"{RunFolder(run_dir).metrics_file}: {len(metrics)} micro-steps, {metrics.torn} unparseable line(s) skipped, "
          f"{int(np.isnan(metrics.loss).sum())} null loss(es), {int(np.isnan(metrics.grad_norm).sum())} null "
          "gradient norm(s)")
    print(format_table(rows))
    print(TABLE_NOTES)
    for stage, summary in sorted(evaluations.items()):
        print(f"stage {stage} evaluated by {summary['file']}")
    for path in unknown:
        print(f"{path}: not attributed to a stage (unreadable, or its model is not a stage_<s> folder of this run)")
    for record in read_changes(run_dir):
        print(f"{CHANGES_FILE}: {describe_change(record)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
