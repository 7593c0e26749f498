"""Verbs about serving: ``interleaf serve`` (the OpenAI-compatible server) and ``interleaf chat``."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

def serve_cmd(
    model: str = typer.Option(..., "--model", "-m", help="A saved model directory or a preset name."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to bind; 0 lets the system choose (the bound port is printed)."),
    api_key: Optional[str] = typer.Option(
        None, envvar="INTERLEAF_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (env INTERLEAF_API_KEY)."
    ),
    model_name: Optional[str] = typer.Option(None, help="The model id clients send (default: the directory or preset name)."),
    allow_urls: bool = typer.Option(False, "--allow-urls", help="Fetch http(s) image URLs (public hosts only, unless allow-listed)."),
    allowed_hosts: Optional[str] = typer.Option(None, help="With --allow-urls: the only hosts image URLs may name (comma-separated); these may be private."),
    max_batch_size: int = typer.Option(8, min=1, help="Most sequences generated at once."),
    max_queue: int = typer.Option(64, min=1, help="Most requests waiting; more get HTTP 429."),
    max_cache_mb: Optional[float] = typer.Option(
        None, min=0.001, help="Most memory the running requests' KV and image caches may take (MiB); a request "
        "waits until it fits, and one that never could gets HTTP 400. Default: no limit beyond the batch size."),
    max_prefill_tokens: int = typer.Option(
        4096, min=1, help="Most prompt tokens prefilled between two decoding steps (at least one request each time), "
        "so that a burst of long prompts does not stall running answers."),
    max_body_bytes: int = typer.Option(20_000_000, min=1, help="Largest request body."),
    max_images: int = typer.Option(8, min=1, help="Most images per request."),
    max_image_pixels: int = typer.Option(16_000_000, min=1, help="Most pixels (width x height) per image."),
    max_prompt_tokens: int = typer.Option(4096, min=1),
    max_completion_tokens: int = typer.Option(512, min=1, help="Most (and default) new tokens per answer."),
    compile: bool = typer.Option(
        False, "--compile", help="Run decoding steps through torch.compile (the first requests compile; measured in "
        "the README's Performance section: it does not pay off on a CPU)."),
    shutdown_timeout: float = typer.Option(
        10.0, min=0.1, help="On SIGTERM/SIGINT: cancel running requests and exit within this many seconds."),
    stall_timeout: float = typer.Option(
        120.0, min=0.1, help="A worker that holds work but makes no progress this long is reported stuck (/health 503)."),
    seed: Optional[int] = typer.Option(None, help="Seed for a preset's random weights."),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve MODEL with an OpenAI-compatible API (/v1/chat/completions) and a web playground at /."""
    from ..serving.app import create_app
    from ..serving.limits import ServeLimits, URLPolicy
    from ..serving.runner import serve
    from .models import load_model

    m, p = load_model(model, seed=seed)
    limits = ServeLimits(
        max_body_bytes=max_body_bytes, max_images=max_images, max_image_pixels=max_image_pixels,
        max_prompt_tokens=max_prompt_tokens, max_completion_tokens=max_completion_tokens,
    )
    name = model_name or (Path(model).expanduser().name if Path(model).expanduser().is_dir() else model)
    app = create_app(
        m, p, model_name=name, api_key=api_key or None, limits=limits,
        url_policy=URLPolicy.from_options(allow_urls, allowed_hosts),
        max_batch_size=max_batch_size, max_queue=max_queue,
        max_cache_bytes=None if max_cache_mb is None else int(max_cache_mb * 2**20),
        max_prefill_tokens=max_prefill_tokens, compile=compile,
        stall_timeout_s=stall_timeout, shutdown_timeout_s=shutdown_timeout,
    )
    if not api_key and not _is_loopback(host):
        typer.secho(f"warning: serving on {host} without an API key; anyone who reaches it can use it "
                    "(set --api-key or INTERLEAF_API_KEY)", err=True, fg=typer.colors.YELLOW)

    def started(bound_host: str, bound_port: int) -> None:
        typer.echo(f"serving {name!r} on http://{bound_host}:{bound_port} (playground at /, API at /v1)", err=True)

    serve(app, host=host, port=port, log_level=log_level, on_started=started)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def chat_cmd(
    model: str = typer.Option(..., "--model", "-m", help="A saved model directory or a preset name."),
    max_new_tokens: int = typer.Option(128, min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy decoding."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (and a preset's random weights)."),
) -> None:
    """Chat with MODEL in the terminal: /image PATH, /reset, /save FILE, /quit."""
    from ..serving.chat_repl import run_chat
    from .models import load_model

    m, p = load_model(model, seed=seed)
    run_chat(m, p, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("chat")(chat_cmd)
