"""README's examples run as written: the Ask-and-serve quick start (`ivtlr-ask`, the Predictor, `ivtlr-serve` with
the openai client and curl) and the Python example of the models and the latent loop, in a folder laid out as
`make demo` leaves it (the demo's tiny model and data; the stage export is the untrained model, so the answers
are noise but every command runs); the released-checkpoint commands name only options their commands have."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ivtlr_jax.demo import prepare

pytestmark = pytest.mark.xdist_group("readme")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A working folder as after `make demo`: outputs/tiny/{data, model, example.png, runs/tiny/stage_3}."""
    cwd = tmp_path_factory.mktemp("readme")
    tiny = cwd / "outputs" / "tiny"
    prepare(tiny, seed=0, num_train=8, num_test=4)
    run = tiny / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    (tiny / "model").rename(run / "stage_3")
    return cwd


def run_bash(script: str, cwd: Path, port: int | None = None, **kwargs):
    script = script.replace(".venv/bin/", f"{BIN}/")
    if port is not None:
        script = script.replace("8000", str(port))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=600, **kwargs)


def run_python(code: str, cwd: Path, port: int | None = None):
    if port is not None:
        code = code.replace("8000", str(port))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ask_and_the_python_examples_run(demo_folder):
    ask, *_ = blocks(section("Ask and serve"), "bash")
    done = run_bash(ask, demo_folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^answer: ", done.stdout, re.M) and (demo_folder / "outputs/tiny/patches.png").is_file()
    predictor, *_ = blocks(section("Ask and serve"), "python")
    [latent_loop] = blocks(section("Using the models and the latent loop"), "python")
    done = run_python(predictor + "\n" + latent_loop, demo_folder)  # one process: one JAX start-up
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) > 0  # the loss


def test_serve_and_its_clients_run(demo_folder):
    _, serve, curl, *_ = blocks(section("Ask and serve"), "bash")
    _, client = blocks(section("Ask and serve"), "python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = serve.replace(".venv/bin/", f"{BIN}/").replace("8000", str(port))
    server = subprocess.Popen(["bash", "-c", "exec " + script], cwd=demo_folder, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.5)
        assert "<title>" in httpx.get(f"http://127.0.0.1:{port}/").text  # the page
        done = run_python(client, demo_folder, port)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
        done = run_bash(curl, demo_folder, port)
        assert done.returncode == 0, done.stderr[-3000:]
        reply = json.loads(done.stdout)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        assert len(reply["ivtlr"]["selected_patches"]) == 3
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0


COMMANDS = {"ivtlr-convert-official": "ivtlr-convert-official", "ivtlr-ask": "ivtlr-ask", "ivtlr-serve": "ivtlr-serve",
            "infer.py": "ivtlr-infer"}


def test_released_checkpoint_commands_use_only_existing_options():
    """The released-checkpoint commands need downloads and a GPU; their options must exist all the same."""
    text = section("Ask and serve")
    commands = [c for c in blocks(text, "bash")[-1].replace("\\\n", " ").splitlines() if c.strip()]
    checked = 0
    for command in commands:
        words = shlex.split(command)
        name = next((COMMANDS[Path(w).name] for w in words if Path(w).name in COMMANDS), None)
        if name is None:
            continue
        help_text = subprocess.run([str(BIN / name), "--help"], capture_output=True, text=True, timeout=120,
                                   env=dict(os.environ, COLUMNS="200")).stdout
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in help_text, f"{flag} is not an option of {name}: {command}"
        checked += 1
    assert checked == 4
