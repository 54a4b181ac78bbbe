"""The run report (`python -m ivtlr_jax.report RUN_FOLDER`): per-stage table values against sums done here by
hand, null and torn lines, evaluations found by stage, the PNG, and the error for a folder without metrics."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from ivtlr_jax import report
from ivtlr_jax.run_folder import parse_metrics_lines

# 2 stages x 2 epochs x 3 micro-steps; (epoch, loss, grad_norm, tokens_per_s, compilations)
ROWS = [
    (0, 5.0, 9.0, 100.0, 1), (0, 4.0, 8.0, 900.0, 1), (0, 3.0, 7.0, 1100.0, 1),
    (1, 2.5, 6.0, 1000.0, 1), (1, 2.0, 5.0, 1200.0, 1), (1, 1.5, 4.0, 800.0, 1),
    (2, 3.0, 3.0, 50.0, 2), (2, None, None, 1300.0, 2), (2, 2.0, 2.0, 1500.0, 2),
    (3, 1.0, 2.0, 1400.0, 2), (3, None, 1.0, 1600.0, 2), (3, 0.4, 1.0, None, 3),
]
EPOCHS_PER_STAGE = 2


def metric_lines():
    """One JSON line per micro-step, in the trainer's format (null for non-finite)."""
    lines = []
    for step, (epoch, loss, grad, tps, comp) in enumerate(ROWS, start=1):
        stage = epoch // EPOCHS_PER_STAGE
        lines.append(json.dumps({"micro_step": step, "epoch": epoch, "stage": stage, "loss": loss, "grad_norm": grad,
                                 "tokens": 1000, "tokens_per_s": tps, "latents": stage, "compilations": comp}))
    return lines


def write_run(folder, torn_lines=("{\"micro_step\": 13, \"epo", "[1, 2]")):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("name: handmade\nmodel:\n  model_id: some/model\n")
    lines = metric_lines()
    lines.insert(4, torn_lines[1])  # valid JSON, not a record
    (folder / "metrics.jsonl").write_text("\n".join(lines + [torn_lines[0]]))
    return folder


def test_stage_table_values_by_hand(tmp_path):
    run = write_run(tmp_path / "run")
    metrics = report.read_metrics(run)
    assert len(metrics) == 12 and metrics.torn == 2
    rows = report.stage_rows(metrics)
    assert [r.stage for r in rows] == [0, 1]
    assert [r.epochs for r in rows] == [[0, 1], [2, 3]]
    assert [r.micro_steps for r in rows] == [6, 6]
    assert [r.latents for r in rows] == [0, 1]
    # final loss: the mean of the last epoch's non-null losses
    assert rows[0].final_loss == pytest.approx((2.5 + 2.0 + 1.5) / 3)
    assert rows[1].final_loss == pytest.approx((1.0 + 0.4) / 2)
    # tokens/s: all non-null values of the stage; steady: without the steps where the compilation count grew
    assert rows[0].mean_tokens_per_s == pytest.approx((100 + 900 + 1100 + 1000 + 1200 + 800) / 6)
    assert rows[0].steady_tokens_per_s == pytest.approx((900 + 1100 + 1000 + 1200 + 800) / 5)
    assert rows[1].mean_tokens_per_s == pytest.approx((50 + 1300 + 1500 + 1400 + 1600) / 5)
    assert rows[1].steady_tokens_per_s == pytest.approx((1300 + 1500 + 1400 + 1600) / 4)
    assert [r.null_losses for r in rows] == [0, 2]
    assert np.isnan(metrics.grad_norm).sum() == 1
    assert rows[0].accuracy_strict is None


def test_a_stage_whose_last_epoch_has_only_null_losses_has_no_final_loss(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"micro_step": i + 1, "epoch": i // 2, "stage": 0, "loss": [1.0, 2.0, None, None][i], "grad_norm": 1.0,
                "tokens": 10, "tokens_per_s": 5.0, "latents": 0, "compilations": 1} for i in range(4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (row,) = report.stage_rows(report.read_metrics(run))
    assert math.isnan(row.final_loss)
    assert " - " in report.format_table([row]).splitlines()[1]


def test_duplicate_micro_steps_keep_the_last_record():
    steps = ((2, 9.0), (1, 1.0), (2, 3.0))
    lines = [json.dumps({"micro_step": s, "epoch": 0, "stage": 0, "loss": v}) for s, v in steps]
    records, torn = parse_metrics_lines(lines + ["", "not json", json.dumps({"micro_step": "x"})])
    metrics = report.metrics_from_records(records, torn)
    assert metrics.micro_step.tolist() == [1, 2] and metrics.loss.tolist() == [1.0, 3.0] and metrics.torn == 2


def test_evaluations_are_attributed_to_their_stage(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "stage_0").mkdir()
    (run / "stage_0" / "eval_test.summary.json").write_text(
        json.dumps({"accuracy_strict": 0.5, "accuracy_official": 0.625, "examples": 8}))
    (run / "eval_test.summary.json").write_text(json.dumps({"accuracy_strict": 0.75, "accuracy_official": 0.875,
                                                            "examples": 16, "setup": {"model": str(run / "stage_1")}}))
    (run / "eval_other.summary.json").write_text(json.dumps({"accuracy_strict": 0.1, "setup": {"model": "/elsewhere"}}))
    evaluations, unknown = report.find_evaluations(run)
    assert sorted(evaluations) == [0, 1]
    assert [p.name for p in unknown] == ["eval_other.summary.json"]
    rows = report.stage_rows(report.read_metrics(run), evaluations)
    assert (rows[0].accuracy_strict, rows[0].accuracy_official, rows[0].eval_examples) == (0.5, 0.625, 8)
    assert (rows[1].accuracy_strict, rows[1].accuracy_official, rows[1].eval_examples) == (0.75, 0.875, 16)


def test_main_prints_the_table_and_writes_the_png(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    (run / "stage_1").mkdir()
    (run / "stage_1" / "x.summary.json").write_text(json.dumps({"accuracy_strict": 0.75, "accuracy_official": 0.8,
                                                                "examples": 16}))
    out = tmp_path / "pictures" / "r.png"
    assert report.main([str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 unparseable line(s) skipped" in text and "2 null loss(es)" in text and "1 null gradient norm(s)" in text
    table = {line.split()[0]: line.split() for line in text.splitlines() if line.split()[:1] in (["0"], ["1"])}
    # stage, latents, epochs, micro-steps, final loss, tokens/s, steady tokens/s, acc strict, acc official, examples
    assert table["0"][:7] == ["0", "0", "0-1", "6", f"{(2.5 + 2.0 + 1.5) / 3:.4f}", "850", "1000"]
    assert table["1"] == ["1", "1", "2-3", "6", f"{(1.0 + 0.4) / 2:.4f}", "1170", "1450", "0.750", "0.800", "16"]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == report.DEFAULT_SIZE
    assert report.main([str(run)]) == 0
    assert (run / "report.png").is_file()


def test_png_has_the_requested_size_and_shows_curves(tmp_path):
    run = write_run(tmp_path / "run")
    metrics = report.read_metrics(run)
    out = report.plot_report(metrics, report.stage_rows(metrics), tmp_path / "r.png", title="t", size=(640, 480))
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape == (480, 640, 3)
    # the loss curve is drawn in matplotlib's tab:blue (31, 119, 180)
    assert (np.abs(pixels - [31, 119, 180]).sum(-1) < 30).sum() > 50


def test_missing_metrics_names_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "nothing")])
    assert str(tmp_path / "nothing" / "metrics.jsonl") in str(exit_info.value.code)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("{\"micro\n")
    with pytest.raises(report.ReportError, match=r"empty/metrics\.jsonl: no metrics record in it \(1 unparseable"):
        report.read_metrics(empty)


def test_moving_mean_matches_a_plain_loop():
    values = np.array([1.0, np.nan, 3.0, 4.0, np.nan, np.nan, np.nan, 8.0])
    window = 3
    expected = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1): i + 1] if not np.isnan(v)]
        expected.append(sum(seen) / len(seen) if seen else np.nan)
    np.testing.assert_allclose(report.moving_mean(values, window), expected)


def test_log_scale_only_for_positive_values_spanning_a_wide_range():
    assert report.wants_log_scale(np.array([10.0, 0.1, np.nan]))
    assert not report.wants_log_scale(np.array([2.0, 1.0]))
    assert not report.wants_log_scale(np.array([10.0, 0.0]))
    assert not report.wants_log_scale(np.array([np.nan]))
