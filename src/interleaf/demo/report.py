"""The demo's HTML report: loss curves per stage and a gallery of held-out answers.

A single self-contained file (inline SVG, images as data: URLs, no scripts), so it opens from
disk anywhere.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

from .. import files

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a run's JSON-lines log; none when it is missing, and a torn line is skipped."""
    if not path.exists():
        return []
    return files.read_jsonl(path, "demo log", on_bad_line=files.skip_bad_line)


def loss_curve_svg(curves: dict[str, list[tuple[float, float]]], width: int = 640, height: int = 260) -> str:
    """One SVG with a polyline per stage: (step, loss) points, stages laid end to end."""
    points = [(x, y) for pts in curves.values() for x, y in pts]
    if not points:
        return "<p>No loss values were logged.</p>"
    pad = 40
    offset, laid = 0.0, {}
    for name, pts in curves.items():
        laid[name] = [(offset + x, y) for x, y in pts]
        offset += max((x for x, _ in pts), default=0) + 1
    xs = [x for pts in laid.values() for x, _ in pts]
    ys = [y for pts in laid.values() for _, y in pts]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = 0.0, max(ys) * 1.05 or 1

    def sx(x: float) -> float:
        return pad + (x - x0) / max(x1 - x0, 1e-9) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / max(y1 - y0, 1e-9) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
             f'<text x="{pad - 4}" y="{sy(y1) + 4:.1f}" font-size="10" text-anchor="end">{y1:.2f}</text>',
             f'<text x="{pad - 4}" y="{sy(0) + 4:.1f}" font-size="10" text-anchor="end">0</text>',
             f'<text x="{width / 2}" y="{height - 8}" font-size="11" text-anchor="middle">optimiser steps (stages in order)</text>']
    for i, (name, pts) in enumerate(laid.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        if pts:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{width - pad - 110}" y="{pad + 14 * i}" font-size="11" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _data_url(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def write_report(
    out: Path,
    *,
    metrics: dict[str, Any],
    curves: dict[str, list[tuple[float, float]]],
    gallery: Sequence[dict[str, Any]],
    images_root: Path,
    title: str = "interleaf demo",
) -> Path:
    """``gallery`` rows: ``{"image", "question", "answer", "prediction", "qtype"}``."""
    rows = []
    for g in gallery:
        ok = g["prediction"].strip() == g["answer"].strip()
        img = images_root / g["image"]
        src = _data_url(img) if img.exists() else ""
        rows.append(
            f'<figure class="{"ok" if ok else "bad"}"><img src="{src}" alt="held-out scene">'
            f"<figcaption><b>{html.escape(g['question'])}</b><br>answer: {html.escape(g['answer'])}"
            f"<br>model: {html.escape(g['prediction'])} {'✓' if ok else '✗'}"
            f"<br><small>{html.escape(g.get('qtype', ''))}</small></figcaption></figure>"
        )
    table = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in _flatten(metrics)
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td {{ border: 1px solid #ccc; padding: 2px 8px; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ width: 170px; margin: 0; padding: 6px; border: 2px solid #ccc; border-radius: 6px; }}
figure.ok {{ border-color: #2ca02c; }} figure.bad {{ border-color: #d62728; }}
figure img {{ width: 128px; height: 128px; image-rendering: pixelated; display: block; }}
figcaption {{ font-size: 12px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Held-out results</h2><table>{table}</table>
<h2>Training loss</h2>{loss_curve_svg(curves)}
<h2>Held-out gallery</h2><div class="gallery">{"".join(rows)}</div>
</body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
