"""Asking a model about an image: the Python face (predict.Predictor), `ivtlr-ask`, and `ivtlr-serve` through
real clients (the `openai` package, httpx, a headless chromium driven by selenium) on 127.0.0.1.

Every answer is compared with `ivtlr_generate` on the request alone (the static generation the parity tests
hold against transformers and the independent PyTorch oracle), on a tiny Qwen2-VL whose text depends on the
image and question (test_eval_run.scale_weights)."""

import base64
import concurrent.futures
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from ivtlr_jax.config import DataSection, EvalSection, LatentSection, ModelSection
from ivtlr_jax.demo import prepare
from ivtlr_jax.eval.run import EvalConfig, evaluate
from ivtlr_jax.generate import ivtlr_generate
from ivtlr_jax.predict import Predictor, Question
from tests.test_eval_run import scale_weights

pytestmark = pytest.mark.xdist_group("serve")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = {"num_selected_patches": 4, "dtype": "float32", "max_new_tokens": 12}
SERVER_MAX = 400  # the server's --max-new-tokens: long enough that a cancelled request is seen cancelled
MAX_PIXELS = 200_000


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Qwen2-VL model folder with its IVT-LR settings, and its test split's rows."""
    root = tmp_path_factory.mktemp("serve_assets")
    prepare(root, seed=1, num_train=8, num_test=6)
    scale_weights(root / "model")
    (root / "model" / "ivtlr_settings.json").write_text(json.dumps(SETTINGS))
    rows = pq.read_table(root / "data" / "test.parquet").to_pylist()
    for i, row in enumerate(rows):
        (root / f"image_{i}.png").write_bytes(row["image"]["bytes"])
    return root, rows


@pytest.fixture(scope="module")
def predictor(assets):
    return Predictor.from_folder(assets[0] / "model")


def alone(predictor, question: Question, max_tokens: int):
    """The answer `ivtlr_generate` gives the request alone (a batch of one, its own prompt)."""
    enc = predictor.encode(question)
    sampling = predictor.sampling(max_tokens)
    gen = ivtlr_generate(predictor.model, enc.prompt, predictor.latent, sampling)
    return predictor.answer_of(enc, np.asarray(gen.tokens[0]), int(gen.lengths[0]), np.asarray(gen.selected[:, 0]),
                               sampling)


def question_of(assets, i: int, with_choices: bool = True) -> Question:
    root, rows = assets
    return Question(root / f"image_{i}.png", rows[i]["question"], rows[i]["choices"] if with_choices else None)


# ---- the Python face -----------------------------------------------------------------------------------------
def test_predictor_gives_a_dataset_row_the_tokens_of_infer(assets, predictor, tmp_path):
    """Rows of the test split asked through the Predictor (image, question, choices as a user gives them)
    generate exactly the text and patches `infer.py`'s evaluation writes for them (the same settings)."""
    root, rows = assets
    out = tmp_path / "eval.jsonl"
    cfg = EvalConfig(DataSection(source=str(root / "data"), eval_split="test"), LatentSection(num_selected_patches=4),
                     ModelSection(dtype="float32", param_dtype="float32"), EvalSection(batch_size=4, max_new_tokens=12),
                     devices=1)
    evaluate(root / "model", cfg, out, log=lambda *_: None)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    answers = predictor.predict([Question(r["image"]["bytes"], r["question"], r["choices"]) for r in rows],
                                batch_size=4)
    assert len({r["generated"] for r in records}) > 1  # the text depends on the input
    for record, answer in zip(records, answers, strict=True):
        assert answer.text == record["generated"]
        assert answer.selected_patches == record["selected_patches"]
        assert answer.generated_tokens == record["generated_tokens"]
        assert answer.answer == record["prediction"]


def test_a_question_without_choices_and_settings_from_the_folder(assets, predictor):
    """No choices: the prompt has no options block; settings come from ivtlr_settings.json (K=4, 3 latents)
    and can be overridden."""
    q = question_of(assets, 0, with_choices=False)
    answer = predictor.predict(q)
    assert len(answer.selected_patches) == 3 and all(len(step) == 4 for step in answer.selected_patches)
    assert "[Options]" not in predictor.tokenizer.decode(predictor.encode(q).question_ids)
    assert answer.text == alone(predictor, q, 12).text
    two = Predictor.from_folder(assets[0] / "model", num_latents=2, num_selected_patches=3).predict(q)
    assert [len(s) for s in two.selected_patches] == [3, 3]


def test_a_question_decodes_its_image_once(assets, predictor, image_decodes):
    """Checking the image (readable, under the pixel cap) and building the prompt share one decode."""
    enc = predictor.encode(question_of(assets, 1))
    assert len(image_decodes) == 1 and enc.image["pixel_values"].size


def test_a_stream_sends_each_new_token_once(assets, predictor):
    """The engine's "tokens" events carry the tokens generated since the last one (the server decodes a window
    of them, serve/text_stream.py), not the whole answer so far at every turn."""
    import asyncio

    from ivtlr_jax.serve.engine import ServingEngine, Ticket

    async def events_of_one_request():
        engine = ServingEngine(predictor, slots=2, chunk=2, max_new_tokens=12).start()
        try:
            ticket = Ticket(predictor.encode(question_of(assets, 2)), 12, 0.0, 1.0, 0, asyncio.Queue(),
                            asyncio.get_running_loop())
            engine.submit(ticket)
            events = [await asyncio.wait_for(ticket.events.get(), 300)]
            while events[-1][0] not in ("done", "error"):
                events.append(await asyncio.wait_for(ticket.events.get(), 300))
            return events
        finally:
            engine.close()

    events = asyncio.run(events_of_one_request())
    kind, answer = events[-1]
    assert kind == "done" and answer.generated_tokens > 4
    sent = [t for kind, tokens in events if kind == "tokens" for t in tokens]
    assert sum(kind == "tokens" for kind, _ in events) >= 2  # chunk=2: several turns before the end
    assert 0 < len(sent) <= answer.generated_tokens and sent == answer.tokens[:len(sent)]


def test_slots_split_over_four_devices_answer_as_alone(assets, predictor):
    """The engine with its parameters on 4 devices and its 4 slots split over them (one each): six requests
    (some wait for a slot) each get the answer ivtlr_generate gives it alone on one device."""
    import asyncio

    from ivtlr_jax.serve.engine import ServingEngine, Ticket

    spread = Predictor.from_folder(assets[0] / "model", devices=4)
    questions = [question_of(assets, i, with_choices=i % 3 != 2) for i in range(6)]

    async def answers():
        engine = ServingEngine(spread, slots=4, chunk=4, max_new_tokens=12).start()
        try:
            loop = asyncio.get_running_loop()
            tickets = [Ticket(spread.encode(q), 12, 0.0, 1.0, 0, asyncio.Queue(), loop, stream=False)
                       for q in questions]
            for ticket in tickets:
                engine.submit(ticket)
            ends = []
            for ticket in tickets:
                event = await asyncio.wait_for(ticket.events.get(), 300)
                while event[0] not in ("done", "error"):
                    event = await asyncio.wait_for(ticket.events.get(), 300)
                ends.append(event)
            return ends
        finally:
            engine.close()

    ends = asyncio.run(answers())
    assert [kind for kind, _ in ends] == ["done"] * 6, ends
    assert len({answer.text for _, answer in ends}) > 1
    for q, (_, answer) in zip(questions, ends):
        expected = alone(predictor, q, 12)
        assert (answer.text, answer.finish_reason, answer.selected_patches) == \
            (expected.text, expected.finish_reason, expected.selected_patches)


def test_serve_refuses_slots_that_do_not_split_over_the_devices(assets):
    done = subprocess.run([str(BIN / "ivtlr-serve"), "--checkpoint", str(assets[0] / "model"), "--slots", "3",
                           "--devices", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == ("ivtlr-serve: error: --slots 3 is not a multiple of --devices 2 "
                                                   "(each device decodes slots / devices requests)")
    many = subprocess.run([str(BIN / "ivtlr-serve"), "--checkpoint", str(assets[0] / "model"), "--slots", "8",
                           "--devices", "8"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert many.returncode == 2 and "serving" not in many.stdout
    assert many.stderr.strip().splitlines()[-1].startswith("ivtlr-serve: error: devices=8 but only ")


def test_ask_command_prints_the_answer_and_draws_the_patches(assets, predictor, tmp_path):
    q = question_of(assets, 1)
    picture = tmp_path / "patches.png"
    args = [str(BIN / "ivtlr-ask"), "--checkpoint", str(assets[0] / "model"), "--image", str(q.image), q.question]
    args += [x for c in q.choices for x in ("--choice", c)]
    done = subprocess.run(args + ["--json", "--save-attention", str(picture)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    expected = alone(predictor, q, 12)
    assert got["text"] == expected.text and got["selected_patches"] == expected.selected_patches
    from PIL import Image

    assert Image.open(picture).size[0] > 280  # one panel per latent step
    missing = subprocess.run(args[:3] + ["--image", str(tmp_path / "nope.png"), "q"], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"ivtlr-ask: error: {tmp_path / 'nope.png'}: no such image file"]


# ---- the server ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(assets):
    """`ivtlr-serve` as a user starts it: 2 slots, 2 may wait; (base URL, process)."""
    port = free_port()
    log = open(assets[0] / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "ivtlr-serve"), "--checkpoint", str(assets[0] / "model"), "--port", str(port),
                             "--slots", "2", "--max-waiting", "2", "--max-new-tokens", str(SERVER_MAX),
                             "--max-pixels", str(MAX_PIXELS), "--graceful", "60"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, (assets[0] / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.5)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def body_of(q: Question, max_tokens: int = 12, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(q.image)}}, {"type": "text", "text": q.question}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    if q.choices:
        body["ivtlr"] = {"choices": list(q.choices)}
    return body


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_answers_equal_generation_alone_whatever_is_in_flight(assets, predictor, server):
    """Six requests at once (two slots, so some wait and all share slots with others), through the openai
    client and through httpx: each answer (text, finish reason, patches, usage) is ivtlr_generate's alone."""
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=30)  # a loaded machine: full longer
    questions = [question_of(assets, i, with_choices=i % 3 != 2) for i in range(6)]

    def via_openai(q):
        body = body_of(q)
        r = client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=12,
                                           extra_body={"ivtlr": body["ivtlr"]} if "ivtlr" in body else None)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.model_extra["ivtlr"], r.usage

    def via_httpx(q):
        for _ in range(20):
            r = httpx.post(f"{url}/v1/chat/completions", json=body_of(q), timeout=120)
            if r.status_code != 503:  # a full queue says when to retry
                break
            time.sleep(float(r.headers["Retry-After"]))
        r.raise_for_status()
        j = r.json()
        return j["choices"][0]["message"]["content"], j["choices"][0]["finish_reason"], j["ivtlr"], j["usage"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda iq: (via_openai if iq[0] % 2 else via_httpx)(iq[1]), enumerate(questions)))
    assert len({text for text, *_ in results}) > 1
    for q, (text, finish, extras, use) in zip(questions, results):
        expected = alone(predictor, q, 12)
        assert (text, finish) == (expected.text, expected.finish_reason)
        assert extras["selected_patches"] == expected.selected_patches and extras["answer"] == expected.answer
        prompt_tokens = use.prompt_tokens if hasattr(use, "prompt_tokens") else use["prompt_tokens"]
        assert prompt_tokens == expected.prompt_tokens


def test_streamed_answers_equal_the_whole_ones(assets, predictor, server):
    """stream=true (server-sent events): the patches arrive before the text, the deltas add up to the answer
    alone, the last chunk carries the finish reason and the answer letter; through the openai client and as
    raw events through httpx."""
    from openai import OpenAI

    url, _ = server
    q = question_of(assets, 3)
    expected = alone(predictor, q, 12)
    body = body_of(q, stream=True)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[0]["ivtlr"]["selected_patches"] == expected.selected_patches
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected.text
    assert events[-2]["choices"][0]["finish_reason"] == expected.finish_reason
    assert events[-2]["ivtlr"]["answer"] == expected.answer
    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    stream = client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=12, stream=True,
                                            extra_body={"ivtlr": body["ivtlr"]})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text


def bad_requests(assets, tmp_path) -> dict:
    """name -> (request body or raw bytes, expected status, a word the error message must hold)."""
    good = body_of(question_of(assets, 0))
    png = Path(question_of(assets, 0).image).read_bytes()
    from PIL import Image

    big = io.BytesIO()
    Image.new("RGB", (600, 400), "white").save(big, format="PNG")  # 240,000 pixels > MAX_PIXELS

    def with_image(data: bytes) -> dict:
        body = json.loads(json.dumps(good))
        body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(
            data).decode()
        return body

    def with_text(text: str) -> dict:
        body = json.loads(json.dumps(good))
        body["messages"][0]["content"][1]["text"] = text
        return body

    video = json.loads(json.dumps(good))
    video["messages"][0]["content"].append({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}})
    return {
        "not an image": (with_image(b"hello, not an image"), 400, "not an image"),
        "truncated image": (with_image(png[: len(png) // 2]), 400, "cannot be read"),
        "over the pixel cap": (with_image(big.getvalue()), 400, "pixels"),
        "empty question": (with_text("   "), 400, "empty"),
        "prompt over the cap": (with_text("word " * 4000), 400, "cap"),
        "malformed JSON": (b'{"messages": [', 400, "JSON"),
        "n > 1": ({**good, "n": 3}, 400, "n=3"),
        "video": (video, 400, "video"),
        "remote image URL": (dict(good, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
            {"type": "text", "text": "q"}]}]), 400, "data URL"),
        "max_tokens too large": ({**good, "max_tokens": SERVER_MAX + 1}, 400, "max_tokens"),
    }


def test_bad_input_is_a_4xx_naming_it_and_the_server_keeps_serving(assets, predictor, server, tmp_path):
    url, proc = server
    q = question_of(assets, 0)
    expected = alone(predictor, q, 12)
    for name, (body, status, word) in bad_requests(assets, tmp_path).items():
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
                       timeout=120)
        assert r.status_code == status, (name, r.text)
        assert word in r.json()["error"]["message"], (name, r.json())
        good = httpx.post(f"{url}/v1/chat/completions", json=body_of(q), timeout=120)  # and a good one after it
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == expected.text, name
    assert proc.poll() is None


def test_a_full_queue_is_a_503_with_retry_after_and_no_request_is_lost(assets, server):
    """Two slots and two places in the queue: of 12 long requests sent at once, some are refused with 503 and
    Retry-After (the queue was full when they came); every other one is answered, once, in full."""
    url, _ = server
    body = body_of(question_of(assets, 4), max_tokens=120)

    def send(_):
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    statuses = sorted(r.status_code for r in responses)
    # at least the queue's two places are taken (how many start meanwhile depends on the engine's timing)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
    assert all(r.headers.get("Retry-After") == "1" for r in responses if r.status_code == 503)
    answers = {r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200}
    assert len(answers) == 1  # the same request answered alike every time
    ids = [r.json()["id"] for r in responses if r.status_code == 200]
    assert len(set(ids)) == len(ids)


def test_a_client_that_disconnects_frees_its_slot(assets, server):
    """Two streams of long answers closed after their first event: the engine cancels both (its counts say
    so) instead of decoding their 400 tokens, and the slots serve the next request."""
    url, _ = server
    before = httpx.get(f"{url}/health").json()
    body = body_of(question_of(assets, 5), max_tokens=SERVER_MAX, stream=True)
    for _ in range(2):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            next(r.iter_lines())  # the first event: the request has started; then the client goes away
    deadline = time.time() + 60
    while (health := httpx.get(f"{url}/health").json())["cancelled"] < before["cancelled"] + 2:
        assert time.time() < deadline, health
        time.sleep(0.1)
    assert health["finished"] == before["finished"] and health["running"] == 0
    r = httpx.post(f"{url}/v1/chat/completions", json=body_of(question_of(assets, 5)), timeout=120)
    assert r.status_code == 200


def test_the_page_in_a_real_browser(assets, predictor, server, tmp_path):
    """Headless chromium: upload an image, type a question and choices, submit; the streamed answer appears
    in full and one picture per latent step is drawn with the patches the model chose."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    q = question_of(assets, 2)
    expected = alone(predictor, q, SERVER_MAX)  # the page asks for the server's longest answer
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1400"):
        options.add_argument(flag)
    browser, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and chromedriver, "chromium and chromedriver are missing: `make test` installs them (make browser)"
    options.binary_location = browser
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "image").send_keys(str(Path(q.image).resolve()))
        driver.find_element(By.ID, "question").send_keys(q.question)
        driver.find_element(By.ID, "choices").send_keys("\n".join(q.choices))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 240).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
        assert driver.find_element(By.ID, "status").text == f"done ({expected.finish_reason})"
        shown = driver.execute_script("return document.getElementById('answer').textContent")
        assert shown == expected.text
        canvases = driver.find_elements(By.CSS_SELECTOR, "canvas.step")
        assert [json.loads(c.get_attribute("data-patches")) for c in canvases] == expected.selected_patches
        opaque, colours = driver.execute_script(
            "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "const seen = new Set(); let opaque = true;"
            "for (let i = 0; i < d.length; i += 4) { opaque = opaque && d[i + 3] === 255;"
            "  seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]); }"
            "return [opaque, seen.size]", canvases[0])
        assert opaque and colours >= 4  # the image, darkened but for its patches and their outlines: not blank
        driver.save_screenshot(str(Path(os.environ.get("IVTLR_SCREENSHOT", tmp_path / "page.png"))))
    finally:
        driver.quit()


def test_sigterm_lets_the_request_in_flight_end_and_exits(assets, server):
    """SIGTERM while a long answer streams: the server stops admitting (the port closes), the answer in flight
    ends in full with [DONE], and the process exits with status 0. (Last: it stops the module's server.)"""
    url, proc = server
    body = body_of(question_of(assets, 1), max_tokens=SERVER_MAX, stream=True)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
    assert proc.wait(timeout=120) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
