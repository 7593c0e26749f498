"""Image URLs: fetched only when allowed, only from allowed public or allow-listed hosts, never a
local file; redirects and sizes checked. Every server here is on the loopback interface."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from interleaf.errors import InputError, OfflineError
from interleaf.serving import ServeLimits, URLPolicy
from interleaf.serving.limits import fetch_image_url
from interleaf.generation import generation_kwargs
from helpers.serving import MODEL_NAME, png, start_server, tiny_model


def png_bytes() -> bytes:
    buf = io.BytesIO()
    png((120, 40, 200), (30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server: /cat.png, /big.png (too large), /hop (redirect to localhost)."""
    body = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            port = self.server.server_address[1]
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/big.png":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * 200_000)
            elif self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/cat.png")
                self.end_headers()
            elif self.path == "/hop-same":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


LIMITS = ServeLimits(max_url_bytes=100_000, url_timeout_s=5)


def test_policy_refuses_local_files_other_schemes_and_disabled_urls():
    on = URLPolicy(allow_urls=True)
    for url in ("file:///etc/passwd", "/etc/passwd", "ftp://example.com/a.png", "../secret.png"):
        with pytest.raises(InputError, match="local files and paths are never read"):
            on.check_url(url, "image")
    with pytest.raises(OfflineError, match="--allow-urls"):
        URLPolicy().check_url("https://example.com/a.png", "image")
    with pytest.raises(InputError, match="not in the server's allowed hosts"):
        URLPolicy.from_options(True, "images.example.org").check_url("https://example.com/a.png", "image")


def test_loopback_is_refused_unless_allow_listed(image_host):
    with pytest.raises(InputError, match="non-public address 127.0.0.1"):
        fetch_image_url(image_host + "/cat.png", URLPolicy(allow_urls=True), LIMITS, "image")
    listed = URLPolicy.from_options(True, "127.0.0.1")
    assert fetch_image_url(image_host + "/cat.png", listed, LIMITS, "image") == png_bytes()
    assert fetch_image_url(image_host + "/hop-same", listed, LIMITS, "image") == png_bytes()
    with pytest.raises(InputError, match="'localhost' is not in the server's allowed hosts"):
        fetch_image_url(image_host + "/hop", listed, LIMITS, "image")  # a redirect is checked too
    with pytest.raises(InputError, match="larger than 100,000 bytes"):
        fetch_image_url(image_host + "/big.png", listed, LIMITS, "image")
    with pytest.raises(InputError, match="HTTP 404"):
        fetch_image_url(image_host + "/missing.png", listed, LIMITS, "image")


def test_server_fetches_allowed_urls_only(image_host):
    model, processor = tiny_model()
    open_server = start_server(model, processor, url_policy=URLPolicy(allow_urls=True))
    listed_server = start_server(model, processor, url_policy=URLPolicy.from_options(True, ["127.0.0.1"]))
    try:
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_host + "/cat.png"}},
            {"type": "text", "text": "What is it?"},
        ]}]
        body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 6, "temperature": 0}
        refused = httpx.post(open_server.url + "/v1/chat/completions", json=body, timeout=30)
        assert refused.status_code == 400 and "non-public address" in refused.json()["error"]["message"]
        ok = httpx.post(listed_server.url + "/v1/chat/completions", json=body, timeout=30)
        assert ok.status_code == 200, ok.text
        local = [{"role": "user", "content": [
            {"type": "image", "image": Image.open(io.BytesIO(png_bytes()))},
            {"type": "text", "text": "What is it?"},
        ]}]
        inputs = processor([local])
        out = model.generate(**inputs, **generation_kwargs(processor, max_new_tokens=6))
        want = processor.decode(out[0, inputs["input_ids"].shape[1]:])
        assert ok.json()["choices"][0]["message"]["content"] == want
    finally:
        open_server.stop()
        listed_server.stop()
