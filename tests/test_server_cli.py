"""`trimode serve` as users run it: the compiled engine behind the real command, and its
start-up errors as one line each."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai

from test_server_harness import ReferenceEngine, greedy_reference

COMMAND = [sys.executable, "-c", "from trimode.cli import main; main()", "serve"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_runs_the_compiled_engine(tiny_gguf):
    port = free_port()
    proc = subprocess.Popen([*COMMAND, "-m", str(tiny_gguf), "--port", str(port), "-c", "256", "-np", "2",
                             "--mode", "ar", "-a", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # a cold artifact cache compiles the model first
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server never became healthy"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "tiny"
        prompt = [1, 400, 401, 402]
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
        spec = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                         extra_body={"mode": "spec", "draft_length": 3})
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    engine = ReferenceEngine(tiny_gguf)
    expected = greedy_reference(engine.model, prompt, 5, engine.config.eos_token_id)
    assert reply.choices[0].text == engine.tokenizer.decode(expected)
    assert spec.choices[0].text == reply.choices[0].text
    assert f"listening on http://127.0.0.1:{port}" in out


def test_a_bad_budget_fails_with_one_line(tiny_gguf):
    done = subprocess.run([*COMMAND, "-m", str(tiny_gguf), "--port", str(free_port()), "-c", "3", "-np", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: -c 3 leaves 1 tokens per slot for -np 2; each slot needs at least 2"


def test_a_file_that_is_not_a_model_fails_with_one_line(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    done = subprocess.run([*COMMAND, "-m", str(bogus), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {bogus}")
