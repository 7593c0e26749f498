"""xGen-MM's perceiver "token sampler": groups of vision features -> a fixed number of LM tokens.

Each group (one view of an image, or one group of anyres tokens) is resampled on its own::

    features (G, V, dim)  [+ mask (G, V), 1 = real token, 0 = padding]
        latents (L, dim), the same start for every group
        x depth:  latents = latents + attn(norm_media(features), norm_latents(latents), mask)
                  latents = latents + ff(latents)        LN -> Linear -> GELU(erf) -> Linear
        proj(norm(latents))                              LayerNorm, then Linear with bias
    -> tokens (G, L, out_dim)

``attn``: queries from the latents; keys and values from ``concat(media, latents)`` (the latents
attend to the media *and* to themselves), one fused ``kv_proj`` whose first half of output rows
makes the keys; no biases; scale ``head_dim ** -0.5``. The mask is a key-padding mask over the
media tokens only, the same in every layer: the latents are always keys.

Against the Flamingo resampler of :mod:`interleaf.model.resampler` this one takes a key-padding
mask, fuses the key and value projections (as the released checkpoints store them) and ends with a
projection to the LM's width. The math is xGen-MM (BLIP-3) r-v1.5's ``PerceiverResampler``;
:mod:`interleaf.convert.xgenmm_keys` maps its released parameter names to these.

A group whose tokens are all padding is valid input, as in the released code: its latents attend
only to themselves, so every such group yields the same tokens (no NaN). xGen-MM's anyres
grouping makes them whenever a group covers only padded rows (or columns) of the stitched map.
Masking a token is the same as leaving it out: a masked group gives the tokens of the group
truncated to its real tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from interleaf.config import TokenSamplerConfig
from interleaf.errors import ConfigError, InputError
from interleaf.model.attention import attend
from interleaf.model.init import init_linears_and_norms

__all__ = ["TokenSampler", "TokenSamplerAttention", "TokenSamplerFeedForward"]


class TokenSamplerAttention(nn.Module):
    """Latents attend to ``concat(media, latents)``, with a key-padding mask over the media."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim, eps=eps)
        self.norm_latents = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * inner, bias=False)  # rows [0, inner): keys; [inner, 2 inner): values
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        g, t, _ = x.shape
        return x.view(g, t, self.heads, self.head_dim).transpose(1, 2)  # (G, H, T, Dh)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``media (G, V, D)``, ``latents (G, L, D)``, ``key_mask (G, 1, 1, V + L)`` bool -> ``(G, L, D)``."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        context = torch.cat([media, latents], dim=1)  # (G, V + L, D)
        k, v = self.kv_proj(context).chunk(2, dim=-1)  # (G, V + L, H*Dh) each
        q = self._heads(self.q_proj(latents))  # (G, H, L, Dh)
        out = attend(q, self._heads(k), self._heads(v), key_mask)  # (G, H, L, Dh)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (G, L, D)


class TokenSamplerFeedForward(nn.Module):
    """LayerNorm -> Linear(dim, ff_mult * dim) -> GELU (exact, erf) -> Linear back; no biases."""

    def __init__(self, dim: int, mult: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TokenSamplerLayer(nn.Module):
    def __init__(self, dim: int, cfg: TokenSamplerConfig):
        super().__init__()
        self.attn = TokenSamplerAttention(dim, cfg.heads, cfg.head_dim, cfg.norm_eps)
        self.ff = TokenSamplerFeedForward(dim, cfg.ff_mult, cfg.norm_eps)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.attn(media, latents, key_mask)
        return latents + self.ff(latents)


def _width(configured: int | None, given: int | None, name: str, what: str) -> int:
    if configured is None and given is None:
        raise ConfigError(f"token_sampler.{name}", "is not set", f"set it, or pass {name}= ({what})")
    if configured is not None and given is not None and configured != given:
        raise ConfigError(
            f"token_sampler.{name}", f"is {configured}, but the model gives {given} ({what})",
            f"leave it unset or make it {given}",
        )
    return int(configured if configured is not None else given)


class TokenSampler(nn.Module):
    """``features (G, V, dim)`` + optional ``mask (G, V)`` -> ``tokens (G, num_latents, out_dim)``.

    ``dim`` and ``out_dim`` come from the config or, where it leaves them ``None``, from the
    arguments (the vision tower's and the LM's widths); they must agree when both are given.
    """

    def __init__(self, cfg: TokenSamplerConfig, dim: int | None = None, out_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.dim = _width(cfg.dim, dim, "dim", "the width of the vision features")
        self.out_dim = _width(cfg.out_dim, out_dim, "out_dim", "the LM's hidden size")
        self.num_latents = cfg.num_latents
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, self.dim))
        self.layers = nn.ModuleList(TokenSamplerLayer(self.dim, cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(self.dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(self.dim, self.out_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Standard-normal latents (as released); truncated normal 0.02 for projections, zero biases."""
        if self.latents.is_meta:
            return
        nn.init.normal_(self.latents)
        init_linears_and_norms(self)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_features(features)
        g = features.shape[0]
        key_mask = None
        if mask is not None:
            keep = self._check_mask(mask, features).to(features.device)  # (G, V) bool
            latent_keys = torch.ones(g, self.num_latents, dtype=torch.bool, device=features.device)
            key_mask = torch.cat([keep, latent_keys], dim=1)[:, None, None, :]  # (G, 1, 1, V + L)
        latents = self.latents.to(features.dtype).expand(g, -1, -1)  # (G, L, D)
        for layer in self.layers:
            latents = layer(features, latents, key_mask)
        return self.proj(self.norm(latents))  # (G, L, out_dim)

    def _check_features(self, features: torch.Tensor) -> None:
        if not torch.is_tensor(features) or features.dim() != 3 or features.shape[-1] != self.dim:
            got = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise InputError(
                f"the token sampler expects vision features of shape (groups, tokens, {self.dim}), got {got}: "
                f"pass one row of {self.dim}-wide features per token (the sampler's dim is {self.dim})"
            )
        if not features.is_floating_point():
            raise InputError(f"the token sampler expects floating-point vision features, got {features.dtype}")

    def _check_mask(self, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The mask as booleans (True = real token), after checking its shape and values."""
        if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(features.shape[:2]):
            got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise InputError(
                f"the token sampler's mask must have shape (groups, tokens) = {tuple(features.shape[:2])}, "
                f"one entry per feature row, got {got}"
            )
        if mask.dtype == torch.bool:
            return mask
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError(
                "the token sampler's mask must hold 1 (real token) or 0 (padding) only; "
                "pass a boolean or 0/1 tensor"
            )
        return mask != 0
