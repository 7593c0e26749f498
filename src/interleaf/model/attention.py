"""One attention function for the model's own attention layers, with pluggable kernels.

The gated cross-attention blocks, the perceiver resampler and the built-in ViT all call
:func:`attend` instead of a kernel directly::

    out = attend(q, k, v, mask)   # q (B, H, Tq, Dh), k/v (B, H, Tk, Dh) -> (B, H, Tq, Dh)

``mask`` is boolean, ``True`` where a query may attend a key, broadcastable to (B, H, Tq, Tk).
A query whose mask row is all ``False`` gets a zero output (what PyTorch's SDPA returns for it).

Implementations are looked up by name in a small registry:

- ``"sdpa"`` (the default): ``torch.nn.functional.scaled_dot_product_attention``.
- ``"eager"``: the readable reference (scores in float32, softmax, weighted sum), for tests and
  for debugging a kernel against it.
- anything added with :func:`register_attention` (e.g. a varlen or flex-attention kernel).

The implementation used is, in order: the ``implementation=`` argument, the innermost
``with attention_implementation(name):`` block, the process default set by
:func:`set_attention_implementation`. The language model's own self-attention is not covered:
it follows transformers' ``attn_implementation``.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "attend",
    "attention_implementation",
    "attention_implementations",
    "eager_attention",
    "get_attention_implementation",
    "register_attention",
    "sdpa_attention",
    "set_attention_implementation",
    "unregister_attention",
]

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's fused ``scaled_dot_product_attention`` (fully masked rows give zeros)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference attention: ``softmax(q k^T / sqrt(Dh))`` in float32, masked, then ``@ v``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)).to(torch.float32) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        # a query that may attend nothing gets zeros, as SDPA gives it (not a uniform average)
        weights = weights * mask.any(dim=-1, keepdim=True).to(weights.dtype)
    return torch.matmul(weights.to(v.dtype), v)  # (B, H, Tq, Dh)


_REGISTRY: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "eager": eager_attention}
_DEFAULT = "sdpa"
_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("interleaf_attention", default=None)


def attention_implementations() -> list[str]:
    """The registered implementation names, sorted."""
    return sorted(_REGISTRY)


def _check(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"{where}: unknown attention implementation {name!r}; registered: {', '.join(attention_implementations())} "
            "(add one with interleaf.model.attention.register_attention(name, fn))"
        )
    return name


def register_attention(name: str, fn: AttentionFn, *, overwrite: bool = False) -> None:
    """Add ``fn(q, k, v, mask) -> out`` under ``name`` (same shapes and mask meaning as :func:`attend`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_attention: the name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_attention({name!r}): fn must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_attention: {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = fn


def unregister_attention(name: str) -> None:
    """Remove a registered implementation (the built-in ``sdpa`` and ``eager`` stay)."""
    if name in ("sdpa", "eager"):
        raise ValueError(f"unregister_attention: {name!r} is built in and cannot be removed")
    global _DEFAULT
    _REGISTRY.pop(name, None)
    if _DEFAULT == name:
        _DEFAULT = "sdpa"


def set_attention_implementation(name: str) -> None:
    """Make ``name`` the process-wide default (``with attention_implementation(...)`` still overrides it)."""
    global _DEFAULT
    _DEFAULT = _check(name, "set_attention_implementation")


def get_attention_implementation() -> str:
    """The name :func:`attend` uses now when no ``implementation=`` is given."""
    return _CURRENT.get() or _DEFAULT


@contextmanager
def attention_implementation(name: str) -> Iterator[str]:
    """``with attention_implementation("eager"): model(...)`` uses ``name`` inside the block only."""
    token = _CURRENT.set(_check(name, "attention_implementation"))
    try:
        yield name
    finally:
        _CURRENT.reset(token)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    implementation: str | None = None,
) -> torch.Tensor:
    """Attention of ``q (B, H, Tq, Dh)`` over ``k, v (B, H, Tk, Dh)`` -> ``(B, H, Tq, Dh)``.

    ``mask``: boolean, True = may attend, broadcastable to (B, H, Tq, Tk); scale is ``1/sqrt(Dh)``.
    """
    name = implementation if implementation is not None else get_attention_implementation()
    fn = _REGISTRY.get(name)
    if fn is None:
        _check(name, "attend(implementation=...)")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"attend: mask must be boolean (True = may attend), got {mask.dtype}")
    return fn(q, k, v, mask)
