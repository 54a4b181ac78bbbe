"""Multi-process runs on JAX's multi-controller runtime, on one machine: 2 processes x 2 host CPU devices
on 127.0.0.1 (gloo collectives) against 1 process x 4 devices (this test process).

- training: the stage exports of a 2-process run equal the 1-process run's (max abs diff <= 1e-5), each
  process decoding only its half of every batch; both processes killed with SIGKILL mid-run and launched
  again resume exactly (exports equal to the uninterrupted 2-process run's, metrics once per step);
- a failure in one process stops both, its message printed once (by process 0);
- evaluation: 2 processes, resuming an output begun by a 1-process run, write the 1-process records.

Kept small (8 training rows, 4 micro-steps over 2 stages, 6 test rows): the processes share a
persistent compilation cache, so the relaunches compile nothing."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ivtlr_jax.config import load_config
from ivtlr_jax.demo import prepare
from ivtlr_jax.eval.run import EvalConfig, evaluate, setup_path
from ivtlr_jax.train.loop import train
from tests.test_train_loop import assert_metrics_once_per_step, export_tensors, write_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
pytestmark = pytest.mark.xdist_group("multihost")
quiet = lambda *_: None
STEPS = 4  # 8 rows / (1 row x 4 devices) = 2 micro-batches per epoch, 2 epochs (stages 0 and 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args_of, tmp: Path, env_extra=None) -> list[subprocess.Popen]:
    """Start 2 processes (`args_of(i)`: the worker's arguments for process i) of one run."""
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                   **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args_of(i)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=400) -> list[tuple[int, str, str]]:
    """(status, stdout, stderr) of each process."""
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout, stderr))
    return out


def printed(text: str) -> str:
    """What the program printed (gloo's connection lines left out)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("[Gloo]"))


def run_ok(args_of, tmp: Path, env_extra=None) -> list[tuple[int, str, str]]:
    results = finish(launch(args_of, tmp, env_extra))
    for i, (status, stdout, stderr) in enumerate(results):
        assert status == 0, f"process {i} failed ({status}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return results


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_assets")
    prepare(root, seed=1, num_train=8, num_test=6)
    return root


def config(tmp: Path, assets: Path, name: str) -> Path:
    """The tiny run: 2 stages of 1 epoch, LoRA with dropout, a checkpoint every micro-step."""
    return write_config(tmp, assets, name, curriculum={"epochs_per_stage": 1, "max_latent_stage": 1},
                        data={"length_buckets": [256, 384], "prefix_buckets": [192, 256]},
                        optim={"lr": 1e-3, "gradient_accumulation_steps": 1},
                        train={"num_epochs": 2, "batch_size_training": 1, "save_every_steps": 1})


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """(1 process x 4 devices run folder, 2 processes x 2 devices run folder, scratch folder)."""
    tmp = tmp_path_factory.mktemp("multihost")
    start = time.perf_counter()
    one = train(load_config(config(tmp, assets, "one")), log=quiet)
    assert one.steps == STEPS and len(one.exports) == 2
    print(f"\n1 process x 4 devices: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    cfg = config(tmp, assets, "two")
    results = run_ok(lambda i: ["train", "--config", str(cfg)], tmp, {"IVTLR_TEST_DECODED": str(tmp / "decoded")})
    print(f"2 processes x 2 devices: {time.perf_counter() - start:.1f} s")
    assert "trained 4 micro-batches" in results[0][1] and printed(results[1][1]) == ""  # process 0 speaks
    return one.run_dir, tmp / "runs" / "two", tmp


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = export_tensors(a), export_tensors(b)
    assert ta.keys() == tb.keys()
    return max(float(np.abs(ta[k].astype(np.float64) - tb[k]).max()) for k in ta)


def test_two_processes_train_like_one(runs):
    one, two, tmp = runs
    for stage in (0, 1):
        diff = max_abs_diff(one / f"stage_{stage}", two / f"stage_{stage}")
        print(f"stage {stage}: max abs diff 2x2 vs 1x4 = {diff:.3g}")
        assert diff <= 1e-5, (stage, diff)
        assert json.loads((one / f"stage_{stage}" / "config.json").read_text()) == \
            json.loads((two / f"stage_{stage}" / "config.json").read_text())
    records = assert_metrics_once_per_step(two / "metrics.jsonl", STEPS)  # one writer
    reference = assert_metrics_once_per_step(one / "metrics.jsonl", STEPS)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in reference], rtol=1e-5)
    # each process decoded the images of its 2 rows of every 4-row batch, and no other
    decoded = [len((tmp / f"decoded.{p}").read_text().splitlines()) for p in (0, 1)]
    assert decoded == [2 * STEPS, 2 * STEPS], decoded
    assert not list(two.glob("*.tmp")) and (two / "config.yaml").exists()


def test_both_processes_killed_then_relaunched_resume_exactly(runs, assets):
    _, two, tmp = runs
    cfg = config(tmp, assets, "killed")
    mark = tmp / "killed"
    procs = launch(lambda i: ["train", "--config", str(cfg)], tmp,
                   {"IVTLR_TEST_PAUSE_AFTER": "1", "IVTLR_TEST_PAUSE_MARK": str(mark)})
    deadline = time.time() + 300
    while not all(Path(f"{mark}.paused{i}").exists() for i in (0, 1)):  # both hold step 1's checkpoint
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"the run ended before it could be killed: {[p.communicate()[1][-2000:] for p in procs]}")
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    run_dir = tmp / "runs" / "killed"
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [1]
    assert not (run_dir / "stage_0").exists()  # mid-epoch 0

    results = run_ok(lambda i: ["train", "--config", str(cfg)], tmp)
    assert "resumed from" in results[0][1] and "trained 3 micro-batches" in results[0][1]
    for stage in (0, 1):
        a, b = export_tensors(two / f"stage_{stage}"), export_tensors(run_dir / f"stage_{stage}")
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"stage {stage} {key}")
    assert_metrics_once_per_step(run_dir / "metrics.jsonl", STEPS)


def test_a_failure_in_one_process_stops_both_and_is_shown_once(assets, tmp_path):
    tmp = tmp_path
    cfg = config(tmp, assets, "fails")
    start = time.time()
    # process 1 alone is given a bad setting: it stops at once; process 0 is stopped while it waits for it
    results = finish(launch(lambda i: ["train", "--config", str(cfg)] + (["optim.lr=-1"] if i else []), tmp),
                     timeout=120)
    (status0, _, err0), (status1, out1, err1) = results
    assert status0 != 0 and status1 != 0
    assert err0.count("optim.lr: -1.0") == 1 and "process 1" in err0 and "Traceback" not in err0, err0
    assert "optim.lr" not in err1 + out1 and "Traceback" not in err1 and printed(out1) == "", err1
    assert time.time() - start < 100
    assert not (tmp / "runs" / "fails" / "config.yaml").exists()


def test_two_processes_evaluate_like_one(assets, tmp_path):
    tmp = tmp_path
    from tests.test_eval_run import scale_weights

    model = tmp / "eval_model"
    shutil.copytree(assets / "model", model)
    scale_weights(model)  # outputs that depend on the input
    cfg = EvalConfig("m3cot", str(assets / "data"), "test", num_selected_patches=4, batch_size=4, max_new_tokens=6,
                     dtype="float32")  # what infer.py makes of the run config below
    out1 = tmp / "eval1.jsonl"
    evaluate(model, cfg, out1, log=quiet)
    records = out1.read_text().splitlines(keepends=True)
    assert len(records) == 6 and len({json.loads(r)["generated"] for r in records}) > 1
    # the 2-process run resumes an output whose first 2 records the 1-process run wrote
    out2 = tmp / "eval2.jsonl"
    shutil.copy(setup_path(out1), setup_path(out2))
    out2.write_text("".join(records[:2]))
    run_config = tmp / "eval.yaml"
    run_config.write_text(json.dumps({
        "model": {"model_id": str(model), "dtype": "float32", "param_dtype": "float32"},
        "latent": {"num_selected_patches": 4},
        "data": {"dataset": "m3cot", "source": str(assets / "data"), "eval_split": "test"}}))
    results = run_ok(lambda i: ["infer", "--config", str(run_config), "--checkpoint", str(model), "--out", str(out2),
                                "--batch-size", "4", "--max-new-tokens", "6"], tmp)
    assert out2.read_text() == out1.read_text()
    summary = json.loads(out2.with_suffix(".summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["evaluated_now"] == 4
    assert summary["skipped"]["already_done"] == 2 and printed(results[1][1]) == ""
