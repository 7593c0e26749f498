"""``interleaf chat`` driven through standard input, and ``interleaf serve`` as a real process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

import interleaf
from interleaf.generation import generation_kwargs
from helpers.serving import FAMILIES, png, tiny_model

MAX_NEW = 6
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", params=FAMILIES)
def saved(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("serving-cli")
    model, processor = tiny_model(request.param)
    interleaf.save(model, processor, root / "tiny")
    png((200, 100, 0)).save(root / "photo.png")
    return root


def answer(model, processor, messages) -> str:
    inputs = processor([messages])
    out = model.generate(**inputs, **generation_kwargs(processor, max_new_tokens=MAX_NEW))
    return processor.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.fixture(scope="module")
def serve_process(saved):
    """``interleaf serve`` started early on a port the system chooses (it loads while the REPL test runs)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "interleaf", "serve", "--model", str(saved / "tiny"), "--port", "0",
         "--log-level", "warning", "--max-completion-tokens", "16"],
        env={**ENV, "INTERLEAF_API_KEY": "env-key"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    yield proc
    proc.terminate()
    proc.wait(60)
    proc.stdout.close()


@pytest.mark.slow
def test_chat_repl_through_stdin(saved, serve_process):
    script = "\n".join([
        "/image no/such/file.png",
        f"/image {saved / 'photo.png'}",
        "What is in this picture?",
        "Tell me more.",
        f"/save {saved / 'chat.json'}",
        "/reset",
        f"/save {saved / 'empty.json'}",
        "/bogus",
        "/quit",
        "never read",
    ]) + "\n"
    run = subprocess.run(
        [sys.executable, "-m", "interleaf", "chat", "--model", str(saved / "tiny"), "--max-new-tokens", str(MAX_NEW)],
        input=script, capture_output=True, text=True, timeout=120, env=ENV, cwd=saved,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "error: /image no/such/file.png: image file" in out and "file.png' does not exist" in out
    assert "(image attached to the next message" in out
    assert "(conversation cleared)" in out and "unknown command '/bogus'" in out
    messages = json.loads((saved / "chat.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0] == {"type": "image", "image": str(saved / "photo.png")}
    assert json.loads((saved / "empty.json").read_text()) == {"messages": []}
    # the answers are the model's for the whole history, rendered with the chat template
    model, processor = interleaf.load(saved / "tiny")
    first = answer(model, processor, messages[:1])
    second = answer(model, processor, messages[:3])
    assert messages[1]["content"] == first and messages[3]["content"] == second
    assert first in out and second in out


@pytest.mark.slow
def test_serve_command_with_api_key_from_the_environment(serve_process):
    proc = serve_process
    seen = []
    for line in proc.stdout:  # the bound port is printed once the server accepts connections
        seen.append(line)
        found = re.search(r"serving 'tiny' on (http://127\.0\.0\.1:(\d+)) ", line)
        if found:
            url = found.group(1)
            assert int(found.group(2)) > 0
            break
    else:
        pytest.fail("the server exited before it was serving:\n" + "".join(seen))
    assert httpx.get(url + "/health").json()["status"] == "ok"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
    key = {"Authorization": "Bearer env-key"}
    ok = httpx.post(url + "/v1/chat/completions", json=body, headers=key)
    assert ok.status_code == 200 and ok.json()["model"] == "tiny"
    too_many = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 17}, headers=key)
    assert too_many.status_code == 400 and "limit of 16" in too_many.json()["error"]["message"]
