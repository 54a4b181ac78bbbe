"""The command-line entry points of pyproject.toml (importable, `--help` exits 0 with a usage line naming the
command), the wrappers at the repository root, the persistent compilation cache's settings, and the
dashboard writers of ivtlr_jax/events.py (Weights & Biases through a stand-in module, evaluation placement)."""

import dataclasses
import importlib
import importlib.machinery
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from ivtlr_jax.config import ConfigError, LogSection, ModelSection, RunConfig, differing_keys, to_dict
from tests.event_files import count_points, read_event_scalars

ROOT = Path(__file__).resolve().parents[1]


def entry_points() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_of_the_brief_is_an_entry_point():
    assert set(entry_points()) == {"ivtlr-train", "ivtlr-infer", "ivtlr-convert-hf-to-flax",
                                   "ivtlr-convert-flax-to-hf", "ivtlr-convert-official", "ivtlr-plan",
                                   "ivtlr-report", "ivtlr-ask", "ivtlr-serve"}


def help_text(main, capsys, **kwargs) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"], **kwargs)
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(entry_points()) if sys.version_info >= (3, 11) else [])
def test_entry_point_imports_and_its_help_names_the_command(name, capsys):
    module_name, _, function = entry_points()[name].partition(":")
    assert module_name.startswith("ivtlr_jax.")  # points into the package
    main = getattr(importlib.import_module(module_name), function)
    text = help_text(main, capsys)
    usage = text.splitlines()[0]
    assert usage.startswith(f"usage: {name} ")
    # the usage line is whole (no option at a line's end with its value on the next), the text fits
    assert len(usage) <= 100 and not re.search(r"--[\w-]+$", usage), usage
    assert all(len(line) <= 110 for line in text.splitlines()), max(text.splitlines(), key=len)


@pytest.mark.parametrize("script, prog", [("train.py", "train.py"), ("infer.py", "infer.py"),
                                          ("ask.py", "ask.py"), ("serve.py", "serve.py"),
                                          ("convert/hf_to_flax.py", "hf_to_flax.py"),
                                          ("convert/flax_to_hf.py", "flax_to_hf.py"),
                                          ("convert/ivtlr_pth_to_flax.py", "ivtlr_pth_to_flax.py")])
def test_wrappers_keep_their_name_and_flags(script, prog, capsys):
    spec = importlib.util.spec_from_file_location(f"wrapper_{prog[:-3]}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = help_text(module.main, capsys)
    assert text.startswith(f"usage: {prog} --")
    flags = {"train.py": ["--config", "--max-steps"], "infer.py": ["--checkpoint", "--save-attention", "--dtype"],
             "hf_to_flax.py": ["--hf", "--out", "--dtype"], "flax_to_hf.py": ["--peft", "--step", "--peft-layout"],
             "ivtlr_pth_to_flax.py": ["--pth", "--base", "--lora-alpha", "--lora-rank"],
             "ask.py": ["--checkpoint", "--image", "--choice", "--save-attention", "--json"],
             "serve.py": ["--checkpoint", "--host", "--port", "--slots", "--max-waiting"]}[prog]
    assert all(flag in text for flag in flags)
    if prog in ("train.py", "infer.py"):
        assert f"python {prog} --config configs/" in text  # examples as the user types them


# ---- compilation cache --------------------------------------------------------------------------------------
def test_compilation_cache_folder_from_the_environment(tmp_path):
    from ivtlr_jax.compilation_cache import cache_dir

    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "ivtlr_jax" / "xla"
    assert cache_dir({"IVTLR_JAX_CACHE": str(tmp_path / "c")}) == tmp_path / "c"
    for off in ("off", "0", "", "None", "false"):
        assert cache_dir({"IVTLR_JAX_CACHE": off}) is None
    assert cache_dir({"JAX_COMPILATION_CACHE_DIR": "/x"}) is None  # JAX's own setting is left alone


def test_compilation_cache_is_used_by_jit(tmp_path):
    """Turned on, a small jitted program lands in the folder (JAX's default would skip it: < 1 s to compile)."""
    import jax
    import jax.numpy as jnp
    from jax._src import compilation_cache as cc

    from ivtlr_jax.compilation_cache import enable_compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    try:
        assert enable_compilation_cache({"IVTLR_JAX_CACHE": str(tmp_path / "xla")}) == tmp_path / "xla"
        cc.reset_cache()
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.123456)(jnp.arange(7.0)).block_until_ready()
        assert any((tmp_path / "xla").iterdir())
        assert enable_compilation_cache({"IVTLR_JAX_CACHE": "off"}) is None
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        cc.reset_cache()


# ---- logging settings and writers ---------------------------------------------------------------------------
def test_log_settings_are_checked_and_resume_neutral():
    with pytest.raises(ValueError, match="wandb_project"):
        LogSection(wandb_project=" ")
    saved = to_dict(RunConfig())
    del saved["log"]  # a run folder written before the log section existed
    now = to_dict(RunConfig(log=LogSection(tensorboard=False, wandb=True, wandb_project="p", wandb_entity="me")))
    assert differing_keys(saved, now) == {}


def test_a_run_folder_written_before_a_setting_existed_resumes_with_its_default(tmp_path):
    """train.py's folder check: keys newer than the run's config.yaml (data.image_resize, latent.patch_deepstack
    here) are the defaults the run had in effect; a value other than the default still differs."""
    from ivtlr_jax.config import DataSection
    from ivtlr_jax.train.loop import RunFolderError, check_run_folder

    cfg = RunConfig(name="old", save_path=str(tmp_path))
    saved = to_dict(cfg)
    del saved["data"]["image_resize"], saved["latent"]["patch_deepstack"]
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_run_folder(cfg) == cfg.run_dir
    changed = dataclasses.replace(cfg, data=DataSection(image_resize="processor"))
    with pytest.raises(RunFolderError, match=r"data\.image_resize: 'square' in the run, 'processor' now"):
        check_run_folder(changed)


def test_wandb_turned_on_but_not_installed_is_refused_at_start(monkeypatch, tmp_path):
    from ivtlr_jax.events import check_backends
    from ivtlr_jax.train.loop import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whatever is installed
    with pytest.raises(ConfigError, match=r"log\.wandb: true needs the wandb package"):
        check_backends(LogSection(wandb=True))
    check_backends(LogSection())  # off: nothing is needed
    cfg = RunConfig(name="w", save_path=str(tmp_path), log=LogSection(wandb=True),
                    model=ModelSection(model_id=str(tmp_path / "no-model")))
    with pytest.raises(ConfigError, match="wandb"):  # before the model is looked for
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "w").exists()


class FakeWandb(types.ModuleType):
    """Records what EventLog sends: init's arguments, logged dicts, finish."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def define_metric(self, *args, **kwargs):
                pass

            def log(self, values):
                fake.logged.append(values)

            def finish(self):
                fake.finished += 1

        return Run()

    class Image:
        def __init__(self, array):
            self.shape = np.asarray(array).shape


def test_wandb_gets_the_scalars_and_resumes_the_same_run(monkeypatch, tmp_path):
    from ivtlr_jax.events import WANDB_ID_FILE, EventLog

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)  # importlib.util.find_spec finds it there
    cfg = LogSection(tensorboard=False, wandb=True, wandb_project="proj")
    for _ in range(2):  # two invocations of one run folder
        events = EventLog(tmp_path / "tb", cfg, run_dir=tmp_path, name="run")
        events.scalars({"train/loss": 1.5, "train/lr": None}, 7)
        events.pictures({"eval/p": np.zeros((4, 5, 3), np.uint8)}, 7)
        events.close()
    assert not (tmp_path / "tb").exists()  # TensorBoard off
    assert [i["id"] for i in fake.inits] == [(tmp_path / WANDB_ID_FILE).read_text().strip()] * 2
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["resume"] == "allow"
    assert fake.logged[0] == {"train/loss": 1.5, "micro_step": 7}  # None (a non-finite value) left out
    assert fake.logged[1]["eval/p"].shape == (4, 5, 3) and fake.finished == 2


def test_evaluation_of_a_stage_export_lands_at_the_stage_end(tmp_path):
    from PIL import Image

    from ivtlr_jax.events import log_evaluation

    run = tmp_path / "run"
    (run / "stage_1").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"micro_step": m, "stage": m // 4}) + "\n"
                                               for m in range(1, 10)) + "{torn")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 9, 3), i * 40, np.uint8)).save(pictures / f"ex{i}.png")
    summary = {"accuracy_strict": 0.75, "accuracy_official": 0.8, "accuracy_by_domain": {"science": 0.5}}
    folder = log_evaluation(LogSection(), summary, run / "stage_1", run / "stage_1" / "eval_test.jsonl", split="test",
                            pictures_dir=pictures)
    assert folder == (run / "tensorboard" / "eval").resolve()
    scalars = read_event_scalars(folder)
    assert scalars["eval/test/accuracy_strict"] == {7: 0.75}  # stage 1 = micro-steps 4..7
    assert scalars["eval/test/accuracy_by_domain/science"] == {7: 0.5}
    images = b"".join(p.read_bytes() for p in folder.glob("events.*"))
    assert images.count(b"eval/test/patches/ex") == 4  # MAX_PICTURES of the 6

    other = log_evaluation(LogSection(), summary, tmp_path / "model", tmp_path / "out" / "e.jsonl", split="dev",
                           prompt_format="official")
    assert other == (tmp_path / "out" / "tensorboard" / "eval").resolve()
    assert read_event_scalars(other)["eval/dev_official_prompts/accuracy_official"] == {0: pytest.approx(0.8)}
    assert log_evaluation(LogSection(tensorboard=False), summary, run / "stage_1", tmp_path / "x.jsonl",
                          split="test") is None
    assert log_evaluation(None, summary, run / "stage_1", tmp_path / "x.jsonl", split="test") is None


def test_a_re_run_evaluation_replaces_its_tensorboard_point(tmp_path):
    """Evaluating a stage export again (or anew after a re-export) left two accuracy points at the stage's step:
    the tag's point at that step is replaced; other steps, other tags and the training events stay."""
    from PIL import Image

    from ivtlr_jax.events import log_evaluation

    run = tmp_path / "run"
    for stage in (0, 1):
        (run / f"stage_{stage}").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"micro_step": m, "stage": m // 4}) + "\n"
                                               for m in range(1, 8)))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(pictures / "ex0.png")

    def evaluate(stage: int, accuracy: float, split: str = "test"):
        return log_evaluation(LogSection(), {"accuracy_strict": accuracy, "accuracy_by_domain": {"science": accuracy}},
                              run / f"stage_{stage}", run / f"stage_{stage}" / "e.jsonl", split=split,
                              pictures_dir=pictures)

    evaluate(0, 0.25)
    evaluate(1, 0.5)
    evaluate(1, 0.5, split="dev")
    folder = evaluate(1, 0.75)  # stage 1 again (another export of it): its points at step 7 replaced
    points = count_points(folder)
    assert set(points.values()) == {1}, points
    assert read_event_scalars(folder)["eval/test/accuracy_strict"] == {3: 0.25, 7: 0.75}
    assert read_event_scalars(folder)["eval/test/accuracy_by_domain/science"] == {3: 0.25, 7: 0.75}
    assert read_event_scalars(folder)["eval/dev/accuracy_strict"] == {7: 0.5}
    assert points[("eval/test/patches/ex0", 7)] == 1
