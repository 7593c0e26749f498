"""Perceiver resampler: ``V`` patch features per image -> ``num_latents`` latents, width kept.

Each image is resampled on its own: ``(B, N_img, V, D)`` -> ``(B, N_img, L, D)``. A block is
perceiver attention (queries from the latents; keys and values from the media and the latents
concatenated, as in Flamingo) followed by a feed-forward layer, each with a residual; a final
LayerNorm closes the stack. With ``activation="relu"`` the math equals transformers'
``IdeficsPerceiverResampler``; :func:`idefics_perceiver_key_map` maps its state-dict keys to
ours so IDEFICS checkpoints convert.
"""

from __future__ import annotations

import torch
from torch import nn

from interleaf.config import ResamplerConfig
from interleaf.errors import InputError
from interleaf.model.attention import attend
from interleaf.model.init import init_linears_and_norms

__all__ = ["PerceiverAttention", "PerceiverFeedForward", "PerceiverResampler", "idefics_perceiver_key_map"]


class PerceiverAttention(nn.Module):
    """Latents attend to ``concat(media, latents)``; optional per-head LayerNorm on q and k."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B', H, T, Dh)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``media (B', V, D)``, ``latents (B', L, D)`` -> update for the latents ``(B', L, D)``."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        context = torch.cat([media, latents], dim=1)  # (B', V + L, D)
        q = self._heads(self.q_proj(latents))  # (B', H, L, Dh)
        k = self._heads(self.k_proj(context))  # (B', H, V + L, Dh)
        v = self._heads(self.v_proj(context))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attend(q, k, v)  # (B', H, L, Dh)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B', L, D)


class PerceiverFeedForward(nn.Module):
    """LayerNorm -> Linear(dim, dim * mult) -> activation -> Linear back, no biases."""

    def __init__(self, dim: int, mult: int, activation: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, cfg: ResamplerConfig):
        super().__init__()
        self.attn = PerceiverAttention(dim, cfg.heads, cfg.head_dim, cfg.qk_norm)
        self.ff = PerceiverFeedForward(dim, cfg.ff_mult, cfg.activation)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """``(B, N_img, V, dim)`` -> ``(B, N_img, num_latents, dim)``; images never see each other."""

    def __init__(self, cfg: ResamplerConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        self.num_latents = cfg.num_latents
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        self.layers = nn.ModuleList(PerceiverBlock(dim, cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Standard-normal latents (as Flamingo / IDEFICS); truncated normal 0.02 for projections."""
        nn.init.normal_(self.latents)
        init_linears_and_norms(self)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        if media.dim() != 4 or media.shape[-1] != self.dim:
            raise InputError(
                f"the perceiver resampler expects vision features of shape (batch, images, tokens, {self.dim}),"
                f" got {tuple(media.shape)}"
            )
        b, n, v, d = media.shape
        flat = media.reshape(b * n, v, d)  # (B*N, V, D)
        latents = self.latents.to(flat.dtype).expand(b * n, -1, -1)  # (B*N, L, D)
        for layer in self.layers:
            latents = layer(flat, latents)
        return self.norm(latents).view(b, n, self.num_latents, d)  # (B, N, L, D)


def idefics_perceiver_key_map(depth: int, prefix: str = "") -> dict[str, str]:
    """Map ``IdeficsPerceiverResampler`` state-dict keys to :class:`PerceiverResampler` keys.

    ``prefix`` is prepended to the IDEFICS keys (e.g. ``"model.perceiver_resampler."`` for a full
    IDEFICS checkpoint). The q/k norm entries only occur in checkpoints built with
    ``qk_layer_norms_perceiver``; a converter should map the keys that are present.
    """
    mapping = {f"{prefix}latents": "latents"}
    for suffix in ("weight", "bias"):
        mapping[f"{prefix}layer_norm.{suffix}"] = f"norm.{suffix}"
    for i in range(depth):
        src, dst = f"{prefix}blocks.{i}", f"layers.{i}"
        pairs = {
            "0.context_layer_norm": "attn.norm_media",
            "0.latents_layer_norm": "attn.norm_latents",
            "0.q_layer_norm": "attn.q_norm",
            "0.k_layer_norm": "attn.k_norm",
            "1.ln": "ff.norm",
        }
        for old, new in pairs.items():
            for suffix in ("weight", "bias"):
                mapping[f"{src}.{old}.{suffix}"] = f"{dst}.{new}.{suffix}"
        linears = {
            "0.q_proj": "attn.q_proj",
            "0.k_proj": "attn.k_proj",
            "0.v_proj": "attn.v_proj",
            "0.output_proj": "attn.out_proj",
            "1.fc": "ff.fc1",
            "1.c_proj": "ff.fc2",
        }
        for old, new in linears.items():
            mapping[f"{src}.{old}.weight"] = f"{dst}.{new}.weight"
    return mapping
