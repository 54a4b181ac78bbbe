"""Server load: `ivtlr-serve` answering `--requests` chat completions sent by `--clients` concurrent clients,
against the same requests sent one after another, both in one run on one server.

The server is started here as a user starts it (`ivtlr-serve --checkpoint DIR --slots N`, 127.0.0.1 only, on a
free port) on the tiny Qwen2-VL of the demo (`demo.prepare`: generated images and questions, random weights,
fp32; or `--checkpoint DIR`). Each request is one test image and its question and choices, greedy, `--tokens`
new tokens at most (`max_tokens`). After one untimed round that compiles the shapes, the sides run as:

- one after another: `--requests` requests, each sent when the previous one is answered (one client);
- concurrent: the same requests from `--clients` threads (httpx clients) at once, each thread sending its next
  request when its previous one is answered.

Checked: every request of both sides answered (200), once (distinct ids), with the text the sequential side
gave it (greedy answers do not depend on what else is in flight). Bounded: `--timeout` seconds per request.
Printed: requests/s and p50/p99 latency of each side, concurrent / sequential requests/s (goal >= 3x at 16
clients), the tokens generated. Compare ratios measured in one run, not requests/s, across machines.

    python bench/serve.py [--requests 48] [--clients 16] [--slots 16] [--tokens 128] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root


def tiny_model(folder: Path, max_new_tokens: int) -> tuple[Path, list[dict]]:
    """The demo's tiny model and test rows (not trained: random weights), with settings for fp32 on a CPU."""
    import pyarrow.parquet as pq

    from ivtlr_jax.demo import prepare

    prepare(folder, seed=0, num_train=8, num_test=16)
    (folder / "model" / "ivtlr_settings.json").write_text(json.dumps(
        {"num_selected_patches": 8, "dtype": "float32", "max_new_tokens": max_new_tokens}))
    return folder / "model", pq.read_table(folder / "data" / "test.parquet").to_pylist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, slots: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [str(Path(sys.executable).parent / "ivtlr-serve"), "--checkpoint", str(checkpoint), "--port", str(port),
               "--slots", str(slots), "--max-waiting", "1024", "--log-level", "warning"]
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start within 300 s")


def bodies(rows: list[dict], count: int, tokens: int) -> list[dict]:
    out = []
    for i in range(count):
        row = rows[i % len(rows)]
        image = "data:image/png;base64," + base64.b64encode(row["image"]["bytes"]).decode()
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": row["question"]}]
        out.append({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
                    "ivtlr": {"choices": row["choices"]}})
    return out


def run_side(url: str, requests: list[dict], clients: int, timeout: float) -> tuple[float, list[tuple]]:
    """(seconds, [(latency s, status, id, text)] in request order) with `clients` threads."""
    import httpx

    def send(body):
        with httpx.Client(timeout=timeout) as client:
            start = time.perf_counter()
            r = client.post(f"{url}/v1/chat/completions", json=body)
            seconds = time.perf_counter() - start
            j = r.json()
            text = j["choices"][0]["message"]["content"] if r.status_code == 200 else j["error"]["message"]
            return seconds, r.status_code, j.get("id"), text, (j.get("usage") or {}).get("completion_tokens", 0)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(send, requests))
    return time.perf_counter() - start, results


def describe(name: str, seconds: float, results: list[tuple]) -> float:
    latencies = np.asarray([r[0] for r in results])
    tokens = sum(r[4] for r in results)
    rate = len(results) / seconds
    print(f"{name:>22}: {rate:6.2f} requests/s  p50 {1e3 * np.percentile(latencies, 50):7.1f} ms  "
          f"p99 {1e3 * np.percentile(latencies, 99):7.1f} ms  "
          f"({len(results)} requests, {tokens} tokens, {seconds:.1f} s)")
    return rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128,
                   help="max_tokens of every request (an IVT-LR answer is a rationale, then the answer)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request at most")
    p.add_argument("--checkpoint", default=None, help="a model folder (default: the demo's tiny model, untrained)")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            import pyarrow.parquet as pq

            checkpoint = Path(args.checkpoint)
            rows = pq.read_table(tiny_model(Path(tmp), args.tokens)[0].parent / "data" / "test.parquet").to_pylist()
        else:
            checkpoint, rows = tiny_model(Path(tmp), args.tokens)
        proc, url = start_server(checkpoint, args.slots, Path(tmp) / "server.log")
        try:
            requests = bodies(rows, args.requests, args.tokens)
            run_side(url, requests[:args.clients], args.clients, args.timeout)  # compiles every shape
            seq_s, sequential = run_side(url, requests, 1, args.timeout)
            con_s, concurrent = run_side(url, requests, args.clients, args.timeout)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    print(f"ivtlr-serve on {checkpoint.name}: {args.slots} slots, {args.requests} requests of <= {args.tokens} tokens")
    rate_seq = describe("one after another", seq_s, sequential)
    rate_con = describe(f"{args.clients} concurrent clients", con_s, concurrent)
    print(f"concurrent / one after another: {rate_con / rate_seq:.2f}x requests/s (goal >= 3x at 16 clients)")
    answered = all(r[1] == 200 for r in sequential + concurrent)
    ids = [r[2] for r in sequential + concurrent]
    same = [a[3] for a in sequential] == [b[3] for b in concurrent]
    print(f"check: every request answered {answered}, none twice {len(set(ids)) == len(ids)}, "
          f"concurrent answers equal the sequential ones {same}")


if __name__ == "__main__":
    main()
