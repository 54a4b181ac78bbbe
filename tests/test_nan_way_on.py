"""The ways on after a non-finite stop (issue #27 item 4): `train.py` names them; --allow-change lets the
learning rate differ on resume and records it, --resume-from goes back to an older checkpoint with the later
ones set aside (not deleted), --skip-batch leaves the offending optimizer step untrained; the report lists
the changes. Refused flags change nothing."""

import json
import os
import re
import subprocess
import sys

import yaml

from ivtlr_jax.demo import prepare
from tests.test_train_loop import ROOT, assert_metrics_once_per_step, folder_state, write_config



def train_command(cfg_path, *args) -> subprocess.CompletedProcess:
    """`python train.py --config cfg_path args...`, the command a user types."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_a_run_stopped_by_a_nan_goes_on_with_a_lower_lr_from_an_older_checkpoint(tmp_path):
    """The learning rate warms up from 0 to 1e30 over 2 optimizer steps (2 micro-batches each): checkpoint 2 is
    the untouched start, checkpoint 4 holds parameters near 5e29 (finite: saved), and micro-step 5 overflows.
    One epoch of 6 micro-steps (one stage): the ways on all act inside it, and the resumed run ends it."""
    assets = tmp_path / "assets"
    prepare(assets, seed=1, num_train=24, num_test=4)
    cfg_path = write_config(tmp_path, assets, "diverged", optim={"lr": 1e30, "warmup_steps": 2},
                            train={"num_epochs": 1})
    run_dir = tmp_path / "runs" / "diverged"

    line = error_line(train_command(cfg_path))
    assert line.startswith("error: non-finite training state at stage 0, epoch 0, micro-step 5 "), line
    sizes = dict(re.findall(r"step (\d+): gradient norm [^,]+, largest parameter ([0-9.e+-]+)", line))
    assert set(sizes) == {"2", "4"} and float(sizes["2"]) < 10 and float(sizes["4"]) > 1e20, line
    for way in ("optim.lr=<lower> --allow-change optim.lr", "--resume-from <step>", f"{run_dir / 'set_aside'}",
                "--skip-batch 5 to leave the optimizer step of micro-steps 5-6 untrained"):
        assert way in line, (way, line)

    before = folder_state(run_dir)
    line = error_line(train_command(cfg_path, "optim.lr=1e-3"))  # a change without the flag: refused
    assert "optim.lr: 1e+30 in the run, 0.001 now" in line and "add --allow-change optim.lr" in line, line
    line = error_line(train_command(cfg_path, "seed=4", "--allow-change", "seed"))
    assert line.startswith("error: --allow-change seed: only optim.lr, ") and "may change" in line, line
    line = error_line(train_command(cfg_path, "--resume-from", "3"))
    assert line == f"error: --resume-from 3: {run_dir / 'checkpoints'} holds no checkpoint step 3 (its steps: 2, 4)"
    assert folder_state(run_dir) == before  # nothing changed by the refusals

    done = train_command(cfg_path, "optim.lr=1e-3", "--allow-change", "optim.lr", "--resume-from", "2",
                         "--skip-batch", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the run is complete at 6 of 6" in done.stdout
    [aside] = (run_dir / "set_aside").iterdir()  # what lay after step 2, kept
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["4"]
    assert [json.loads(x)["micro_step"] for x in (aside / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    changes = [json.loads(x) for x in (run_dir / "changes.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in c.items() if k != "time"} for c in changes] == [
        {"micro_step": 2, "change": "config", "key": "optim.lr", "old": 1e30, "new": 1e-3},
        {"micro_step": 2, "change": "skip", "first": 3, "last": 4},
        {"micro_step": 2, "change": "resume_from", "step": 2, "set_aside": str(aside)}]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    records = assert_metrics_once_per_step(run_dir / "metrics.jsonl", 6)
    assert [r["micro_step"] for r in records if r.get("skipped")] == [3, 4]
    assert all(r["loss"] is not None and r["loss"] < 100 for r in records if not r.get("skipped"))
    assert (run_dir / "stage_0" / "config.json").is_file()  # the run's one stage, exported

    report = subprocess.run([sys.executable, "-m", "ivtlr_jax.report", str(run_dir)], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "changes.jsonl: micro-step 2: optim.lr 1e+30 -> 0.001" in report.stdout
    assert "changes.jsonl: micro-step 2: skipped micro-steps 3-4 (one optimizer step)" in report.stdout
