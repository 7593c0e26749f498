"""RICES: Retrieval-based In-Context Example Selection (Yang et al. 2022, as OpenFlamingo uses it).

For each evaluated example the ``k`` demonstrations whose images are most similar to its own
(cosine similarity of image features) are chosen, ordered so that the most similar comes LAST,
right before the query. Features come from the model's own vision tower (mean-pooled over its
output tokens) or from any encoder given; they are cached on disk, keyed by the encoder's
identity and a hash of the examples (ids and image contents), so a changed model or dataset is
never served stale features::

    images (N, 3, H, W) ──► encoder ──► (N, D) ──► L2-normalise ──► cache/rices-<key>.safetensors
    query (D,) · pool (P, D)^T ──► similarities (P,) ──► top k ──► ascending (most similar last)
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from ..errors import InputError
from .fewshot import source_id
from .tasks.spec import Example

Encoder = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) -> (N, D)


class VisionTowerEncoder:
    """The model's own vision tower, features mean-pooled over tokens: (N, 3, H, W) -> (N, Dv)."""

    def __init__(self, model: Any):
        self.model = model
        h = hashlib.sha256(json.dumps(model.config.vision, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, p in model.vision_tower.named_parameters():  # a cheap fingerprint of the weights
                h.update(name.encode())
                h.update(repr(round(float(p.double().sum()), 6)).encode())
                h.update(repr(round(float(p.double().abs().sum()), 6)).encode())
        self.identity = "vision_tower:" + h.hexdigest()[:16]

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = self.model.vision_tower
        param = next(tower.parameters())
        feats = tower(pixel_values.to(param.device, param.dtype)[None])[0]  # (N, V, Dv)
        return feats.float().mean(dim=1)  # (N, Dv)


def _image_digest(image: Any) -> str:
    if isinstance(image, (bytes, bytearray)):
        return hashlib.sha256(image).hexdigest()[:16]
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return hashlib.sha256(buf.getvalue()).hexdigest()[:16]
    p = Path(image)
    if p.is_file():
        st = p.stat()
        return f"{p}:{st.st_size}:{int(st.st_mtime)}"
    return str(image)


def dataset_hash(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(e.id.encode())
        for img in e.images:
            h.update(_image_digest(img).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def image_features(
    examples: list[Example], processor: Any, encoder: Encoder, *, identity: str,
    cache_dir: str | Path | None = None, batch_size: int = 32,
) -> torch.Tensor:
    """L2-normalised features (N, D) of each example's images (mean over its images; zeros if none)."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{identity}\x00{dataset_hash(examples)}".encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"rices-{key}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            if cached["ids"] == [e.id for e in examples]:
                return cached["features"]
    flat = [(i, img) for i, e in enumerate(examples) for img in e.images]
    sums: torch.Tensor | None = None
    counts = torch.zeros(len(examples))
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        pixels = processor.process_images([img for _, img in chunk], where="RICES image")  # (n, 3, S, S)
        feats = encoder(pixels).float()  # (n, D)
        if sums is None:
            sums = torch.zeros(len(examples), feats.shape[-1])
        for (i, _), f in zip(chunk, feats):
            sums[i] += f
            counts[i] += 1
    if sums is None:
        raise InputError("RICES: none of the examples has an image to compute features from")
    feats = sums / counts.clamp_min(1)[:, None]
    feats = torch.nn.functional.normalize(feats, dim=-1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"ids": [e.id for e in examples], "features": feats}, tmp)
        tmp.replace(path)
    return feats


class RICESDemos:
    """Demonstrations by image similarity; the most similar demonstration comes last."""

    def __init__(self, pool: list[Example], pool_features: torch.Tensor, query_features: dict[str, torch.Tensor]):
        if pool_features.shape[0] != len(pool):
            raise InputError(f"RICES: {len(pool)} demonstrations but {pool_features.shape[0]} feature rows")
        self.pool = pool
        self.pool_features = pool_features
        self.query_features = query_features
        self._sources = [source_id(d) for d in pool]

    def sample(self, query: Example, k: int) -> list[Example]:
        if k == 0:
            return []
        if query.id not in self.query_features:
            raise InputError(f"RICES: no features computed for example {query.id!r}")
        sims = self.pool_features @ self.query_features[query.id]  # (P,)
        own = source_id(query)
        mask = torch.tensor([s == own for s in self._sources])
        sims = sims.masked_fill(mask, float("-inf"))
        available = int((~mask).sum())
        if k > available:
            raise InputError(f"RICES: {k} demonstrations asked but only {available} are available")
        top = torch.topk(sims, k).indices.tolist()  # most similar first
        return [self.pool[i] for i in reversed(top)]


def build_rices(
    pool: list[Example], queries: list[Example], processor: Any, encoder: Encoder, *, identity: str,
    cache_dir: str | Path | None = None, batch_size: int = 32,
) -> RICESDemos:
    pool_feats = image_features(pool, processor, encoder, identity=identity, cache_dir=cache_dir, batch_size=batch_size)
    query_feats = image_features(queries, processor, encoder, identity=identity, cache_dir=cache_dir,
                                 batch_size=batch_size)
    return RICESDemos(pool, pool_feats, {e.id: f for e, f in zip(queries, query_feats)})
