"""Multi-process runs on JAX's multi-controller runtime, on one machine: 2 processes x 2 host CPU devices
on 127.0.0.1 (gloo collectives) against 1 process x 4 devices (this test process).

- training: the stage exports of a 2-process run equal the 1-process run's (max abs diff <= 1e-5), each
  process decoding only its half of every batch, process 0 alone writing and printing;
- both processes of a run killed with SIGKILL mid-run and launched again resume exactly (stage exports
  equal to the uninterrupted 2-process run's, metrics once per step);
- evaluation: 2 processes, resuming an output begun by a 1-process run, write the 1-process records, in
  static batches and in continuous batching (`infer.py --batching continuous`, each process its own slots);
- a failure in one process (mid-run, or a bad setting before any collective) stops both, its message
  printed once (by process 0), the other exiting quietly.

Kept small (8 training rows, 4 micro-steps over 2 stages, 6 test rows) and cheap in start-ups: one
launch runs the uninterrupted training and the run that is killed (while this process runs the 1-process
references), one more resumes it, evaluates, then runs the one that fails (`tests/multihost_worker.py`
runs several commands in one process); the processes share a persistent compilation cache (only the
first run compiles the steps) and compile with XLA's cheaper CPU settings (which moves results by ~1e-8
against this process's default ones, well within the tolerance)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ivtlr_jax.config import DataSection, EvalSection, LatentSection, ModelSection, load_config
from ivtlr_jax.demo import prepare
from ivtlr_jax.eval.run import EvalConfig, evaluate
from ivtlr_jax.eval.setup import setup_path
from ivtlr_jax.train.loop import train
from tests.conftest import FAST_COMPILE_FLAGS
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


class Launch:
    """2 processes of one multi-process run (`args_of(i)`: the worker's arguments for process i), their
    output in files."""

    def __init__(self, args_of, tmp: Path, name: str, env_extra=None):
        port, self.files, self.procs = free_port(), [], []
        for i in range(2):
            env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE_FLAGS}",
                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                       **(env_extra or {}))
            out, err = tmp / f"{name}.{i}.out", tmp / f"{name}.{i}.err"
            self.files.append((out, err))
            with open(out, "w") as o, open(err, "w") as e:
                self.procs.append(subprocess.Popen([sys.executable, str(WORKER), *args_of(i)], cwd=ROOT, env=env,
                                                   stdout=o, stderr=e))

    def wait(self, timeout=400) -> list[tuple[int, str, str]]:
        """(status, stdout without gloo's connection lines, stderr) of each process."""
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                self.dump_stacks()
                self.kill()
                stacks = "\n".join(f"process {i}:\n{err.read_text()[-6000:]}" for i, (_, err) in enumerate(self.files))
                raise AssertionError(f"a launch still running after {timeout} s; its threads then:\n{stacks}") from None
        return [(p.returncode, printed(out.read_text()), err.read_text())
                for p, (out, err) in zip(self.procs, self.files)]

    def dump_stacks(self) -> None:
        """Every thread's Python stack of each live process into its stderr (multihost_worker.py asks
        faulthandler for it on SIGUSR1): where a stalled launch waits."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGUSR1)
        time.sleep(2)

    def kill(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def ok(self, timeout=400) -> list[tuple[int, str, str]]:
        results = self.wait(timeout)
        for i, (status, stdout, stderr) in enumerate(results):
            assert status == 0, f"process {i} failed ({status}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
        return results


# the pieces of gloo's connection messages, which its threads write to stdout interleaved (numbers aside)
GLOO = re.compile("|".join(map(re.escape, ["[Gloo] Rank ", " is connected to ",
                                           " peer ranks. Expected number of connected peer ranks is : "])))


def printed(text: str) -> str:
    """What the program printed: its lines with a letter, once gloo's messages are cut out."""
    lines = GLOO.sub("", text).splitlines(keepends=True)
    return "".join(line for line in lines if re.search("[A-Za-z]", line))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_assets")
    prepare(root, seed=1, num_train=8, num_test=6)
    return root


def config(tmp: Path, assets: Path, name: str) -> Path:
    """The tiny run: 2 stages of 1 epoch, LoRA with dropout, a checkpoint every micro-step; the mesh
    `fsdp=4` splits the rows and shards the parameters and optimizer state over both processes' devices
    (so checkpoints hold each process's shards, and exports gather them)."""
    path = write_config(tmp, assets, name, curriculum={"epochs_per_stage": 1, "max_latent_stage": 1},
                        data={"length_buckets": [256, 384], "prefix_buckets": [192, 256]},
                        optim={"lr": 1e-3, "gradient_accumulation_steps": 1},
                        train={"num_epochs": 2, "batch_size_training": 1, "save_every_steps": 1})
    path.write_text(path.read_text() + "mesh: {data: 1, fsdp: 4, tensor: 1}\n")
    return path


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Everything the tests compare, run once. 2 processes x 2 devices: the training run, then a run killed
    after its first checkpoint; meanwhile in this process (1 x 4 devices) the same training run and an
    evaluation; then 2 processes again: the killed run relaunched, two evaluations resuming the 1-process
    one (its first 2 records in static batches, its first record in continuous batching), and a run in
    which process 1 fails after micro-step 1."""
    from tests.test_eval_run import scale_weights

    tmp = tmp_path_factory.mktemp("multihost")
    start = time.perf_counter()
    two, killed, fails = config(tmp, assets, "two"), config(tmp, assets, "killed"), config(tmp, assets, "fails")
    first = Launch(lambda i: ["train", "--config", str(two), "--then", "train", "--config", str(killed)], tmp, "first",
                   {"IVTLR_TEST_DECODED": str(tmp / "decoded1"), "IVTLR_TEST_PAUSE": f"killed:1:{tmp / 'paused'}"})

    one = train(load_config(config(tmp, assets, "one")), log=quiet)
    assert one.steps == STEPS and len(one.exports) == 2
    model = tmp / "eval_model"
    shutil.copytree(assets / "model", model)
    scale_weights(model)  # outputs that depend on the input
    eval_cfg = EvalConfig(DataSection(source=str(assets / "data"), eval_split="test"),  # infer.py's of eval.yaml below
                          LatentSection(num_selected_patches=4), ModelSection(dtype="float32", param_dtype="float32"),
                          EvalSection(batch_size=4, max_new_tokens=6))
    evaluate(model, eval_cfg, tmp / "eval1.jsonl", log=quiet)
    records = (tmp / "eval1.jsonl").read_text().splitlines(keepends=True)
    for name, begun in (("eval2", 2), ("eval3", 1)):  # outputs the 2-process evaluations resume
        shutil.copy(setup_path(tmp / "eval1.jsonl"), setup_path(tmp / f"{name}.jsonl"))
        (tmp / f"{name}.jsonl").write_text("".join(records[:begun]))
    (tmp / "eval.yaml").write_text(json.dumps({
        "model": {"model_id": str(model), "dtype": "float32", "param_dtype": "float32"},
        "latent": {"num_selected_patches": 4},
        "data": {"dataset": "m3cot", "source": str(assets / "data"), "eval_split": "test"}}))
    in_process = time.perf_counter() - start

    deadline = time.time() + 400
    while not all((tmp / f"paused.{i}").exists() for i in (0, 1)):  # both hold the checkpoint of step 1
        if any(p.poll() is not None for p in first.procs) or time.time() > deadline:
            first.kill()
            pytest.fail(f"the first launch ended before its last run could be killed: {first.wait()}")
        time.sleep(0.1)
    first.kill()
    both = time.perf_counter() - start
    start = time.perf_counter()
    infer = lambda name, batching: ["--then", "infer", "--config", str(tmp / "eval.yaml"), "--checkpoint", str(model),
                                    "--out", str(tmp / f"{name}.jsonl"), "--batch-size", "4", "--max-new-tokens", "6",
                                    "--batching", batching]
    second = Launch(lambda i: ["train", "--config", str(killed), *infer("eval2", "static"),
                               *infer("eval3", "continuous"), "--then", "train", "--config", str(fails)], tmp, "second",
                    {"IVTLR_TEST_DECODED": str(tmp / "decoded2"), "IVTLR_TEST_FAIL": "fails:1:1"})
    second = second.wait()
    failed_at = tmp / "runs" / "fails" / "checkpoints" / "1"  # (absent when an earlier command stopped the launch)
    stopped = time.time() - failed_at.stat().st_mtime if failed_at.exists() else float("inf")  # failure -> both ended
    print(f"\n1 x 4 in this process (train, evaluate): {in_process:.1f} s; meanwhile 2 processes (train, train "
          f"until killed): {both:.1f} s in all; 2 processes (the killed run relaunched, evaluate static and "
          f"continuous, a failing run): "
          f"{time.perf_counter() - start:.1f} s")
    print(f"the failure after micro-step 1 stopped both processes within {stopped:.1f} s")
    return {"stopped_s": stopped, "tmp": tmp, "one": one.run_dir, "two": tmp / "runs" / "two",
            "killed": tmp / "runs" / "killed", "second": second,
            "first": [(printed(o.read_text()), e.read_text()) for o, e in first.files]}


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = export_tensors(a), export_tensors(b)
    assert ta.keys() == tb.keys()
    return max(float(np.abs(ta[k].astype(np.float64) - tb[k]).max()) for k in ta)


def test_two_processes_train_like_one(runs):
    one, two, tmp = runs["one"], runs["two"], runs["tmp"]
    for stage in (0, 1):
        diff = max_abs_diff(one / f"stage_{stage}", two / f"stage_{stage}")
        print(f"stage {stage}: max abs diff 2 x 2 vs 1 x 4 = {diff:.3g}")
        assert diff <= 1e-5, (stage, diff)
        assert json.loads((one / f"stage_{stage}" / "config.json").read_text()) == \
            json.loads((two / f"stage_{stage}" / "config.json").read_text())
    records = assert_metrics_once_per_step(two / "metrics.jsonl", STEPS)  # one writer
    reference = assert_metrics_once_per_step(one / "metrics.jsonl", STEPS)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in reference], rtol=1e-5)
    # each process decoded the images of its 2 rows of every 4-row batch, and no other
    decoded = [len((tmp / f"decoded1.0.{p}").read_text().splitlines()) for p in (0, 1)]
    assert decoded == [2 * STEPS, 2 * STEPS], decoded
    (out0, _), (out1, _) = runs["first"]
    assert "trained 4 micro-batches" in out0 and out1 == ""  # process 0 speaks for the run
    assert (two / "config.yaml").exists() and not list(two.glob("*.tmp"))


def test_both_processes_killed_then_relaunched_resume_exactly(runs):
    two, killed = runs["two"], runs["killed"]
    (_, out0, _), (_, out1, _) = runs["second"]  # (the launch ends with the failing run)
    assert "resumed from" in out0 and "step 1: epoch 0, batch 1" in out0, out0  # killed mid-epoch 0
    assert "trained 3 micro-batches" in out0 and out1 == ""
    assert sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())[-1] == STEPS
    for stage in (0, 1):
        a, b = export_tensors(two / f"stage_{stage}"), export_tensors(killed / f"stage_{stage}")
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"stage {stage} {key}")
    assert_metrics_once_per_step(killed / "metrics.jsonl", STEPS)


def test_two_processes_evaluate_like_one(runs):
    """infer.py --batching static over 2 processes resumes a 1-process output: the 1-process records."""
    tmp = runs["tmp"]
    out1, out2 = tmp / "eval1.jsonl", tmp / "eval2.jsonl"
    records = [json.loads(line) for line in out1.read_text().splitlines()]
    assert len(records) == 6 and len({r["generated"] for r in records}) > 1  # the text depends on the input
    assert out2.read_text() == out1.read_text()  # the 2-process run wrote records 3-6 as one process does
    summary = json.loads(out2.with_suffix(".summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["evaluated_now"] == 4
    assert summary["batching"] == "static"
    assert summary["skipped"]["already_done"] == 2 and summary["examples"] == 6
    assert len((tmp / "decoded2.1.0").read_text().splitlines()) == 2  # each process its 2 rows of the 4
    assert len((tmp / "decoded2.1.1").read_text().splitlines()) == 2


def test_two_processes_evaluate_like_one_in_continuous_batching(runs):
    """infer.py --batching continuous over 2 processes x 2 devices resumes a 1-process output (its first
    record): each process runs 2 slots on every other example left (process 0 the 1st, 3rd and 5th, process 1
    the 2nd and 4th), and process 0 writes the 1-process records byte for byte."""
    tmp = runs["tmp"]
    (_, out0, err0), _ = runs["second"]
    out1, out3 = tmp / "eval1.jsonl", tmp / "eval3.jsonl"
    assert out3.read_text() == out1.read_text(), err0[-2000:]
    summary = json.loads(out3.with_suffix(".summary.json").read_text())
    assert (summary["batching"], summary["processes"], summary["devices"]) == ("continuous", 2, 4)
    assert summary["evaluated_now"] == 5 and summary["skipped"]["already_done"] == 1 and summary["examples"] == 6
    decoded = [len((tmp / f"decoded2.2.{p}").read_text().splitlines()) for p in (0, 1)]  # each its own examples
    assert decoded == [3, 2], decoded
    assert "continuous batching, 4 slots (2 in each of 2 processes)" in out0, out0


def test_auto_batching_is_continuous_in_any_number_of_processes(monkeypatch):
    """batching 'auto' picks continuous batching in several processes too; 'static' stays static."""
    from ivtlr_jax import distributed
    from ivtlr_jax.eval.run import evaluation_devices

    monkeypatch.setattr(distributed, "process_count", lambda: 2)
    cfg = EvalConfig(DataSection(source="unused"))
    assert evaluation_devices(cfg)[3] is True
    assert evaluation_devices(cfg.replace(eval=dict(batching="continuous")))[3] is True
    assert evaluation_devices(cfg.replace(eval=dict(batching="static")))[3] is False


def test_a_failure_mid_run_in_one_process_stops_both_and_is_shown_once(runs):
    """Process 1 raises after micro-step 1 of the run "fails"; process 0, by then inside micro-step 2's
    collectives, is stopped too and prints process 1's error once; process 1 prints nothing."""
    (status0, _, err0), (status1, out1, err1) = runs["second"]
    assert status0 == status1 == 1
    message = "error (process 1): RuntimeError: injected failure after micro-step 1"
    assert err0.count(message) == 1 and "Traceback" not in err0, err0[-3000:]
    assert "injected" not in err1 and "Traceback" not in err1 and out1 == "", err1[-3000:]
    assert runs["stopped_s"] < 60
    fails = runs["tmp"] / "runs" / "fails"
    assert (fails / "checkpoints" / "1").exists() and not (fails / "stage_0").exists()


def test_a_bad_setting_in_one_process_stops_both_and_is_shown_once(assets, tmp_path):
    cfg = config(tmp_path, assets, "fails")
    start = time.time()
    # process 1 alone is given a bad setting: it stops at once; process 0 is stopped while it waits for it
    results = Launch(lambda i: ["train", "--config", str(cfg)] + (["optim.lr=-1"] if i else []), tmp_path,
                     "fails").wait(timeout=120)
    (status0, out0, err0), (status1, out1, err1) = results
    assert status0 != 0 and status1 != 0
    assert err0.count("optim.lr: -1.0") == 1 and "error (process 1)" in err0 and "Traceback" not in err0, err0
    assert "optim.lr" not in err1 + out1 + out0 and "Traceback" not in err1 and out1 == "", err1
    assert time.time() - start < 100
    assert not (tmp_path / "runs" / "fails" / "config.yaml").exists()


def test_processes_started_with_other_settings_refuse_naming_them(assets, tmp_path):
    """Process 1 alone is given another (valid) learning rate: every process refuses before anything is
    loaded or written, process 0 naming the key and each process's value (the others exit quietly)."""
    cfg = config(tmp_path, assets, "differs")
    results = Launch(lambda i: ["train", "--config", str(cfg)] + (["optim.lr=2e-3"] if i else []), tmp_path,
                     "differs").wait(timeout=120)
    (status0, out0, err0), (status1, out1, err1) = results
    assert status0 == status1 == 1, results
    line = "optim.lr: 0.001 on process 0, 0.002 on process 1"
    assert err0.count(line) == 1 and "different configurations" in err0 and "Traceback" not in err0, err0
    assert "Traceback" not in err1 and out1 == "" and out0 == "", (out0, err1)
    assert not (tmp_path / "runs" / "differs").exists()  # nothing written


def worker_env(port: int, process: int, **extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process), **extra)


def test_a_process_that_cannot_join_says_so_in_one_line(assets, tmp_path):
    """train.py as process 1 with no coordinator listening, and as process 0 that nobody joins: each gives up
    after IVTLR_JAX_INIT_TIMEOUT_S with one line naming the address (not JAX's abort after 5 minutes)."""
    cfg = config(tmp_path, assets, "alone")
    ports = {i: free_port() for i in (0, 1)}
    procs = {i: subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], cwd=ROOT,
                                 env=worker_env(ports[i], i, IVTLR_JAX_INIT_TIMEOUT_S="3"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in (0, 1)}
    try:
        outs = {i: p.communicate(timeout=120) for i, p in procs.items()}  # JAX alone: 300 s, then an abort
    finally:
        for p in procs.values():
            p.kill()
    for i, (out, err) in outs.items():
        assert procs[i].returncode == 1 and out == "", (i, out, err)
        assert len(err.strip().splitlines()) == 1 and f"127.0.0.1:{ports[i]}" in err, (i, err)
    assert "process 1 of 2 could not join the run within 3 s" in outs[1][1], outs[1][1]
    assert "process 0 of 2 waited 3 s" in outs[0][1] and "not every process joined" in outs[0][1], outs[0][1]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_is_named_by_the_survivor(assets, tmp_path, killed):
    """One process is killed with SIGKILL (as the OOM killer does) while the other waits for it in an
    exchange: the survivor prints one line naming it and exits with status 1, within the peer timeout
    (process 1 silent for IVTLR_JAX_PEER_TIMEOUT_S) or at once (process 0, the coordinator, gone)."""
    cfg = config(tmp_path, assets, "killed")
    mark = tmp_path / "stalled"
    launch = Launch(lambda i: ["train", "--config", str(cfg)], tmp_path, "kill",
                    {"IVTLR_TEST_STALL": f"run_folder:{killed}:{mark}", "IVTLR_JAX_PEER_TIMEOUT_S": "5"})
    deadline = time.time() + 120
    while not mark.exists():
        if any(p.poll() is not None for p in launch.procs) or time.time() > deadline:
            launch.kill()
            pytest.fail(f"ended before the stall: {launch.wait()}")
        time.sleep(0.1)
    launch.procs[killed].send_signal(signal.SIGKILL)
    survivor = 1 - killed
    status, out, err = launch.wait(timeout=60)[survivor]  # JAX alone: 100 s of missed heartbeats, then an abort
    named = ("error: process 1 stopped responding: no heartbeat for 5 s" if killed else
             "error: process 0 (the coordinator at 127.0.0.1:")
    # the survivor's last line names the dead process (when the coordinator goes, JAX logs its abort first)
    last = err.strip().splitlines()[-1]
    assert status == 1 and last.startswith(named) and err.count(named) == 1 and "Traceback" not in err, err
    assert last.endswith(f"process {survivor} stops too") and out == "", (out, err)
    assert killed == 0 or len(err.strip().splitlines()) == 1, err  # process 1 gone: that line alone


def test_start_up_reads_the_environment(monkeypatch):
    """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID reach jax.distributed.initialize; an
    incomplete set is refused naming what is missing; a SLURM job of several tasks leaves the rest to
    JAX's own detection; one process initialises nothing. (initialize itself is replaced here.)"""
    import jax

    from ivtlr_jax import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
                 "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False and calls == []  # nothing named: one process
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(distributed.DistributedSetupError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(distributed.DistributedSetupError, match=r"JAX_PROCESS_ID=2 is outside 0\.\.1"):
        distributed.initialize()
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    distributed.initialize()
    # JAX's own limits beyond ours (IVTLR_JAX_INIT_TIMEOUT_S, IVTLR_JAX_PEER_TIMEOUT_S), so ours speak first
    bounds = {"initialization_timeout": 120 + 60, "heartbeat_timeout_seconds": 30 + 60}
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1, **bounds}
    monkeypatch.setenv("IVTLR_JAX_INIT_TIMEOUT_S", "soon")
    with pytest.raises(distributed.DistributedSetupError, match="IVTLR_JAX_INIT_TIMEOUT_S='soon' is not an integer"):
        distributed.initialize()
    monkeypatch.delenv("IVTLR_JAX_INIT_TIMEOUT_S")
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    n = len(calls)
    assert distributed.initialize() is False and len(calls) == n  # one process named: nothing to join
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[0-1]", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert distributed.initialize() is False and len(calls) == n  # a one-task job
    monkeypatch.setenv("SLURM_NTASKS", "8")
    distributed.initialize()
    assert calls[-1] == {"coordinator_address": None, "num_processes": None, "process_id": None,  # JAX detects
                         **bounds}
