"""Evaluation runs: sharded over 4 devices it writes the records of a 1-device run; an output is tied to
its setup (resumed only with the same one, a torn last line redone); the dtype is the run config's;
infer.py takes config overrides and --dtype / --devices, and its help reads cleanly."""

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ivtlr_jax.config import DataSection, EvalSection, LatentSection, ModelSection
from ivtlr_jax.demo import prepare
from ivtlr_jax.eval import run as eval_run
from ivtlr_jax.eval import setup as output_setup
from ivtlr_jax.eval.run import EvalConfig, evaluate
from ivtlr_jax.eval.setup import EvalSetupError, setup_path
from ivtlr_jax.generate import SamplingConfig
from tests.twice import start_twice

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)


def scale_weights(model_dir: Path) -> None:
    """A random tiny model writes the same text for every input (its tiny weights leave the current
    token's embedding in charge); larger weights make the text depend on the image and question."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(path)
    for name in weights:
        lm = name.startswith("model.layers") and name.endswith("proj.weight")
        if lm or name in ("lm_head.weight", "model.embed_tokens.weight"):
            weights[name] = weights[name] * 8
        elif name.startswith("visual.") and name.endswith("weight") and "norm" not in name and "ln_q" not in name:
            weights[name] = weights[name] * 4
    save_file(weights, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Qwen2-VL with input-dependent outputs, and a test split of 7 rows, one without an image."""
    root = tmp_path_factory.mktemp("eval_assets")
    prepare(root, seed=1, num_train=8, num_test=6)
    scale_weights(root / "model")
    test = pq.read_table(root / "data" / "test.parquet")
    rows = test.to_pylist()
    rows.append(dict(rows[0], id="no-image", image=None))
    pq.write_table(pa.Table.from_pylist(rows, schema=test.schema), root / "data" / "test.parquet")
    return root


def eval_cfg(assets: Path, **changes) -> EvalConfig:
    """The tests' evaluation (float32, K=4, 6 new tokens) with `changes` as `EvalConfig.replace` takes them."""
    base = EvalConfig(DataSection(source=str(assets / "data"), eval_split="test"),
                      LatentSection(num_selected_patches=4), ModelSection(dtype="float32", param_dtype="float32"),
                      EvalSection(batch_size=4, max_new_tokens=6, length_buckets=(256, 384)))
    return base.replace(**changes)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_device(assets, tmp_path_factory):
    """(output, summary) of a 1-device evaluation: 6 examples in batches of 4 (the second padded)."""
    out = tmp_path_factory.mktemp("eval1") / "eval.jsonl"
    summary = evaluate(assets / "model", eval_cfg(assets, devices=1), out, **QUIET)
    return out, summary


def test_four_devices_write_the_records_of_one_device(assets, one_device, tmp_path):
    out1, summary1 = one_device
    out4 = tmp_path / "eval4.jsonl"  # static batches, their rows split over the devices
    summary4 = evaluate(assets / "model", eval_cfg(assets, eval=dict(batching="static")), out4,
                        save_attention=tmp_path / "pictures", **QUIET)
    assert (summary1["devices"], summary4["devices"], summary4["batching"]) == (1, 4, "static")
    one, four = lines(out1), lines(out4)
    assert len(one) == 6 and [r["id"] for r in one] == [r["id"] for r in four]
    assert len({r["generated"] for r in one}) > 1  # the text depends on the input: a meaningful comparison
    for a, b in zip(one, four):
        for key in ("generated", "prediction", "correct", "correct_official", "selected_patches", "generated_tokens"):
            assert a[key] == b[key], (a["id"], key)
    assert out1.read_text() == out4.read_text()
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == sorted(f"{r['id']}.png" for r in one)
    # skipped rows by reason; the setup (with the dtype) in the summary and beside the output
    assert summary4["skipped"] == {"no_image": 1, "already_done": 0} and summary4["rows_read"] == 7
    assert summary4["dtype"] == "float32" and summary4["setup"]["dtype"] == "float32"
    setup = json.loads(setup_path(out4).read_text())
    assert setup == summary4["setup"] and setup["prompt_format"] == "train" and setup["num_selected_patches"] == 4


def test_continuous_batching_writes_the_records_of_one_at_a_time(assets, one_device, tmp_path, monkeypatch):
    """The one-device default (auto) is continuous batching and writes the records of static batches of
    one. With an EOS that ends answers at different lengths, two slots refilled as rows finish still do,
    in the examples' order."""
    out1, summary1 = one_device
    assert summary1["batching"] == "continuous"
    static = lambda new=6: eval_cfg(assets, devices=1, eval=dict(batch_size=1, batching="static", max_new_tokens=new))
    alone = tmp_path / "alone.jsonl"
    summary = evaluate(assets / "model", static(), alone, **QUIET)
    assert summary["batching"] == "static" and alone.read_text() == out1.read_text()

    answers = []  # the generated ids, as evaluation decodes them (numpy rows; prompts are lists)
    real_processor = eval_run.load_processor

    def spying_processor(folder):
        processor = real_processor(folder)
        decode = processor.tokenizer.decode
        processor.tokenizer.decode = lambda ids, **kw: (
            answers.append(ids.tolist()) if isinstance(ids, np.ndarray) else None, decode(ids, **kw))[1]
        return processor

    monkeypatch.setattr(eval_run, "load_processor", spying_processor)
    evaluate(assets / "model", static(12), tmp_path / "free.jsonl", **QUIET)
    eos = next(a[2] for a in answers if a[2] not in a[:2])  # an EOS that ends one answer after 2 tokens
    real = eval_run.special_tokens
    monkeypatch.setattr(eval_run, "special_tokens",
                        lambda processor: dataclasses.replace(real(processor), eos_token_id=eos))
    alone_eos, continuous = tmp_path / "alone_eos.jsonl", tmp_path / "continuous.jsonl"
    evaluate(assets / "model", static(12), alone_eos, **QUIET)
    cfg = eval_cfg(assets, devices=1, eval=dict(batch_size=2, batching="continuous", max_new_tokens=12))
    evaluate(assets / "model", cfg, continuous, **QUIET)
    lengths = [r["generated_tokens"] for r in lines(alone_eos)]
    assert min(lengths) < 12 and len(set(lengths)) > 1, lengths  # rows finish at different steps
    assert continuous.read_text() == alone_eos.read_text()


def test_continuous_batching_on_four_devices_writes_the_records_of_one(assets, one_device, tmp_path):
    """The default (auto) on 4 devices is continuous batching too, its slots split over the devices: the
    records of the one-device continuous run, byte for byte (and so of static batches of one)."""
    out1, summary1 = one_device
    out4 = tmp_path / "continuous4.jsonl"
    summary4 = evaluate(assets / "model", eval_cfg(assets), out4, **QUIET)
    assert (summary1["batching"], summary4["batching"]) == ("continuous", "continuous")
    assert (summary1["devices"], summary4["devices"], summary4["rows_per_batch"]) == (1, 4, 4)
    assert len(lines(out4)) == 6 and out4.read_text() == out1.read_text()
    slots8 = tmp_path / "slots8.jsonl"  # two slots per device
    evaluate(assets / "model", eval_cfg(assets, eval=dict(batch_size=8, batching="continuous")), slots8, **QUIET)
    assert slots8.read_text() == out1.read_text()


def test_an_eval_config_changes_one_setting_in_its_section_and_refuses_bad_ones(assets):
    """`replace` changes the keys named under a section and keeps the section's others; a bad value is refused
    by the section's check, named as its run config key; a key outside any section is a TypeError."""
    cfg = eval_cfg(assets, eval=dict(batching="static"), latent=dict(rope="mrope"), limit=3)
    assert (cfg.eval.batching, cfg.eval.batch_size, cfg.latent.rope, cfg.latent.num_selected_patches, cfg.limit) == (
        "static", 4, "mrope", 4, 3)
    assert type(cfg.eval.batching).__name__ == "Batching" and cfg.model == eval_cfg(assets).model
    with pytest.raises(ValueError, match=r"^eval config: eval\.batching: 'dynamic' is not allowed"):
        eval_cfg(assets, eval=dict(batching="dynamic"))
    with pytest.raises(ValueError, match=r"^eval config: eval: unknown key\(s\) \['batch_sise'\] \(did you mean "
                                         r"'batch_size'\?\)"):
        eval_cfg(assets, eval=dict(batch_sise=2))
    with pytest.raises(TypeError, match=r"unknown key\(s\) \['batch_size'\]; a section's keys go under its name"):
        eval_cfg(assets, batch_size=2)
    with pytest.raises(ValueError, match=r"^eval config: devices: 0 must be >= 1"):
        eval_cfg(assets, devices=0)


def test_resume_redoes_a_torn_last_line_and_counts_the_rest_as_done(assets, one_device, tmp_path, disk_calls):
    out1, _ = one_device
    out = tmp_path / "eval.jsonl"
    shutil.copy(setup_path(out1), setup_path(out))
    complete = out1.read_bytes()
    out.write_bytes(complete[:-20])  # a run stopped while writing the last record
    logged = []
    summary = evaluate(assets / "model", eval_cfg(assets, devices=1), out, log=logged.append)
    summary_file = output_setup.summary_path(out)  # written atomically, after the records are on disk
    written = disk_calls.index(("rename", summary_file.with_name(summary_file.name + ".tmp"), summary_file))
    assert ("fsync", out) in disk_calls[:written] and json.loads(summary_file.read_text()) == summary
    assert any("torn last line (line 6" in m for m in logged), logged
    assert out.read_bytes() == complete
    assert summary["skipped"]["already_done"] == 5 and summary["evaluated_now"] == 1 and summary["examples"] == 6
    # a newline-terminated last line that is not JSON is torn too; a bad line before it is an error
    out.write_bytes(complete + b'{"id": "x", "gen\n')
    assert [r["id"] for r in output_setup.read_records(out, log=logged.append)] == [r["id"] for r in lines(out1)]
    assert out.read_bytes() == complete
    broken = complete.split(b"\n")
    broken[2] = b"{not json"
    out.write_bytes(b"\n".join(broken))
    with pytest.raises(EvalSetupError, match=r"eval\.jsonl, line 3: not a JSON record"):
        output_setup.read_records(out)


def test_an_output_of_another_setup_is_refused(assets, one_device, tmp_path):
    out1, _ = one_device
    out = tmp_path / "eval.jsonl"

    def copy_output(with_setup=True):
        shutil.copy(out1, out)
        if with_setup:
            shutil.copy(setup_path(out1), setup_path(out))

    copy_output()
    with pytest.raises(EvalSetupError, match=r"prompt_format: 'train' in the output, 'official' now"):
        evaluate(assets / "model", eval_cfg(assets, eval=dict(prompt_format="official")), out, **QUIET)
    with pytest.raises(EvalSetupError, match=r"dtype: 'float32' in the output, 'bfloat16' now"):
        evaluate(assets / "model", eval_cfg(assets, model=dict(dtype="bfloat16", param_dtype="bfloat16")), out, **QUIET)
    with pytest.raises(EvalSetupError, match=r"num_latents: 3 in the output, 2 now.*num_selected_patches: 4"):
        evaluate(assets / "model", eval_cfg(assets, eval=dict(num_latents=2), latent=dict(num_selected_patches=3)),
                 out, **QUIET)
    # another model (e.g. stage_0 where stage_3 wrote the output): its weights differ
    other = tmp_path / "stage_0"
    shutil.copytree(assets / "model", other)
    scale_weights(other)
    with pytest.raises(EvalSetupError, match="weights_fingerprint: '[0-9a-f]{64}' in the output, '[0-9a-f]{64}' now"):
        evaluate(other, eval_cfg(assets), out, **QUIET)
    # an output without its setup record cannot be trusted
    setup_path(out).unlink()
    with pytest.raises(EvalSetupError, match="no setup record eval.setup.json"):
        evaluate(assets / "model", eval_cfg(assets), out, **QUIET)
    assert out.read_bytes() == out1.read_bytes()  # nothing was touched


def test_weights_fingerprint_sees_one_changed_tensor_and_not_a_moved_folder(assets, tmp_path, monkeypatch):
    from safetensors.numpy import load_file, save_file

    from ivtlr_jax.io import fingerprint

    monkeypatch.setattr(fingerprint, "SMALL_FILE", 0)  # sample every file as if it were large
    moved = tmp_path / "moved"
    shutil.copytree(assets / "model", moved)
    base = fingerprint.weights_fingerprint(assets / "model")
    assert fingerprint.weights_fingerprint(moved) == base
    weights = load_file(moved / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3  # one small tensor, every element
    save_file(weights, moved / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint.weights_fingerprint(moved) != base
    (moved / "model.safetensors").unlink()
    with pytest.raises(fingerprint.FingerprintError, match="no weight files"):
        fingerprint.weights_fingerprint(moved)


def test_the_run_configs_dtype_reaches_the_model(assets, tmp_path, monkeypatch):
    loaded = {}

    class Stop(Exception):
        pass

    def fake_from_pretrained(path, **kw):
        loaded.update(kw)
        raise Stop

    monkeypatch.setattr(eval_run, "from_pretrained", fake_from_pretrained)
    with pytest.raises(Stop):
        evaluate(assets / "model", eval_cfg(assets, model=dict(dtype="bfloat16", param_dtype="float32",
                                                               attention_impl="fused")), tmp_path / "e.jsonl", **QUIET)
    assert (str(loaded["dtype"]), str(loaded["param_dtype"]), loaded["attention_impl"]) == ("bfloat16", "float32",
                                                                                            "fused")
    # a setup with fused attention says so (it rounds otherwise in bf16); the default one keeps its old keys
    setup_of = lambda **changes: output_setup.eval_setup(assets / "model", eval_cfg(assets, **changes),
                                                         SamplingConfig(max_new_tokens=6))
    assert setup_of(model=dict(attention_impl="fused"))["attention_impl"] == "fused"
    assert setup_of(latent=dict(patch_deepstack=False))["patch_deepstack"] is False
    # the keys, order and values older outputs hold (they still resume), each value set apart from the others
    written = setup_of(eval=dict(num_latents=2, prompt_format="official"), model=dict(param_dtype="bfloat16"),
                       latent=dict(num_selected_patches=5, patch_order="position", rope="mrope"), limit=7)
    assert list(written) == ["version", "model", "weights_fingerprint", "dataset", "source", "split",
                             "data_fingerprint", "prompt_format", "num_latents", "num_selected_patches", "patch_order",
                             "rope", "dtype", "param_dtype", "max_new_tokens", "temperature", "top_p", "limit"]
    assert json.dumps({k: v for k, v in written.items() if "fingerprint" not in k and k not in ("model", "source")}) \
        == ('{"version": 2, "dataset": "m3cot", "split": "test", "prompt_format": "official", "num_latents": 2, '
            '"num_selected_patches": 5, "patch_order": "position", "rope": "mrope", "dtype": "float32", '
            '"param_dtype": "bfloat16", "max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "limit": 7}')
    # so does one whose images the processor sized (data.image_resize); the default one keeps its old keys
    assert setup_of(data=dict(image_resize="processor"))["image_resize"] == "processor"
    assert "image_resize" not in setup_of() and "attention_impl" not in setup_of()
    with pytest.raises(ValueError, match=r"attention_impl: 'flash' is not allowed; choose one of \['fused', 'xla'\]"):
        eval_cfg(assets, model=dict(attention_impl="flash"))
    default = EvalConfig(DataSection(source="x")).model  # the official evaluation's precision by default
    assert (default.dtype, default.param_dtype) == ("bfloat16", "bfloat16")
    with pytest.raises(ValueError, match=r"dtype: 'fp8' is not allowed; choose one of \['bfloat16', 'float16'"):
        eval_cfg(assets, model=dict(dtype="fp8"))
    with pytest.raises(ValueError, match="devices=8 but only 4 local devices"):
        evaluate(assets / "model", eval_cfg(assets, devices=8), tmp_path / "e8.jsonl", **QUIET)
    assert not (tmp_path / "e8.jsonl").exists()


def test_two_evaluations_at_once_into_one_output_one_is_refused_at_once(assets, tmp_path):
    """Two infer.py into one --out, started together: one evaluates, the other is refused before it loads
    anything (it ends while the first still runs) with one line naming the first's pid and host, status 2;
    the output holds each example once."""
    out = tmp_path / "eval.jsonl"
    command = [sys.executable, str(ROOT / "infer.py"), "--config", str(write_run_config(tmp_path, assets, "float32")),
               "--checkpoint", str(assets / "model"), "--out", str(out), "--max-new-tokens", "4"]
    evaluator = start_twice(command, f"infer.py: error: {out}")
    _, err = evaluator.communicate(timeout=300)
    assert evaluator.returncode == 0, err[-3000:]
    ids = [r["id"] for r in lines(out)]
    assert len(ids) == len(set(ids)) == 6 and json.loads(output_setup.summary_path(out).read_text())["examples"] == 6
    assert not (tmp_path / "eval.jsonl.lock").exists()


def write_run_config(tmp_path: Path, assets: Path, dtype: str = "bfloat16") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"model_id": str(assets / "model"), "dtype": dtype, "param_dtype": dtype, "scan_layers": False},
        "latent": {"num_selected_patches": 4, "patch_order": "position"},
        "data": {"dataset": "m3cot", "source": str(assets / "data"), "eval_split": "test"},
    }))
    return path


def test_infer_takes_overrides_dtype_and_devices(assets, tmp_path, monkeypatch, capsys):
    import infer
    from ivtlr_jax.cli import infer as command

    calls = []
    monkeypatch.setattr(command, "evaluate", lambda model, cfg, out, **kw: calls.append((cfg, out)) or {"examples": 0})
    config = write_run_config(tmp_path, assets)
    base = ["--config", str(config), "--checkpoint", str(assets / "model")]
    infer.main(base)
    cfg, out = calls[-1]
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.devices) == ("bfloat16", "bfloat16", None)  # the run config's
    assert (cfg.latent.num_selected_patches, cfg.latent.patch_order, cfg.model.scan_layers) == (4, "position", False)
    assert (cfg.data.eval_split, cfg.eval.batch_size, cfg.limit) == ("test", 8, None)
    assert out == assets / "model" / "eval_test.jsonl"
    # a stage export's output goes beside it (a re-export replaces the folder); a hub id's cannot shadow it
    monkeypatch.chdir(tmp_path)
    stage = tmp_path / "runs" / "r" / "stage_2"
    stage.mkdir(parents=True)
    (stage.parent / "config.yaml").write_text("name: r\n")
    infer.main(["--config", str(config), "--checkpoint", str(stage)])
    assert calls[-1][1] == tmp_path / "runs" / "r" / "eval" / "stage_2" / "eval_test.jsonl"
    infer.main(["--config", str(config), "--checkpoint", "Qwen/Qwen2-VL-7B-Instruct"])
    assert calls[-1][1] == Path("evals/Qwen--Qwen2-VL-7B-Instruct/eval_test.jsonl") and not Path("Qwen").exists()
    infer.main([*base, "model.dtype=float16", "latent.num_selected_patches=2", "--devices", "1"])
    cfg, _ = calls[-1]
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.latent.num_selected_patches, cfg.devices) == (
        "float16", "bfloat16", 2, 1)
    infer.main([*base, "--dtype", "float32", "--split", "dev", "--batch-size", "3", "--limit", "5"])
    cfg, out = calls[-1]
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.data.eval_split, cfg.eval.batch_size, cfg.limit) == (
        "float32", "float32", "dev", 3, 5)
    assert out == assets / "model" / "eval_dev.jsonl" and cfg.eval.num_latents == 3  # the section's default
    capsys.readouterr()
    with pytest.raises(SystemExit):
        infer.main([*base, "--dtype", "fp8"])
    assert "invalid choice: 'fp8' (choose from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.main([*base, "model.dtipe=float16"])
    assert "unknown key(s) ['dtipe']" in capsys.readouterr().err


def test_infer_help_reads_cleanly(capsys):
    import infer

    with pytest.raises(SystemExit):
        infer.main(["--help"])
    text = capsys.readouterr().out
    assert max(map(len, text.splitlines())) <= 110, max(text.splitlines(), key=len)
    assert not re.search(r"\S {4,}\[", text)  # no usage text run together with the next line's options
    assert text.startswith("usage: infer.py") and "section.key=value" in text and "--dtype" in text
    assert all(line == line.rstrip() for line in text.splitlines())


def test_no_accuracy_over_no_examples(assets, tmp_path):
    """`--limit 0` (or a split whose every row is skipped): the summary has no accuracy (null, not 0.0) and the
    run says why in one line."""
    lines_logged = []
    summary = evaluate(assets / "model", eval_cfg(assets, devices=1, limit=0), tmp_path / "none.jsonl",
                       log=lines_logged.append)
    assert summary["examples"] == 0 and summary["accuracy_strict"] is None and summary["accuracy_official"] is None
    assert json.loads((tmp_path / "none.summary.json").read_text())["accuracy_strict"] is None
    assert any(line.startswith("no accuracy: 0 examples evaluated") and "limit 0" in line for line in lines_logged)


def test_k_above_the_image_tokens_is_one_line_before_any_generation(assets, tmp_path, capsys):
    """`infer.py ... latent.num_selected_patches=150` with 100-token images: refused at the start, naming the
    row and its image tokens (it ended in `ValueError: -91 is not in list` after generating)."""
    import infer

    config = write_run_config(tmp_path, assets)
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--config", str(config), "--checkpoint", str(assets / "model"), "--out", str(tmp_path / "o.jsonl"),
                    "latent.num_selected_patches=150"])
    assert exit_.value.code == 2
    [line] = [x for x in capsys.readouterr().err.strip().splitlines() if x]
    assert "num_selected_patches=150 is larger than the 100 image tokens of row" in line, line
    assert not (tmp_path / "o.jsonl").exists()


def test_infer_takes_its_defaults_from_the_eval_section_and_refuses_bad_ones(assets, tmp_path, capsys):
    """The run config's `eval` section sets what infer.py's options leave unset; a bad evaluation setting, from an
    option or from the section, is one line and status 2 before anything is loaded or written (`--latents -1`
    evaluated every row with no latents; `--batch-size 0` ended in a traceback; there was no `eval` section)."""
    import infer

    out = tmp_path / "o.jsonl"
    base = ["--config", str(write_run_config(tmp_path, assets, "float32")), "--checkpoint", str(assets / "model"),
            "--out", str(out)]
    cases = {"eval config: eval.num_latents: -1 must be >= 0": ["--latents", "-1"],
             "eval config: eval.batch_size: 0 must be >= 1": ["--batch-size", "0"],
             "command line 'eval.max_new_tokens=0': eval.max_new_tokens: 0 must be >= 1": ["eval.max_new_tokens=0"]}
    for message, options in cases.items():
        with pytest.raises(SystemExit) as exit_:
            infer.main(base + options)
        [line] = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert exit_.value.code == 2 and line == f"infer.py: error: {message}", line
        assert not out.exists() and not setup_path(out).exists()
    infer.main(base + ["--limit", "2", "eval.num_latents=1", "eval.max_new_tokens=4", "eval.batch_size=2"])
    setup = json.loads(setup_path(out).read_text())
    assert (setup["num_latents"], setup["max_new_tokens"], setup["limit"]) == (1, 4, 2)
    assert len(lines(out)) == 2


def test_infer_answers_missing_inputs_in_one_line(assets, tmp_path, capsys):
    """A missing config, `--checkpoint` folder or data source, and a source without the split: one line and
    status 2, as train.py answers (each was a traceback of about 16 lines)."""
    import infer

    config = write_run_config(tmp_path, assets)
    (tmp_path / "empty").mkdir()
    base = ["--checkpoint", str(assets / "model"), "--out", str(tmp_path / "o.jsonl")]
    cases = {"no_such.yaml: no such configuration file": ["--config", str(tmp_path / "no_such.yaml"), *base],
             "no_model: no such model folder": ["--config", str(config), "--checkpoint", str(tmp_path / "no_model")],
             "no_data: no such file or folder": ["--config", str(config), *base, f"data.source={tmp_path}/no_data"],
             "empty: no parquet/arrow files for split 'test'": ["--config", str(config), *base,
                                                                 f"data.source={tmp_path}/empty"]}
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as exit_:
            infer.main(argv)
        [line] = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert exit_.value.code == 2 and line.startswith("infer.py: error: ") and message in line, (message, line)


def scienceqa_source(assets: Path, folder: Path) -> Path:
    """The test rows in ScienceQA's schema (no id column; the answer an index), in `folder`/test.parquet."""
    rows = [dict(question=r["question"], choices=r["choices"], answer=ord(r["answer"]) - 65, image=r["image"],
                 solution=r["rationale"], hint="", subject="natural science")
            for r in pq.read_table(assets / "data" / "test.parquet").to_pylist() if r["image"] is not None]
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "test.parquet")
    return folder


def test_a_reordered_scienceqa_source_resumes_each_record_under_its_question(assets, tmp_path):
    """ScienceQA rows have no id column: ids from the content (question, choices, image) keep every record of a
    resumed output under its own question when the source was reordered meanwhile (ids by position put
    the old answers under new questions); an edited row is refused naming the data's fingerprint."""
    source = scienceqa_source(assets, tmp_path / "sqa")
    cfg = eval_cfg(assets, data=dict(dataset="scienceqa", source=str(source)), devices=1)
    out = tmp_path / "eval.jsonl"
    evaluate(assets / "model", cfg, out, **QUIET)
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:2]))  # stopped after 2 records
    table = pq.read_table(source / "test.parquet")
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), source / "test.parquet")  # reordered meanwhile
    summary = evaluate(assets / "model", cfg, out, **QUIET)
    assert summary["skipped"]["already_done"] == 2 and summary["evaluated_now"] == 4
    fresh = tmp_path / "fresh.jsonl"
    evaluate(assets / "model", cfg, fresh, **QUIET)  # the reordered source from the start
    by_id = lambda path: {r["id"]: (r["prompt"], r["generated"], r["correct"]) for r in lines(path)}
    assert by_id(out) == by_id(fresh) and len(by_id(out)) == 6
    assert all(re.fullmatch("scienceqa-[0-9a-f]{16}", i) for i in by_id(out))

    rows = table.to_pylist()
    rows[0]["question"] = rows[0]["question"] + " (corrected)"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), source / "test.parquet")
    before = out.read_bytes()
    with pytest.raises(EvalSetupError, match="data_fingerprint: '[0-9a-f]{64}' in the output, '[0-9a-f]{64}' now"):
        evaluate(assets / "model", cfg, out, **QUIET)
    assert out.read_bytes() == before
