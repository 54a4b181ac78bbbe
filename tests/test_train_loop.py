"""The training loop end to end on a tiny generated task: a run killed mid-epoch (SIGKILL) and resumed
ends with the same parameters as one that never stopped; run-folder safety; faults (damaged checkpoints,
a crash during a stage export, a non-finite loss, bad settings) stop or recover as they should.

The tests share one uninterrupted run (`straight`), so they run on one xdist worker (`xdist_group`)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from ivtlr_jax.config import DataSection, EvalSection, LatentSection, load_config
from ivtlr_jax.demo import prepare
from ivtlr_jax.io.lock import lock_path, output_lock, read_holder
from ivtlr_jax.train.loop import RunFolderError, train
from tests.event_files import read_event_scalars
from tests.twice import start_twice

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("train_loop")
quiet = lambda *_: None


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_assets")
    prepare(root, seed=1, num_train=24, num_test=4)
    return root


def write_config(tmp: Path, assets: Path, name: str, **changes) -> Path:
    """The test run's YAML; `changes`: {"section": {key: value}} merged in."""
    cfg = {
        "name": name,
        "save_path": str(tmp / "runs"),
        "seed": 3,
        "model": {"model_id": str(assets / "model"), "dtype": "float32", "param_dtype": "float32", "remat": "none"},
        "latent": {"num_selected_patches": 4},
        "data": {"dataset": "m3cot", "source": str(assets / "data"), "length_buckets": [256, 384, 512],
                 "prefix_buckets": [192, 256]},
        "curriculum": {"epochs_per_stage": 1, "max_latent_stage": 2},
        "optim": {"lr": 1e-3, "gradient_accumulation_steps": 2},
        "lora": {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.1},
        "train": {"num_epochs": 3, "batch_size_training": 1, "save_every_steps": 1},  # x 4 devices
    }
    for section, values in changes.items():
        cfg[section] = {**cfg[section], **values} if isinstance(values, dict) else values
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_params(run_dir: Path) -> dict:
    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    step = manager.latest_step()
    restored = ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / "trainable").absolute())
    manager.close()
    flat = {}

    def walk(node, prefix=()):
        for k, v in node.items():
            walk(v, (*prefix, k)) if isinstance(v, dict) else flat.__setitem__((*prefix, k), np.asarray(v))

    walk(restored)
    return step, flat


@pytest.fixture(scope="module", autouse=True)
def shared_compilations():
    """JAX's persistent compilation cache on in this process for the module's tests, in the folder the
    commands they start use (conftest's `commands_share_compilations`), and those commands compile with this
    process's matmul precision: each `train` call jits its own step, so the runs after `straight` (resumed,
    moved, damaged, the train.py runs) load the programs it compiled, the same executables, instead of
    compiling them again, as a resumed train.py does. JAX's settings and the environment are restored after."""
    from jax._src import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    precision = os.environ.get("JAX_DEFAULT_MATMUL_PRECISION")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = jax.config.jax_default_matmul_precision  # the same programs
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        if precision is None:
            os.environ.pop("JAX_DEFAULT_MATMUL_PRECISION")
        else:
            os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = precision
        cc.reset_cache()


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory, shared_compilations):
    """The uninterrupted run every interrupted one is compared with."""
    result = train(load_config(write_config(tmp_path_factory.mktemp("straight"), assets, "straight")), log=quiet)
    assert result.steps == 3 * 6 and len(result.exports) == 3  # 24 rows / (1 row x 4 devices), 3 stages
    return result


def start_train_command(cfg_path: Path) -> subprocess.Popen:
    """`python train.py --config cfg_path`, the command a user types (stderr piped)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, what: str, timeout_s: float = 240) -> None:
    """Poll `condition()` until it holds; fail when the training process exits first or time runs out."""
    deadline = time.time() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training exited before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def assert_same_final_params(run_a: Path, run_b: Path) -> None:
    step_a, a = final_params(run_a)
    step_b, b = final_params(run_b)
    assert step_a == step_b and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_killed_and_resumed_run_equals_uninterrupted_run(assets, straight, tmp_path):
    cfg_path = write_config(tmp_path, assets, "killed")
    run_dir = tmp_path / "runs" / "killed"
    proc = start_train_command(cfg_path)
    ckpts = run_dir / "checkpoints"  # kill as soon as a checkpoint (of 2 micro-batches) has landed
    wait_until(lambda: ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.iterdir()),
               proc, "it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_before and max(steps_before) < 18, steps_before  # really interrupted mid-run

    assert read_holder(lock_path(run_dir))[0].pid == proc.pid  # the killed trainer's lock is left behind
    said = []
    with output_lock(run_dir, log=said.append):  # and taken over, as train.py does
        resumed = train(load_config(cfg_path), log=lambda *_: None)
    assert any(f"took over the lock of process {proc.pid} on host" in line for line in said), said
    assert not lock_path(run_dir).exists()
    assert resumed.steps == straight.steps
    assert_same_final_params(straight.run_dir, resumed.run_dir)
    assert_metrics_once_per_step(run_dir / "metrics.jsonl", 18)
    assert_events_match_metrics(run_dir)  # the killed writer's file, then the resumed run's rebuilt copy


def test_preempted_run_saves_exits_75_and_resumes_exactly(assets, straight, tmp_path):
    """SIGTERM to `train.py`, then a second signal (SIGINT) while it stops: exit status 75, one line, a
    checkpoint of the micro-step it stopped at (no periodic saves here: only the stop saved it). The
    re-run removes an orbax temporary folder, gives the caller's signal handlers back and ends equal to
    `straight` (save_every_steps changes where checkpoints are, not what is trained)."""
    from ivtlr_jax.train.preemption import PREEMPTED_EXIT_STATUS

    cfg_path = write_config(tmp_path, assets, "preempted", train={"save_every_steps": 0})  # stage ends only
    run_dir = tmp_path / "runs" / "preempted"
    ckpts, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    proc = start_train_command(cfg_path)
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, "micro-step 2")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # a second signal while stopping: must not interrupt the save
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_STATUS, stderr[-2000:]
    stopped = len(metrics.read_text().splitlines())
    assert 2 <= stopped < 6 and "Traceback" not in stderr  # within stage 0, before its end checkpoint
    assert stderr.strip().splitlines()[-1] == (f"preempted at micro-step {stopped}; saved checkpoint step {stopped} "
                                               f"in {ckpts}; re-run the same command to resume")
    assert sorted(p.name for p in ckpts.iterdir()) == [str(stopped)]

    (ckpts / "99.orbax-checkpoint-tmp-1234").mkdir()  # a save that never finished
    own_handler = lambda *_: None
    previous = signal.signal(signal.SIGTERM, own_handler)
    lines = []
    try:
        resumed = train(load_config(cfg_path), log=lines.append)
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert f"removed 1 unfinished checkpoint save(s) in {ckpts}: 99.orbax-checkpoint-tmp-1234" in lines
    assert f"resumed from {ckpts} step {stopped}: epoch 0, batch {stopped}" in lines
    assert resumed.complete and resumed.trained_here == 18 - stopped
    assert_same_final_params(straight.run_dir, run_dir)
    records = assert_metrics_once_per_step(metrics, 18)
    uninterrupted = assert_metrics_once_per_step(straight.run_dir / "metrics.jsonl", 18)
    changing = ("tokens_per_s", "compilations")  # timing; compilations are counted per call
    strip = lambda rs: [{k: v for k, v in r.items() if k not in changing} for r in rs]
    assert strip(records) == strip(uninterrupted)  # losses bitwise (JSON floats round-trip exactly)


def run_command_on_devices(cfg_path: Path, devices: int) -> subprocess.CompletedProcess:
    """`python train.py --config cfg_path` in a process with `devices` host devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_resume_on_another_device_count_keeps_the_global_batch(assets, straight, tmp_path):
    """A run started on 4 devices (4 rows per micro-step, accumulation 2) and stopped: `train.py` on 3 devices
    is refused at once, naming the devices and the batch, with nothing changed; on 2 devices it resumes with
    the same rows per micro-step (2 on each), order and accumulation, and ends where the 4-device run ends (the
    same 18 micro-steps; the losses up to the rounding of another device count). Stopped after stage 1 (12
    micro-steps, the programs `straight` compiled), so the 2-device run compiles its last stage's only."""
    cfg_path = write_config(tmp_path, assets, "moved")
    run_dir = tmp_path / "runs" / "moved"
    train(load_config(cfg_path), max_steps=12, log=quiet)
    before = {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    refused = run_command_on_devices(cfg_path, 3)
    assert refused.returncode == 1, refused.stderr[-2000:]
    [line] = [x for x in refused.stderr.strip().splitlines() if x.startswith("error")]
    assert "micro-steps hold 4 rows (global batch 8, started on 4 replicas); 3 replicas cannot share them" in line
    assert {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    resumed = run_command_on_devices(cfg_path, 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming on 2 replicas (the run started on 4)" in resumed.stdout + resumed.stderr
    records = assert_metrics_once_per_step(run_dir / "metrics.jsonl", 18)
    uninterrupted = assert_metrics_once_per_step(straight.run_dir / "metrics.jsonl", 18)
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in uninterrupted], rtol=2e-5)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in uninterrupted]  # the same rows, in order


def test_an_epoch_shorter_than_a_micro_step_trains(assets, tmp_path):
    """`train.py ... data.limit=3 train.num_epochs=1` with 4 rows per micro-step: the epoch's 3 rows start over
    to fill it (it ended in `cannot reshape array of shape (6,) into shape (0, 8)`-like errors)."""
    from ivtlr_jax.train.loop import wrapped_order

    np.testing.assert_array_equal(wrapped_order(np.array([5, 2, 7]), 8), [5, 2, 7, 5, 2, 7, 5, 2])
    np.testing.assert_array_equal(wrapped_order(np.array([5, 2, 7, 1, 9]), 8), [5, 2, 7, 1, 9, 5, 2, 7])  # as before
    cfg_path = write_config(tmp_path, assets, "short", data={"limit": 3}, train={"num_epochs": 1})
    done = run_command_on_devices(cfg_path, 4)
    assert done.returncode == 0, done.stderr[-2000:]
    [record] = assert_metrics_once_per_step(tmp_path / "runs" / "short" / "metrics.jsonl", 1)
    assert np.isfinite(record["loss"]) and (tmp_path / "runs" / "short" / "stage_0" / "config.json").is_file()


def test_run_folder_with_other_content_or_config_is_refused(assets, tmp_path):
    cfg_path = write_config(tmp_path, assets, "guarded")
    run_dir = tmp_path / "runs" / "guarded"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty and is not a run folder"):
        train(load_config(cfg_path))
    (run_dir / "notes.txt").unlink()
    (run_dir / "config.yaml").write_text("name: something else\n")
    with pytest.raises(RunFolderError, match="different configuration"):
        train(load_config(cfg_path))
    assert (run_dir / "config.yaml").read_text() == "name: something else\n"  # nothing overwritten


def test_chameleon_trains_exports_and_evaluates(tmp_path):
    """The other family through the same loop: a tiny random Chameleon with a tiny ChameleonProcessor on
    the generated M3CoT-schema data (a cross pair), two stages, export, evaluation."""
    from flax import nnx

    from ivtlr_jax.data import (build_tiny_chameleon_processor, make_synthetic_m3cot, special_tokens,
                                synthetic_corpus, synthetic_rows)
    from ivtlr_jax.data.tokenizer import save_processor
    from ivtlr_jax.eval.run import EvalConfig, evaluate
    from ivtlr_jax.models import Chameleon, ChameleonConfig
    from ivtlr_jax.io import save_hf

    data, model_dir = tmp_path / "data", tmp_path / "model"
    make_synthetic_m3cot(data, 8, 4, seed=2, image_size=32, fixed_choices=True)
    processor = build_tiny_chameleon_processor(model_dir, synthetic_corpus(synthetic_rows(8, 2, "train", 32, True)))
    # as in Chameleon's real tokenizer, the image codes have tokens of their own (never text targets,
    # whose logits the model suppresses)
    letters = lambda n: "".join(chr(65 + int(d)) for d in str(n))
    code_tokens = [f"IMGIMG{letters(c)}Z" for c in range(64)]
    processor.tokenizer.add_tokens(code_tokens)
    save_processor(processor, model_dir)
    special = special_tokens(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    code_ids = processor.tokenizer.convert_tokens_to_ids(code_tokens)
    config = ChameleonConfig.from_hf({
        "model_type": "chameleon", "vocab_size": special.vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "eos_token_id": special.eos_token_id,
        "vq_config": {"embed_dim": 16, "num_embeddings": 64, "latent_channels": 16, "resolution": 32,
                      "base_channels": 32, "channel_multiplier": [1, 1, 2], "num_res_blocks": 1,
                      "attn_resolutions": []},
        "vocabulary_map": {"<image>": image_id, **dict(zip(code_tokens, code_ids))},
    })
    save_hf(Chameleon(config, rngs=nnx.Rngs(0)), model_dir)
    cfg_path = tmp_path / "cham.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "cham", "save_path": str(tmp_path / "runs"),
        "model": {"model_id": str(model_dir), "dtype": "float32", "param_dtype": "float32", "remat": "none"},
        "latent": {"num_selected_patches": 4},
        "data": {"dataset": "m3cot", "source": str(data), "length_buckets": [192, 256, 320],
                 "prefix_buckets": [128, 192]},
        "curriculum": {"epochs_per_stage": 1, "max_latent_stage": 1},
        "optim": {"lr": 1e-3, "gradient_accumulation_steps": 1},
        "lora": {"enabled": True, "rank": 4, "alpha": 8},
        "train": {"num_epochs": 2, "batch_size_training": 1},
    }))
    result = train(load_config(cfg_path), log=lambda *_: None)
    assert result.steps == 4 and len(result.exports) == 2 and all(np.isfinite(result.losses))
    eval_cfg = EvalConfig(DataSection(source=str(data), eval_split="test"), LatentSection(num_selected_patches=4),
                          eval=EvalSection(num_latents=1, batch_size=4, max_new_tokens=6))
    summary = evaluate(result.exports[-1], eval_cfg, tmp_path / "eval.jsonl", log=lambda *_: None)
    assert summary["examples"] == 4 and 0.0 <= summary["accuracy_strict"] <= 1.0
    # the official evaluation prompt: BOS and image markers before [Question]:, separator after the latents
    official_cfg = eval_cfg.replace(eval=dict(prompt_format="official"))
    official = evaluate(result.exports[-1], official_cfg, tmp_path / "eval_official.jsonl", log=lambda *_: None)
    assert official["examples"] == 4 and official["prompt_format"] == "official"
    records = [json.loads(line) for line in (tmp_path / "eval_official.jsonl").read_text().splitlines()]
    assert all("\nA.{" in r["prompt"] and r["prompt"].rstrip().endswith("Answer:") for r in records)
    assert all(len(step) == 4 for r in records for step in r["selected_patches"])


def test_lookahead_hands_over_the_value_or_the_error_later():
    from ivtlr_jax.train.loop import Lookahead

    calls = []
    ready = Lookahead(lambda i: calls.append(i) or i * 10, 3)
    assert calls == [3] and ready.result() == 30  # computed at once, handed over later
    failed = Lookahead(lambda i: [][i], 5)  # an IndexError while preparing is not raised yet
    with pytest.raises(IndexError):
        failed.result()


# ---- faults ------------------------------------------------------------------------------------------
def assert_metrics_once_per_step(path: Path, steps: int) -> list[dict]:
    """metrics.jsonl is strict JSON (no bare NaN) with exactly one record per micro-step 1..steps."""
    def no_constants(name):
        raise AssertionError(f"{path}: non-JSON constant {name}")

    records = [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]
    assert [r["micro_step"] for r in records] == list(range(1, steps + 1))
    return records


def export_tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


def assert_same_export(a: Path, b: Path) -> None:
    ta, tb = export_tensors(a), export_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=f"{b} {key}")
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_damaged_checkpoints_and_a_crashed_export_recover_exactly(assets, straight, tmp_path, monkeypatch):
    """Two damaged newest checkpoints fall back to the third; an export torn by old code is rebuilt from
    its stage's end checkpoint; a crash during the last export leaves no folder under the export's name
    and the next start rebuilds it; the run ends equal to the uninterrupted one, its metrics once per step."""
    from ivtlr_jax.io import hf_export  # the stage export writes through hf_export.save_hf

    cfg = load_config(write_config(tmp_path, assets, "faulty"))
    run_dir = cfg.run_dir
    first = train(cfg, max_steps=12, log=quiet)  # checkpoints every 2 micro-steps; stages end at 6, 12, 18
    assert first.steps == 12 and not first.complete
    ckpts = run_dir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [6, 8, 10, 12]  # 6: a stage end
    # the newest: truncated parameter files; the one before: no metadata; stage 0's export: torn as a
    # kill -9 during its write left it with the old code (truncated weights, no config.json)
    for f in (ckpts / "12" / "trainable").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the parameter data files
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (ckpts / "10" / "trainable" / "_METADATA").unlink()  # alone it is harmless: arrays restore by our tree
    (ckpts / "10" / "meta" / "metadata").unlink()  # the loop's position is gone
    weights = run_dir / "stage_0" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (run_dir / "stage_0" / "config.json").unlink()

    real_save_hf = hf_export.save_hf

    def crash_in_last_export(model, folder):
        if "stage_2" in str(folder):
            (Path(folder) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed while exporting stage 2")
        return real_save_hf(model, folder)

    monkeypatch.setattr(hf_export, "save_hf", crash_in_last_export)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lines.append)
    log = "\n".join(lines)
    assert "checkpoint step 12 could not be restored" in log and "checkpoint step 10 could not be restored" in log
    assert "resumed from" in log and "step 8" in log
    assert "export of stage 0" in log and "rebuilding it from checkpoint step 6" in log
    damaged = sorted(p.name.split("-")[0] for p in (run_dir / "damaged").iterdir())
    assert damaged == ["10", "12"]  # moved aside, not deleted
    assert not (run_dir / "stage_2").exists()

    monkeypatch.setattr(hf_export, "save_hf", real_save_hf)
    (run_dir / "stage_1").rename(run_dir / "stage_1.replaced")  # a crash between the two renames of a swap
    lines = []
    last = train(cfg, log=lines.append)
    assert last.trained_here == 0 and last.complete and last.summary().startswith("already complete")
    assert "export of stage 2" in "\n".join(lines) and last.exports == [run_dir / "stage_2"]
    assert "export of stage 1" not in "\n".join(lines) and not (run_dir / "stage_1.replaced").exists()  # put back

    step_a, a = final_params(straight.run_dir)
    step_b, b = final_params(run_dir)
    assert step_a == step_b == 18 and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    for stage in range(3):
        assert_same_export(straight.run_dir / f"stage_{stage}", run_dir / f"stage_{stage}")
    assert_metrics_once_per_step(run_dir / "metrics.jsonl", 18)


def copy_of_straight(straight, assets, tmp_path: Path) -> tuple[Path, Path]:
    """The finished `straight` run folder copied under tmp_path (a resume-neutral save_path): (config, run_dir)."""
    import shutil

    cfg_path = write_config(tmp_path, assets, "straight")
    shutil.copytree(straight.run_dir, tmp_path / "runs" / "straight")
    return cfg_path, tmp_path / "runs" / "straight"


def folder_state(run_dir: Path) -> tuple[list[str], bytes]:
    """Everything a failed start must leave as it was: the run folder's files (names), metrics.jsonl."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")), (run_dir / "metrics.jsonl").read_bytes()


def test_resume_drops_a_damaged_metrics_line_that_is_not_utf8(assets, straight, tmp_path):
    """A metrics.jsonl whose last line was damaged into bytes that are not UTF-8 (a torn write, a bad disk
    block): re-running `train.py` resumes from the last checkpoint and drops that line as it drops any torn
    one, keeping every record before it (it stopped with a UnicodeDecodeError traceback when the trainer
    read metrics.jsonl its own way)."""
    cfg_path, run_dir = copy_of_straight(straight, assets, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    records = metrics.read_bytes()
    metrics.write_bytes(records + b'{"micro_step": 19, "loss": \xff\xfe\x00')
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints'} step 18" in proc.stdout
    assert metrics.read_bytes() == records and len(records.splitlines()) == 18


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), MemoryError("out of host memory"),
                                   ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")])
def test_restore_error_that_is_not_damage_stops_the_run_unchanged(assets, straight, tmp_path, monkeypatch, error):
    """An error of the machine (permission, memory; XLA's RESOURCE_EXHAUSTED) while restoring each
    checkpoint moves none of them to damaged/: the run stops naming the newest one and the error."""
    from ivtlr_jax.train.checkpoint import CheckpointReadError

    cfg_path, run_dir = copy_of_straight(straight, assets, tmp_path)
    before = folder_state(run_dir)

    def fail(self, step, *args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
    with pytest.raises(CheckpointReadError) as err:
        train(load_config(cfg_path), log=quiet)
    message = str(err.value)
    assert f"checkpoint step 18 in {run_dir / 'checkpoints'} could not be read ({type(error).__name__}: " in message
    assert "nothing was moved or changed" in message and "\n" not in message
    assert folder_state(run_dir) == before  # no damaged/, every checkpoint in place, metrics.jsonl as it was


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_checkpoint_files_stop_the_run_unchanged(assets, straight, tmp_path):
    from ivtlr_jax.train.checkpoint import CheckpointReadError

    cfg_path, run_dir = copy_of_straight(straight, assets, tmp_path)
    files = [f for item in ("trainable", "opt_state", "meta") for f in (run_dir / "checkpoints").glob(f"*/{item}/**/*")
             if f.is_file()]  # the items' files (what a restore reads), not the manager's step metadata
    for f in files:
        f.chmod(0)
    before = folder_state(run_dir)
    try:
        with pytest.raises(CheckpointReadError, match="checkpoint step 18 .* could not be read"):
            train(load_config(cfg_path), log=quiet)
        assert folder_state(run_dir) == before
    finally:
        for f in files:
            if f.exists():  # (the old code moved them to damaged/)
                f.chmod(0o644)


def test_run_with_progress_but_no_checkpoint_is_refused(assets, straight, tmp_path):
    """metrics.jsonl records 18 micro-steps but checkpoints/ is gone (an unmounted file system): `train.py`
    refuses in one line naming the folder and how to start over, and changes nothing; likewise an empty
    checkpoints/, and checkpoints that are all damaged (moved aside, then refused)."""
    cfg_path, run_dir = copy_of_straight(straight, assets, tmp_path)
    ckpts = run_dir / "checkpoints"
    ckpts.rename(tmp_path / "checkpoints.elsewhere")
    before = folder_state(run_dir)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: run folder {run_dir} records 18 micro-steps (metrics.jsonl) but {ckpts} is "
                           "missing, so it cannot resume; nothing was changed")
    assert f"mv {run_dir / 'metrics.jsonl'} {run_dir / 'metrics.jsonl.old'}" in line
    assert folder_state(run_dir) == before

    ckpts.mkdir()
    with pytest.raises(RunFolderError, match=f"but {ckpts} holds no checkpoint"):
        train(load_config(cfg_path), log=quiet)
    ckpts.rmdir()
    (tmp_path / "checkpoints.elsewhere").rename(ckpts)
    for meta in ckpts.glob("*/meta/metadata"):
        meta.write_text("{}")  # no position: every checkpoint is damaged
    with pytest.raises(RunFolderError, match=r"but none of its checkpoints could be restored \(moved to "):
        train(load_config(cfg_path), log=quiet)
    assert len(list((run_dir / "damaged").iterdir())) == 5 and not any(ckpts.iterdir())
    assert (run_dir / "metrics.jsonl").read_bytes() == before[1]


def test_non_finite_loss_stops_the_run_without_saving_it(assets, tmp_path, monkeypatch):
    from ivtlr_jax.train.loop import NonFiniteError

    cfg = load_config(write_config(tmp_path, assets, "diverges", optim={"lr": 1e30}))  # finite, so accepted
    metrics, synced, real_fsync = cfg.run_dir / "metrics.jsonl", [], os.fsync

    def fsync(fd):  # the lines of metrics.jsonl at each of its fsyncs
        if os.readlink(f"/proc/self/fd/{fd}") == str(metrics):
            synced.append(len(metrics.read_text().splitlines()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    from ivtlr_jax.events import EventLog

    real_close = EventLog.close

    def failing_close(self):
        real_close(self)
        raise OSError("the event log could not be closed")

    monkeypatch.setattr(EventLog, "close", failing_close)  # the checkpointer is still closed after it
    with pytest.raises(NonFiniteError) as err:
        train(cfg, log=quiet)
    assert synced == [2, 3]  # on disk before the checkpoint of step 2 is saved, and when closed
    assert err.value.__notes__ == ["also, while closing: OSError: the event log could not be closed"]
    message = str(err.value)
    # lr 1e30 steps the parameters to ~1e30 (still finite) at micro-step 2; the loss at 3 overflows
    assert "stage 0, epoch 0, micro-step 3" in message and "rows [" in message and "nothing of this step" in message
    assert f"last good checkpoint is step 2 in {cfg.run_dir / 'checkpoints'}" in message
    ckpts = cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2"]
    _, saved = final_params(cfg.run_dir)
    assert all(np.isfinite(v).all() for v in saved.values())
    records = assert_metrics_once_per_step(cfg.run_dir / "metrics.jsonl", 3)
    assert records[-1]["loss"] is None  # written as null, not as a bare NaN
    assert not (cfg.run_dir / "stage_0").exists()


def test_zero_gradient_streak_is_warned_once():
    from ivtlr_jax.train.loop import ZERO_GRAD_WARN_AFTER, ZeroGradientWatch

    lines = []
    watch = ZeroGradientWatch(lines.append)
    for step in range(1, ZERO_GRAD_WARN_AFTER):
        watch.update(0.0, step, stage=0, epoch=0)
    assert lines == []
    watch.update(0.3, ZERO_GRAD_WARN_AFTER, stage=0, epoch=0)  # the streak is broken
    for step in range(ZERO_GRAD_WARN_AFTER + 1, 3 * ZERO_GRAD_WARN_AFTER + 2):
        watch.update(0.0, step, stage=1, epoch=2)
    assert len(lines) == 1 and "exactly 0" in lines[0] and "stage 1" in lines[0]


@pytest.mark.parametrize("override, names", [
    ("train.num_epochs=0", "train.num_epochs"), ("train.num_epochs=-1", "train.num_epochs"),
    ("train.batch_size_training=0", "train.batch_size_training"), ("model.dtype=float64", "model.dtype"),
    ("model.remat=bogus", "model.remat"), ("optim.lr=-1", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"), ("optim.gradient_accumulation_steps=0", "optim.gradient_accumulation_steps"),
    ("lora.dropout=1.5", "lora.dropout"), ("latent.patch_order=random", "latent.patch_order"),
    ("curriculum.epochs_per_stage=0", "curriculum.epochs_per_stage"), ("data.dataset=vqa", "data.dataset"),
])
def test_bad_settings_are_refused_when_read(tmp_path, override, names):
    from ivtlr_jax.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "save_path": str(tmp_path / "runs")}))
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")) as err:
        load_config(path, [override])
    if "dtype" in override or "remat" in override or "patch_order" in override:
        assert "choose one of" in str(err.value)  # the allowed values are listed
    assert not (tmp_path / "runs").exists()


def test_bad_start_leaves_no_trace_and_resume_names_differing_keys(assets, tmp_path):
    from ivtlr_jax.config import ConfigError

    too_many = load_config(write_config(tmp_path, assets, "k", latent={"num_selected_patches": 150}))
    with pytest.raises(ConfigError, match=r"num_selected_patches=150 is larger than the 100 image tokens"):
        train(too_many, log=quiet)
    assert not (too_many.run_dir / "config.yaml").exists()

    typo = load_config(write_config(tmp_path, assets, "t", model={"model_id": str(assets / "modle")}))
    with pytest.raises(FileNotFoundError):
        train(typo, log=quiet)
    assert not (typo.run_dir / "config.yaml").exists()
    fixed = write_config(tmp_path, assets, "t")  # the corrected command is not refused
    assert train(load_config(fixed), max_steps=0, log=quiet).trained_here == 0
    assert (typo.run_dir / "config.yaml").exists()

    # logging-only keys and the folder's own location may change; anything else is named
    lines = []
    train(load_config(fixed, ["train.log_every=3", "train.keep_checkpoints=5", "log.tensorboard=false",
                              "log.wandb_project=elsewhere"]), max_steps=0, log=lines.append)
    assert "micro-batches per epoch" in lines[0] and "unknown" not in lines[0]  # no memory figure on the CPU
    moved = tmp_path / "elsewhere"
    typo.run_dir.parent.rename(moved)
    train(load_config(fixed, [f"save_path={moved}"]), max_steps=0, log=quiet)
    with pytest.raises(RunFolderError, match=r"optim\.lr: 0\.001 in the run, 0\.002 now; seed: 3 in the run, 4 now"):
        train(load_config(fixed, [f"save_path={moved}", "optim.lr=0.002", "seed=4"]), max_steps=0, log=quiet)


def test_collator_refuses_rows_with_fewer_image_tokens_than_k():
    from ivtlr_jax.data.collate import collate

    image, latent = 7, 9
    rows = [([1, image, image, image, latent, 5], [-100] * 5 + [5], None),
            ([1, image, image, latent, latent, 5], [-100] * 5 + [5], None)]
    batch, shapes = collate(rows, latent_id=latent, pad_id=0, image_token_id=image, num_selected_patches=2)
    assert shapes.num_latents == 2
    with pytest.raises(ValueError, match=r"row 1 has 2 image tokens before its first latent, fewer than .*=3"):
        collate(rows, latent_id=latent, pad_id=0, image_token_id=image, num_selected_patches=3)


def test_two_trainers_at_once_on_one_folder_one_is_refused_at_once(assets, tmp_path):
    """Two train.py on one run folder, started together: one trains, the other is refused before it loads
    anything (it ends while the first still runs) with one line naming the first's pid and host, status 2;
    the first's metrics have each micro-step once."""
    cfg_path = write_config(tmp_path, assets, "twice")
    run_dir = tmp_path / "runs" / "twice"
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "--max-steps", "2"]
    trainer = start_twice(command, f"error: {run_dir}")
    out, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, err[-3000:]
    assert "trained 2 micro-batches" in out and not lock_path(run_dir).exists()
    assert_metrics_once_per_step(run_dir / "metrics.jsonl", 2)


def test_train_command_prints_one_line_for_a_bad_setting(assets, tmp_path):
    cfg_path = write_config(tmp_path, assets, "cli")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "optim.lr=-1"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "optim.lr: -1.0" in proc.stderr


# ---- observability: event files, quiet exports ------------------------------------------------------------
def assert_events_match_metrics(run_dir: Path) -> dict:
    """Every metrics.jsonl record is in <run>/tensorboard/train, once per micro-step, with its values."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = read_event_scalars(run_dir / "tensorboard" / "train")
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "stage", "epoch"):
        logged = scalars[f"train/{key}"]
        assert sorted(logged) == [r["micro_step"] for r in records], key
        np.testing.assert_allclose([logged[r["micro_step"]] for r in records], [r[key] for r in records],
                                   rtol=1e-6, err_msg=key)
    return scalars


def test_event_files_hold_the_runs_scalars(straight):
    scalars = assert_events_match_metrics(straight.run_dir)
    assert set(scalars["train/lr"].values()) == {np.float32(1e-3)}  # the constant schedule of the test config
    assert sorted(set(scalars["train/stage"].values())) == [0.0, 1.0, 2.0]


def test_exports_of_a_run_are_quiet_and_load_their_processor(straight, tmp_path):
    """No transformers warning about token ids of our own configs, no orbax warning about a missing metadata
    file, when a trained run folder is exported; the stage export's processor loads (AutoProcessor where
    torchvision is installed: transformers 5 builds Qwen2-VL's video processor with it, always)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from ivtlr_jax.export import export
    from ivtlr_jax.data import load_processor

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []

        def emit(self, record):
            self.lines.append(f"{record.name}: {record.getMessage()}")

    collect = Collect()
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("absl")]
    hf_logging.warning_once.cache_clear()  # said once per process: another test may have said it already
    for logger in loggers:
        logger.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export(straight.run_dir, tmp_path / "hf", log=collect.lines.append)
            processor = load_processor(straight.run_dir / "stage_2")
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    text = "\n".join(collect.lines + [str(w.message) for w in caught])
    assert "loading training run" in text and "writing" in text  # the progress lines are collected too
    for noise in ("must be `None` or an integer within the vocabulary", "Metadata file does not exist",
                  "token_id"):
        assert noise not in text, text
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["bos_token_id"] is None
    assert processor.tokenizer.convert_tokens_to_ids("<|latent|>") == len(processor.tokenizer) - 1
    # the settings the Predictor (ivtlr-ask, ivtlr-serve) asks it with: the run's
    from ivtlr_jax.config import InferenceSettings, load_config
    from ivtlr_jax.io.settings_file import read_settings

    assert read_settings(straight.run_dir / "stage_2") == InferenceSettings.from_run(
        load_config(straight.run_dir / "config.yaml"))

    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        auto = AutoProcessor.from_pretrained(straight.run_dir / "stage_2")
        assert len(auto.tokenizer) == len(processor.tokenizer)
    else:  # what README says: AutoProcessor needs torchvision, ivtlr_jax.data.load_processor does not
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(straight.run_dir / "stage_2")


# ---- resume on changed contents ---------------------------------------------------------------------------
def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_refuses_to_resume_on_a_changed_base_model_or_data(assets, tmp_path):
    """train.py resumed after the base model folder changed in place (one tensor rescaled) or after the
    training rows were reordered (same names, other contents) is refused with one line naming which and how
    to proceed, before anything is loaded, the run folder untouched (fingerprints.json, train/fingerprints.py)."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file, save_file

    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(assets / "model", model)
    shutil.copytree(assets / "data", data)
    cfg_path = write_config(tmp_path, assets, "contents", model={"model_id": str(model)}, data={"source": str(data)})
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "--max-steps", "2"]  # 1 checkpoint
    run = lambda: subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                                 text=True, timeout=300)
    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "contents"
    before = folder_bytes(run_dir)

    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5  # one tensor rescaled, names and shapes kept
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    refused = run()
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-3000:]
    assert refused.stderr.startswith(f"error: run folder {run_dir} was begun with other contents of the base model "
                                     "(model.model_id)") and "name=contents_new" in refused.stderr, refused.stderr
    assert "training data" not in refused.stderr and folder_bytes(run_dir) == before

    shutil.copy(assets / "model" / "model.safetensors", model / "model.safetensors")
    table = pq.read_table(data / "train.parquet")
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), data / "train.parquet")  # the same rows, reordered
    refused = run()
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-3000:]
    assert "other contents of the training data (data.source, data.train_split)" in refused.stderr, refused.stderr
    assert "base model" not in refused.stderr and folder_bytes(run_dir) == before
    assert set(json.loads(before["fingerprints.json"])) == {"base_model", "data"}  # recorded when the run began
    shutil.copy(assets / "data" / "train.parquet", data / "train.parquet")  # the original contents: it resumes
    resumed = run()
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
