"""Gated cross-attention from text to image latents, and the per-call media context.

One block sits in front of a chosen decoder layer of the LM::

    x (B, T, D) ─► norm ─► q ──┐
    latents (B, N_img * L, Dv) ─► k, v (projected once per call, see MediaCache)
                               └─► attention, token t sees only the latents of its latest image
                                   (a decoding step gathers each row's one image: L keys, not N*L)
                                   ─► zeroed for tokens that see no image
    x = x + tanh(attn_gate) * attn(x)
    x = x + tanh(ffn_gate)  * ffn(norm(x))    (zeroed too for tokens without image, unless
                                               cross_attention.ffn_without_image, as IDEFICS does)

With ``cross_attention.skip_rows_without_image`` (InfiMM's per-sample flag) both residuals are also
multiplied by 1 for a row whose prompt holds an image and 0 for a row without one, so such a row
computes exactly the plain LM.

Gates start at zero, so an untrained model is exactly its base LM. Per-call inputs reach the
blocks through a ``ContextVar`` set by the top model around the LM call (nothing is stored on a
module between calls, and threads never see each other's images).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..config import CrossAttentionConfig
from .attention import attend


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as LLaMA and IDEFICS do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rms" else nn.LayerNorm(dim, eps=eps)


class FeedForward(nn.Module):
    """SwiGLU-style (``gated``, like LLaMA's MLP) or plain ``Linear -> act -> Linear``."""

    def __init__(self, dim: int, hidden: int, kind: str, activation: str):
        super().__init__()
        self.kind = kind
        self.act = ACT2FN[activation]
        if kind == "gated":
            self.gate_proj = nn.Linear(dim, hidden, bias=False)
            self.up_proj = nn.Linear(dim, hidden, bias=False)
        else:
            self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


@dataclass
class MediaCache:
    """Everything the cross-attention blocks need about this call's images.

    Built once per ``forward``/``generate`` call from the image latents; ``kv[i]`` holds block i's
    keys and values, projected at the first step and reused at every later step and by every beam.
    Rows may be expanded by generation (beams, several return sequences): row ``r`` of the
    running batch reads row ``r // (running_rows // rows)`` of the cache.
    """

    latents: torch.Tensor  # (B, N_img, L, Dv)
    num_images: torch.Tensor  # (B,) images in each row's prompt; later tokens attend the last one
    # block index -> (keys, values), each (B, H, N*L, Dh); filled by each block on its first call
    # (inside the block's own forward, so device_map / offloading hooks have its weights in place)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    @property
    def latents_per_image(self) -> int:
        return self.latents.shape[2]

    def select(self, rows: torch.Tensor) -> "MediaCache":
        """The cache of the given rows only (``rows``: (R,) long indices), projected keys and values included."""
        rows = rows.to(self.latents.device)
        kv = {block: (k[rows.to(k.device)], v[rows.to(v.device)]) for block, (k, v) in self.kv.items()}
        return MediaCache(latents=self.latents[rows], num_images=self.num_images[rows.to(self.num_images.device)], kv=kv)

    def row_index(self, running_rows: int) -> torch.Tensor | None:
        """Map a running batch (expanded by beams) to cache rows; None when it is the same."""
        if running_rows == self.rows:
            return None
        if running_rows % self.rows:
            raise ValueError(
                f"the batch has {running_rows} rows but the images were encoded for {self.rows}: "
                "pass the same batch to the processor and the model"
            )
        return torch.arange(self.rows, device=self.latents.device).repeat_interleave(running_rows // self.rows)


@dataclass
class MediaContext:
    """Per-call inputs of every block, for the current LM forward only."""

    cache: MediaCache
    image_index: torch.Tensor  # (B_run, T) index of each token's image, -1 for none
    row_index: torch.Tensor | None  # (B_run,) cache row per running row, or None
    sees_image: torch.Tensor  # (B_run, T, 1) float 1.0 where the token has an image
    row_has_image: torch.Tensor | None = None  # (B_run, 1, 1) float 1.0 for a row whose prompt has an image
    # every token of a row attends the same image (decoding): blocks gather that image's L keys and
    # values per row instead of masking all N * L
    one_image_per_row: bool = False


_MEDIA: contextvars.ContextVar[MediaContext | None] = contextvars.ContextVar("interleaf_media", default=None)


def current_media() -> MediaContext | None:
    return _MEDIA.get()


class media_context:
    """``with media_context(ctx): lm(...)`` makes ``ctx`` visible to the blocks for that call only."""

    def __init__(self, ctx: MediaContext | None):
        self.ctx = ctx

    def __enter__(self):
        self.token = _MEDIA.set(self.ctx)
        return self.ctx

    def __exit__(self, *exc):
        _MEDIA.reset(self.token)
        return False


def _init_gate(shape: str, init: str, std: float, dim: int) -> nn.Parameter:
    size = (1,) if shape == "scalar" else (1, 1, dim)
    if init == "zeros":
        return nn.Parameter(torch.zeros(size))
    if init == "ones":
        return nn.Parameter(torch.ones(size))
    return nn.Parameter(torch.randn(size) * std)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention + gated feed-forward (tanh gates)."""

    def __init__(self, cfg: CrossAttentionConfig, dim: int, media_dim: int, lm_heads: int, lm_ffn_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.heads or lm_heads
        self.head_dim = cfg.head_dim or dim // self.heads
        inner = self.heads * self.head_dim
        self.norm = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(media_dim, inner, bias=False)
        self.v_proj = nn.Linear(media_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.ffn_norm = make_norm(cfg.norm, dim, cfg.norm_eps)
        ffn_dim = cfg.ffn_dim or (lm_ffn_dim if cfg.ffn == "gated" and lm_ffn_dim else 4 * dim)
        self.ffn = FeedForward(dim, ffn_dim, cfg.ffn, cfg.activation)
        self.attn_gate = _init_gate(cfg.gate_shape, cfg.gate_init, cfg.gate_init_std, dim)
        self.ffn_gate = _init_gate(cfg.gate_shape, cfg.gate_init, cfg.gate_init_std, dim)

    def project_media(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values over the image latents, once per call: (B, N, L, Dv) -> 2 x (B, H, N*L, Dh)."""
        b, n, l, _ = latents.shape
        media = latents.reshape(b, n * l, -1)  # (B, N*L, Dv)
        k = self.k_proj(media).view(b, n * l, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N*L, Dh)
        v = self.v_proj(media).view(b, n * l, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N*L, Dh)
        if self.cfg.qk_norm:
            k = self.k_norm(k)
        return k, v

    def forward(self, x: torch.Tensor, ctx: MediaContext, block_index: int) -> torch.Tensor:
        b, t, _ = x.shape
        if block_index not in ctx.cache.kv:
            ctx.cache.kv[block_index] = self.project_media(ctx.cache.latents.to(x.device))
        k, v = ctx.cache.kv[block_index]
        q = self.q_proj(self.norm(x)).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        if self.cfg.qk_norm:
            q = self.q_norm(q)
        if ctx.one_image_per_row:
            k, v = _image_keys_values(k, v, ctx)  # (B_run, H, L, Dh)
            mask = None
        else:
            if ctx.row_index is not None:
                k, v = k[ctx.row_index], v[ctx.row_index]  # (B_run, H, N*L, Dh)
            # token t attends latent j iff j belongs to t's image; tokens without image attend everything
            # (keeps softmax finite) and are zeroed below.
            latent_image = torch.arange(k.shape[2], device=x.device) // ctx.cache.latents_per_image  # (N*L,)
            index = ctx.image_index  # (B, T)
            mask = (index[:, :, None] == latent_image[None, None, :]) | (index[:, :, None] < 0)  # (B, T, N*L)
            mask = mask[:, None]
        out = attend(q, k.to(q.dtype), v.to(q.dtype), mask)  # (B, H, T, Dh)
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))  # (B, T, D)
        sees = ctx.sees_image.to(out.dtype)  # (B, T, 1)
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * (out * sees)
        h = self.ffn(self.ffn_norm(x))
        if not self.cfg.ffn_without_image:
            h = h * sees
        elif self.cfg.skip_rows_without_image and ctx.row_has_image is not None:
            h = h * ctx.row_has_image.to(h.dtype)  # (rows without image: their attention part is already 0)
        return x + torch.tanh(self.ffn_gate).to(x.dtype) * h


def _image_keys_values(k: torch.Tensor, v: torch.Tensor, ctx: MediaContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of the one image each running row attends: (B, H, N*L, Dh) -> (B_run, H, L, Dh).

    Gathered by index on the device (no host synchronisation). A row that sees no image reads its
    first image slot; its output is zeroed by ``sees_image``.
    """
    rows = ctx.image_index.shape[0]
    cache_rows = ctx.row_index if ctx.row_index is not None else torch.arange(rows, device=k.device)
    image = ctx.image_index[:, 0].clamp_min(0)  # (B_run,)
    n, length = ctx.cache.latents.shape[1], ctx.cache.latents_per_image
    cache_rows, image = cache_rows.to(k.device), image.to(k.device)
    # advanced indices on dims 0 and 2 of (B, H, N, L, Dh) -> (B_run, H, L, Dh)
    k = k.unflatten(2, (n, length))[cache_rows, :, image]
    v = v.unflatten(2, (n, length))[cache_rows, :, image]
    return k, v


class CrossAttentionDecoderLayer(nn.Module):
    """Stands in an LM's decoder ``ModuleList``: runs the block, then the original layer untouched."""

    def __init__(self, block: GatedCrossAttentionBlock, decoder_layer: nn.Module, block_index: int):
        super().__init__()
        self.cross_attention = block
        self.decoder_layer = decoder_layer
        self.block_index = block_index

    def forward(self, *args, **kwargs):
        ctx = _MEDIA.get()
        cfg = self.cross_attention.cfg
        if ctx is not None or (cfg.ffn_without_image and not cfg.skip_rows_without_image):
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = self._cross_attend(kwargs["hidden_states"], ctx)
            else:
                args = (self._cross_attend(args[0], ctx), *args[1:])
        return self.decoder_layer(*args, **kwargs)

    def _cross_attend(self, hidden: torch.Tensor, ctx: MediaContext | None) -> torch.Tensor:
        if ctx is None:  # no image anywhere in the batch: only an image-independent FFN can act
            h = self.cross_attention.ffn(self.cross_attention.ffn_norm(hidden))
            return hidden + torch.tanh(self.cross_attention.ffn_gate).to(hidden.dtype) * h
        return self.cross_attention(hidden, ctx, self.block_index)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # LMs read attributes of their layers (e.g. ``attention_type``): defer to the original.
            return getattr(self._modules["decoder_layer"], name)
