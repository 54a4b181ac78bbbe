"""Choice fields are enums (issue #28): a config value parses to its enum, the files a run writes stay the
plain strings older code wrote (so existing run folders still resume), and a bad value is one line listing
the choices."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ivtlr_jax.config import Batching, ConfigError, InferenceSettings, LossScale, Schedule, load_config, to_dict
from ivtlr_jax.data import Dataset, PromptFormat
from ivtlr_jax.latent import LatentGrad, PatchOrder, Rope
from ivtlr_jax.models.common.attention import AttentionImpl
from ivtlr_jax.models.common.images import ImageResize
from ivtlr_jax.models.common.layers import DType
from ivtlr_jax.models.common.run_options import Remat

ROOT = Path(__file__).resolve().parents[1]
# every choice field, a value other than its default, and its enum
CHOICES = {"model.remat": ("full", Remat), "model.attention_impl": ("fused", AttentionImpl),
           "model.dtype": ("float32", DType), "model.param_dtype": ("float16", DType),
           "latent.patch_order": ("position", PatchOrder), "latent.latent_grad": ("full", LatentGrad),
           "latent.rope": ("mrope", Rope), "data.dataset": ("scienceqa", Dataset),
           "data.image_resize": ("processor", ImageResize),
           "optim.schedule": ("cosine", Schedule), "optim.loss_scale": ("token_mean", LossScale),
           "eval.batching": ("static", Batching), "eval.prompt_format": ("official", PromptFormat)}


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "save_path": str(tmp_path / "runs"),
                                    **{section: dict(keys) for section, keys in _nested(CHOICES).items()}}))
    return path


def _nested(choices: dict) -> dict:
    out: dict = {}
    for key, (value, _) in choices.items():
        section, name = key.split(".")
        out.setdefault(section, []).append((name, value))
    return out


def test_each_choice_parses_to_its_enum(tmp_path):
    cfg = load_config(_config(tmp_path))
    for key, (value, choices) in CHOICES.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        assert type(got) is choices and got == value, key


def test_a_runs_config_yaml_and_settings_are_the_plain_strings(tmp_path):
    cfg = load_config(_config(tmp_path))
    written = yaml.safe_dump(to_dict(cfg), sort_keys=True)
    assert "!!python" not in written
    for key, (value, _) in CHOICES.items():  # as older code wrote it: `remat: full`
        assert f"\n  {key.split('.')[1]}: {value}\n" in written
    assert load_config(_config(tmp_path)) == cfg  # and it reads back to the same config
    settings = InferenceSettings.from_run(cfg)
    assert json.loads(json.dumps(settings.__dict__))["patch_order"] == "position"
    assert InferenceSettings.from_dict(json.loads(json.dumps(settings.__dict__)), "settings.json") == settings


@pytest.mark.parametrize("override, line", [
    ("latent.rope=2d", "latent.rope: '2d' is not allowed; choose one of ['1d', 'mrope']"),
    ("eval.batching=dynamic", "eval.batching: 'dynamic' is not allowed; choose one of ['auto', 'continuous', "
                              "'static']"),
    ("optim.schedule=[cosine]", "optim.schedule: ['cosine'] is not allowed; choose one of ['constant', 'cosine', "
                                "'linear']"),
])
def test_a_bad_choice_is_one_line_naming_key_and_choices(tmp_path, override, line):
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path), [override])
    assert str(err.value) == f"command line {override!r}: {line}"


def test_infer_lists_the_batching_choices_as_strings(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--config", str(_config(tmp_path)),
                           "--checkpoint", str(tmp_path), "--batching", "dynamic"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2
    assert "invalid choice: 'dynamic' (choose from 'auto', 'static', 'continuous')" in proc.stderr


@pytest.mark.parametrize("entry", ["ivtlr_jax.cli.infer", "ivtlr_jax.cli.ask", "ivtlr_jax.cli.serve",
                                   "ivtlr_jax.cli.hf_to_flax"])
def test_each_command_lists_the_dtype_choices_as_strings(entry):
    """Every command taking --dtype refuses an unknown one listing the model's DType names as plain strings."""
    code = f"import sys; from {entry} import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "--dtype", "int8"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    listed = proc.stderr.split("(choose from ")[1].split(")")[0]
    assert sorted(listed.replace("'", "").split(", ")) == sorted(member.value for member in DType), proc.stderr


def test_an_eval_config_holds_the_run_configs_sections_and_parses_a_changed_choice(tmp_path):
    from ivtlr_jax.eval.run import eval_config_from_run

    run = load_config(_config(tmp_path))
    cfg = eval_config_from_run(run)
    assert (cfg.data, cfg.latent, cfg.model, cfg.eval) == (run.data, run.latent, run.model, run.eval)
    changed = eval_config_from_run(run, latent=dict(rope="mrope"), model=dict(attention_impl="fused"),
                                   eval=dict(batching="continuous", prompt_format="train"))
    assert (type(changed.latent.rope), type(changed.model.attention_impl), type(changed.eval.batching),
            type(changed.eval.prompt_format)) == (Rope, AttentionImpl, Batching, PromptFormat)
    assert (changed.latent.patch_order, changed.eval.batching, changed.eval.prompt_format) == (
        PatchOrder.POSITION, "continuous", "train")  # the run's patch order kept
    with pytest.raises(ConfigError, match=r"^eval config: eval.batching: 'dynamic' is not allowed; choose one of "
                                          r"\['auto', 'continuous', 'static'\]$"):
        eval_config_from_run(run, eval=dict(batching="dynamic"))
