"""optim.loss_scale=token_mean: every optimizer step divides its summed token losses by the supervised tokens
of exactly the micro-batches that form it, also when its window spans two epochs, and a window cut by a
stage's optimizer reset counts only its own micro-batches (issue #27 item 10)."""

import json

import numpy as np
import pytest

from ivtlr_jax.demo import prepare
from ivtlr_jax.train.token_windows import optimizer_window
from tests.test_train_loop import run_command_on_devices, write_config

# 20 rows, 4 per micro-step on 1 device: 5 micro-batches per epoch; accumulation 3; 3 epochs, stages of 2 epochs
# (stage 1 with a latent) and optim.reset_optimizer: the optimizer is reset at micro-step 10. A learning rate of
# 1e-30 keeps the parameters as initialised for the losses, yet moves LoRA's B factors (initialised to 0) off 0
# at each optimizer step (about 1e-30, a normal float32), so a step that was applied shows in the parameters.
def windows_run(tmp_path, assets, loss_scale: str, save_every_steps: int):
    """`train.py` on 1 device with these settings and `loss_scale` (the run's name) -> its run folder."""
    cfg_path = write_config(tmp_path, assets, loss_scale, data={"limit": 20},
                            curriculum={"epochs_per_stage": 2, "max_latent_stage": 1},
                            optim={"lr": 1e-30, "gradient_accumulation_steps": 3, "reset_optimizer": True,
                                   "loss_scale": loss_scale},
                            train={"num_epochs": 3, "batch_size_training": 4, "save_every_steps": save_every_steps,
                                   "keep_checkpoints": 10})
    done = run_command_on_devices(cfg_path, 1)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp_path / "runs" / loss_scale


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows_assets")
    prepare(root, seed=1, num_train=24, num_test=4)
    return root


@pytest.fixture(scope="module")
def micro_batch_mean_run(assets, tmp_path_factory):
    """The micro_batch_mean run (the default loss scale), checkpointed at every micro-step: both tests read it."""
    return windows_run(tmp_path_factory.mktemp("micro_batch_mean"), assets, "micro_batch_mean", save_every_steps=1)


def test_optimizer_windows_follow_the_run_not_the_epoch():
    # 5 micro-batches per epoch, accumulation 3, the optimizer reset at micro-step 10 (a stage of 2 epochs)
    windows = sorted({optimizer_window(m, 3, (0, 10), 15) for m in range(15)})
    assert windows == [(0, 3), (3, 6), (6, 9), (9, 10), (10, 13), (13, 15)]
    assert sorted({optimizer_window(m, 3, (0,), 10) for m in range(10)}) == [(0, 3), (3, 6), (6, 9), (9, 10)]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_token_mean_divides_each_optimizer_step_by_its_own_tokens(assets, micro_batch_mean_run, tmp_path):
    """Two `train.py` runs on 1 device over the same rows (20 rows, 4 per micro-step: 5 micro-batches per
    epoch; accumulation 3; 3 epochs, stages of 2 epochs, optim.reset_optimizer) with a learning rate of 1e-30,
    so the parameters stay as initialised: micro_batch_mean logs each micro-batch's token mean (its 4 rows are
    one replica's group), so loss x tokens is its summed token loss; token_mean must log that sum divided by
    (its optimizer window's tokens / the window's micro-batches), windows counted from the run's start and
    from the reset at micro-step 10: [0,3) [3,6) (across the epoch boundary) [6,9) [9,10) [10,13) [13,15)."""
    runs = {"micro_batch_mean": metrics(micro_batch_mean_run),
            "token_mean": metrics(windows_run(tmp_path, assets, "token_mean", save_every_steps=0))}
    mean, token = runs["micro_batch_mean"], runs["token_mean"]
    assert [r["micro_step"] for r in token] == list(range(1, 16))
    tokens = np.array([r["tokens"] for r in mean], dtype=np.float64)
    assert [r["tokens"] for r in token] == tokens.tolist()  # the same rows in the same order
    summed_loss = np.array([r["loss"] for r in mean]) * tokens
    denominators = np.empty(15)
    for start, end in [(0, 3), (3, 6), (6, 9), (9, 10), (10, 13), (13, 15)]:
        denominators[start:end] = tokens[start:end].sum() / (end - start)
    np.testing.assert_allclose([r["loss"] for r in token], summed_loss / denominators, rtol=1e-5)


def checkpoint_items(run_dir, step: int, item: str) -> dict:
    """{key path: array} of one item (trainable, opt_state) of a checkpoint."""
    import orbax.checkpoint as ocp

    flat = {}

    def walk(node, prefix=()):
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            walk(value, (*prefix, str(key))) if isinstance(value, (dict, list, tuple)) else \
                flat.__setitem__((*prefix, str(key)), np.asarray(value))

    walk(ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / item).absolute()))
    return flat


def test_a_window_cut_by_an_optimizer_reset_is_applied_not_dropped(micro_batch_mean_run):
    """`train.py` on 1 device: 5 micro-batches per epoch, accumulation 3, stages of 2 epochs and
    optim.reset_optimizer, so stage 0's windows are micro-steps 1-3, 4-6, 7-9 and 10, which the reset at the
    next stage would drop. It is applied at micro-step 10 as a 4th optimizer step: checkpoint 10's parameters
    differ from checkpoint 9's, and its optimizer state holds no accumulated micro-batch and 4 steps. (The run:
    the token-mean test's micro_batch_mean run, the whole run, so the reset follows micro-step 10.)"""
    run_dir = micro_batch_mean_run
    before, after = checkpoint_items(run_dir, 9, "trainable"), checkpoint_items(run_dir, 10, "trainable")
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # micro-step 10's gradient was applied
    opt_state = checkpoint_items(run_dir, 10, "opt_state")
    counters = {path[-1]: int(v) for path, v in opt_state.items() if path[-1] in ("mini_step", "gradient_step")}
    assert counters == {"mini_step": 0, "gradient_step": 4}, counters
