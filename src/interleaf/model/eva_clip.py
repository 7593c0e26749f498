"""EVA-CLIP vision towers (InfiMM's): images ``(B', 3, H, W)`` -> features ``(B', V, Dv)``.

Two styles, chosen by :class:`~interleaf.config.EvaClipConfig` flags:

- EVA02 (``rope``, ``naiveswiglu``, ``subln``; InfiMM-Zephyr's EVA02-CLIP-L/14-336): pre-norm blocks
  ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; separate ``q_proj`` / ``k_proj`` / ``v_proj`` with
  biases on q and v only; a 2D rotary embedding on the queries and keys of the patch tokens (the
  class token is not rotated); a LayerNorm on the attention output (``inner_attn_ln``) and inside
  the SwiGLU MLP (``w3(ffn_ln(silu(w1 x) * w2 x))``).
- EVA-CLIP-4B (``postnorm``; InfiMM-Vicuna-13B's): post-norm blocks ``x + norm1(attn(x))``,
  ``x + norm2(mlp(x))``; one fused ``qkv`` projection whose bias is ``cat(q_bias, 0, v_bias)``;
  ``fc2(gelu(fc1 x))``.

Both: a patchify convolution, a class token, absolute position embeddings (interpolated bicubically
when the tower runs at another image size than ``eva.trained_image_size``), scale ``head_dim^-0.5``.
The features are, by default, what InfiMM takes: the last block's output for every token, class
token first, without the final ``norm`` (``feature_layer``, ``drop_cls_token`` and ``post_layernorm``
choose otherwise). The final ``norm`` and the CLIP ``head`` are kept so that a released tower loads
whole; they are reported by :meth:`EvaVisionTransformer.unused_parameters`.

Parameter names are EVA-CLIP's own (``blocks.{i}.attn.q_proj.weight``, ``blocks.{i}.mlp.w1.bias``,
``pos_embed``, ...), so a tower's state dict is the released one without its prefix; the rotary
tables are recomputed, never stored.

The 2D rotary embedding, for head width ``Dh`` on a ``g x g`` patch grid: ``d = Dh / 2`` frequencies
``1 / 10000^(2j / d)`` (``j < d / 2``) at positions ``t = arange(g) / g * pt_hw_seq_len``
(``intp_freq``), each frequency used for two adjacent channels; head channels ``[0, d)`` rotate with
the patch's row, ``[d, Dh)`` with its column; ``x * cos + rotate_half(x) * sin`` with
``rotate_half`` taking each adjacent pair ``(a, b)`` to ``(-b, a)``.

A tower is saved on its own with :func:`save_eva_clip` (``config.json`` in EVA-CLIP's vision-config
names with ``model_type: eva_clip``, and ``model.safetensors``) and read back with
:func:`load_eva_clip`; :func:`interleaf.model.vision.load_vision_tower` reads such a directory, so
``interleaf.build(vision=<dir>, lm=...)`` puts it in front of any LM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interleaf.config import CLIP_MEAN, CLIP_STD, EvaClipConfig, VisionConfig
from interleaf.errors import CheckpointError, ConfigError
from interleaf.files import read_json
from interleaf.model.attention import attend
from interleaf.model.init import init_linears_and_norms

__all__ = [
    "EVA_MODEL_TYPE",
    "EvaVisionTransformer",
    "eva_vision_config",
    "load_eva_clip",
    "rope_tables",
    "save_eva_clip",
]

EVA_MODEL_TYPE = "eva_clip"
# EVA-CLIP vision-config keys that do not change the features at inference (training-only or
# kernel choices) or that name the model; any other unknown key with a set value is refused.
_IGNORED_KEYS = {"eva_model_name", "drop_path_rate", "xattn", "fusedLN", "patch_dropout", "model_type",
                 "global_average_pool", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj",
                 "timm_proj_bias", "timm_drop", "timm_drop_path", "output_tokens", "grad_checkpointing"}
_EVA_KEYS = ("mlp_ratio", "qkv_bias", "rope", "pt_hw_seq_len", "intp_freq", "naiveswiglu", "subln", "postnorm",
             "embed_dim", "norm_eps", "trained_image_size")


def rope_tables(head_dim: int, grid: int, pt_seq_len: int, intp_freq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2D rotary embedding for a ``grid x grid`` patch grid: 2 x (grid * grid, head_dim)."""
    d = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))  # (d / 2,)
    t = torch.arange(grid) / (grid if intp_freq else pt_seq_len) * pt_seq_len  # (grid,)
    f = (t[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # (grid, d): each frequency twice
    rows = f[:, None, :].expand(grid, grid, d)  # channel block 0: the patch's row
    cols = f[None, :, :].expand(grid, grid, d)  # channel block 1: its column
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 2 * d)  # (g*g, Dh), row-major patches
    return table.cos(), table.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))  # (..., Dh/2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class EvaAttention(nn.Module):
    """Multi-head self-attention: separate (``subln``) or fused q/k/v, optional rotary, sub-LN."""

    def __init__(self, width: int, heads: int, cfg: EvaClipConfig):
        super().__init__()
        self.heads, self.head_dim, self.subln = heads, width // heads, cfg.subln
        if cfg.subln:
            self.q_proj = nn.Linear(width, width, bias=False)
            self.k_proj = nn.Linear(width, width, bias=False)
            self.v_proj = nn.Linear(width, width, bias=False)
        else:
            self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width)) if cfg.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(width)) if cfg.qkv_bias else None
        self.inner_attn_ln = nn.LayerNorm(width, eps=cfg.norm_eps) if cfg.subln else nn.Identity()
        self.proj = nn.Linear(width, width)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        if self.subln:
            q = F.linear(x, self.q_proj.weight, self.q_bias)
            k = F.linear(x, self.k_proj.weight)
            v = F.linear(x, self.v_proj.weight, self.v_bias)
            return tuple(t.view(b, n, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B', H, N, Dh)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)  # (B', H, N, Dh)
        if rope is not None:  # patch tokens only: the class token (index 0) is not rotated
            cos, sin = (t.to(q.dtype) for t in rope)  # (N - 1, Dh)
            q = torch.cat((q[:, :, :1], q[:, :, 1:] * cos + _rotate_half(q[:, :, 1:]) * sin), dim=2)
            k = torch.cat((k[:, :, :1], k[:, :, 1:] * cos + _rotate_half(k[:, :, 1:]) * sin), dim=2)
        out = attend(q, k, v).transpose(1, 2).reshape(b, n, c)  # (B', N, C)
        return self.proj(self.inner_attn_ln(out))


class EvaSwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))``, every linear with a bias (``ffn_ln`` with ``subln``)."""

    def __init__(self, width: int, hidden: int, cfg: EvaClipConfig):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=cfg.norm_eps) if cfg.subln else nn.Identity()
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaMlp(nn.Module):
    """``fc2(ffn_ln(gelu(fc1 x)))`` (``ffn_ln`` with ``subln``), exact (erf) GELU."""

    def __init__(self, width: int, hidden: int, cfg: EvaClipConfig):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=cfg.norm_eps) if cfg.subln else nn.Identity()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_ln(F.gelu(self.fc1(x))))


class EvaBlock(nn.Module):
    """Pre-norm ``x + f(norm(x))`` or, with ``postnorm``, ``x + norm(f(x))``, for attention then MLP."""

    def __init__(self, width: int, heads: int, cfg: EvaClipConfig):
        super().__init__()
        self.postnorm = cfg.postnorm
        hidden = int(width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.attn = EvaAttention(width, heads, cfg)
        self.norm2 = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.mlp = EvaSwiGLU(width, hidden, cfg) if cfg.naiveswiglu else EvaMlp(width, hidden, cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.postnorm:
            x = x + self.norm1(self.attn(x, rope))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B', g*g, C), row-major


class EvaVisionTransformer(nn.Module):
    """An EVA-CLIP vision tower: ``(B', 3, H, W)`` -> ``(B', V, Dv)`` (see the module docstring)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.kind != "eva_clip":
            raise ConfigError("vision.kind", f"EvaVisionTransformer needs kind='eva_clip', got {cfg.kind!r}")
        eva = cfg.eva or EvaClipConfig()
        self.eva = eva
        self.image_size, self.width, self.heads = cfg.image_size, cfg.width, cfg.heads
        self.grid = cfg.image_size // cfg.patch_size
        self.trained_grid = (eva.trained_image_size or cfg.image_size) // cfg.patch_size
        self.patch_embed = _PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.trained_grid**2, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg.width, cfg.heads, eva) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=eva.norm_eps)  # the released final norm (see post_layernorm)
        self.head = nn.Linear(cfg.width, eva.embed_dim) if eva.embed_dim else None  # CLIP head, never used here
        self.feature_indices = [i if i >= 0 else cfg.layers + 1 + i for i in cfg.feature_layers]
        self.layers_to_run = max(self.feature_indices)
        self.drop_cls_token, self.post_layernorm = cfg.drop_cls_token, cfg.post_layernorm
        self.num_tokens = self.grid**2 + (0 if cfg.drop_cls_token else 1)
        self.out_dim = cfg.width * len(self.feature_indices)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated normal 0.02 for the embeddings and matrices, zero biases, unit norms (EVA's own init)."""
        if self.pos_embed.device.type == "meta":
            return
        for p in (self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        init_linears_and_norms(self)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that never reach the features: blocks past the feature layer, the head, the
        final norm unless ``post_layernorm``."""
        unused = [p for block in self.blocks[self.layers_to_run:] for p in block.parameters()]
        if self.head is not None:
            unused += list(self.head.parameters())
        if not self.post_layernorm:
            unused += list(self.norm.parameters())
        return unused

    def position_embeddings(self) -> torch.Tensor:
        """``pos_embed`` at this tower's grid: (1, 1 + g*g, C), the patch part bicubically resized if needed."""
        if self.grid == self.trained_grid:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = self.trained_grid
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, C, s, s)
        patches = F.interpolate(patches, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, self.grid**2, -1).to(cls.dtype)
        return torch.cat([cls, patches], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B', 3, H, W)`` -> ``(B', V, Dv)``."""
        x = self.patch_embed(pixel_values)  # (B', g*g, C)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embeddings().to(x.dtype)  # (B', 1 + g*g, C)
        rope = None
        if self.eva.rope:
            rope = tuple(t.to(x.device) for t in rope_tables(
                self.width // self.heads, self.grid, self.eva.pt_hw_seq_len, self.eva.intp_freq))
        chosen = {0: x} if 0 in self.feature_indices else {}
        for i, block in enumerate(self.blocks[: self.layers_to_run], start=1):
            x = block(x, rope)
            if i in self.feature_indices:
                chosen[i] = x
        features = [self._select(chosen[i]) for i in self.feature_indices]
        return features[0] if len(features) == 1 else torch.cat(features, dim=-1)

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.drop_cls_token:
            hidden = hidden[:, 1:]
        return self.norm(hidden) if self.post_layernorm else hidden


# ------------------------------------------------------------------------------ configs and files


def eva_vision_config(visual: dict[str, Any], **options: Any) -> VisionConfig:
    """The :class:`VisionConfig` of an EVA-CLIP vision config dict (InfiMM's ``visual``).

    Reads ``image_size``, ``patch_size``, ``width``, ``layers``, ``head_width`` (heads = width /
    head_width) and the :class:`~interleaf.config.EvaClipConfig` fields under their EVA names; keys
    that do not change the features (``xattn``, ``fusedLN``, ``drop_path_rate``, ...) are ignored, and
    any other key with a set value is refused. ``options`` are further ``VisionConfig`` fields
    (``feature_layer``, ``drop_cls_token``, ``post_layernorm``, preprocessing).
    """
    if not isinstance(visual, dict):
        raise ConfigError("visual", f"must be a mapping (EVA-CLIP's vision config), got {type(visual).__name__}")
    known = {"image_size", "patch_size", "width", "layers", "head_width", *_EVA_KEYS}
    refused = sorted(k for k, v in visual.items() if k not in known and k not in _IGNORED_KEYS and v not in
                     (None, False, 0, 0.0))
    if refused:
        raise ConfigError(f"visual.{refused[0]}", f"= {visual[refused[0]]!r} is not supported by interleaf's "
                          "EVA-CLIP tower", "remove it if it does not change the tower's features at inference")
    for key in ("image_size", "patch_size", "width", "layers"):
        if key not in visual:
            raise ConfigError(f"visual.{key}", "is missing from the EVA-CLIP vision config")
    width, head_width = visual["width"], visual.get("head_width", 64)
    if not isinstance(width, int) or not isinstance(head_width, int) or head_width <= 0 or width % head_width:
        raise ConfigError("visual.head_width", f"{head_width!r} does not divide width {width!r}")
    eva = EvaClipConfig(**{k: visual[k] for k in _EVA_KEYS if visual.get(k) is not None})
    data = dict(kind="eva_clip", image_size=visual["image_size"], patch_size=visual["patch_size"], width=width,
                layers=visual["layers"], heads=width // head_width, eva=eva, image_mean=CLIP_MEAN,
                image_std=CLIP_STD, resize="shortest_edge_crop")
    data.update(options)
    return VisionConfig(**data)


def eva_visual_dict(cfg: VisionConfig) -> dict[str, Any]:
    """The EVA-CLIP vision config dict (InfiMM's ``visual`` names) of an ``eva_clip`` :class:`VisionConfig`."""
    eva = cfg.eva or EvaClipConfig()
    out = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
               head_width=cfg.width // cfg.heads)
    out.update({k: getattr(eva, k) for k in _EVA_KEYS if getattr(eva, k) is not None})
    return out


def save_eva_clip(tower: nn.Module, cfg: VisionConfig, path: str | Path) -> Path:
    """Write an EVA-CLIP tower on its own: ``config.json`` (``model_type: eva_clip`` + EVA's vision-config
    names) and ``model.safetensors`` (EVA-CLIP's parameter names). ``tower``: an
    :class:`EvaVisionTransformer` or a :class:`~interleaf.model.vision.VisionTower` holding one."""
    from safetensors.torch import save_file

    tower = getattr(tower, "backbone", tower)
    if not isinstance(tower, EvaVisionTransformer):
        raise ConfigError("vision.kind", f"save_eva_clip needs an EVA-CLIP tower, got {type(tower).__name__}")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": EVA_MODEL_TYPE, **eva_visual_dict(cfg)}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def load_eva_clip(
    path: str | Path, dtype: torch.dtype | None = None, **options: Any
) -> tuple[VisionConfig, EvaVisionTransformer]:
    """Read a directory written by :func:`save_eva_clip` (strictly: a missing or extra weight is an error).

    ``options`` are ``VisionConfig`` fields (``feature_layer``, ``drop_cls_token``, ``post_layernorm``).
    """
    from safetensors.torch import load_file

    directory = Path(path)
    data = dict(read_json(directory / "config.json", "EVA-CLIP tower directory", error=CheckpointError))
    if data.pop("model_type", None) != EVA_MODEL_TYPE:
        raise CheckpointError(f"{str(directory)!r}: config.json's model_type is not {EVA_MODEL_TYPE!r}")
    cfg = eva_vision_config(data, **options)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{str(directory)!r} has no model.safetensors; write the tower with save_eva_clip")
    tower = EvaVisionTransformer(cfg)
    result = tower.load_state_dict(load_file(str(weights)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{str(weights)!r} does not match its config.json: missing {sorted(result.missing_keys)[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]}; is the config the one the tower was saved with?"
        )
    if dtype is not None:
        tower.to(dtype)
    return cfg, tower
