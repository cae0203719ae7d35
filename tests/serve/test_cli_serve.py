"""`splice serve` as a real process: starts, answers the openai client, and shuts down on SIGINT."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai

from helpers import one_error_line
from splice.cli import run

from .conftest import PROMPTS, word_tokenizer

SRC = str(Path(__file__).resolve().parents[2] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_splice_serve_process_answers_and_stops(served, references):
    base, adapters = served
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "SPLICE_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splice", "serve", str(base), "--adapters", str(adapters),
                             "--port", str(port), "--name", "tiny"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        out = client.completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        want = references[("gamma", PROMPTS[1])]
        want = want[: want.index(2)] if 2 in want else want
        assert out.choices[0].text == word_tokenizer().decode(want, skip_special_tokens=True)
    finally:
        proc.send_signal(signal.SIGINT)
        killed = False
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            killed = True
            proc.kill()
            proc.wait()
    assert not killed, "SIGINT did not stop the server within 30 s"
    assert proc.returncode in (0, -signal.SIGINT, 128 + signal.SIGINT), proc.returncode  # stopped by the signal


def test_splice_serve_bad_arguments_are_one_line(served, capsys, tmp_path):
    base, _ = served
    assert run(["serve", str(base), "--adapters", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert run(["serve", str(base), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert run(["serve", str(base), "--max-batch", "0"]) == 2  # would admit nothing: every request would hang
    assert one_error_line(capsys.readouterr().err) == "error: --max-batch must be positive, not 0"
