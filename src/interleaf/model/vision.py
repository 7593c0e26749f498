"""Vision towers: images ``(B, N_img, 3, H, W)`` -> patch features ``(B, N_img, V, Dv)``.

Three backbones sit behind one interface, :class:`VisionTower`:

- :class:`BuiltinViT`, a small ViT for training from scratch (``VisionConfig.kind == "builtin"``),
  optionally with a convolutional stem, which learns shapes much faster than a single patchify
  convolution when there is no pretraining.
- :class:`HFVisionAdapter`, a transformers ``CLIPVisionModel`` or ``SiglipVisionModel`` read at a
  chosen hidden layer (``feature_layer``), as LLaVA and OpenFlamingo-style models do.
- :class:`~interleaf.model.eva_clip.EvaVisionTransformer`, an EVA-CLIP tower (EVA02 or EVA-CLIP-4B
  style, InfiMM's), interleaf's own code (``kind == "eva_clip"``).

:func:`load_vision_tower` reads a local transformers directory (a vision model or a full
CLIP / SigLIP model, or an EVA-CLIP tower written by :func:`~interleaf.model.eva_clip.save_eva_clip`)
offline and returns the matching :class:`~interleaf.config.VisionConfig`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from interleaf.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, VisionConfig
from interleaf.errors import CheckpointError, ConfigError, InputError
from interleaf.files import read_json
from interleaf.model.attention import attend
from interleaf.model.eva_clip import EVA_MODEL_TYPE, EvaVisionTransformer, load_eva_clip

__all__ = [
    "BuiltinViT",
    "HFVisionAdapter",
    "VisionTower",
    "build_vision_tower",
    "load_vision_tower",
]

# config.json model_type -> (tower family, is a full two-tower model)
_MODEL_TYPES = {
    "clip_vision_model": ("clip", False),
    "clip": ("clip", True),
    "siglip_vision_model": ("siglip", False),
    "siglip": ("siglip", True),
}


# --------------------------------------------------------------------------------------------
# Built-in ViT
# --------------------------------------------------------------------------------------------


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions (GroupNorm + GELU) down to the patch grid, then a 1x1 to ``width``.

    ``log2(patch_size)`` convolutions reach the same ``image_size / patch_size`` grid as a
    patchify convolution, but see overlapping neighbourhoods, which makes edges and shapes easy
    to learn from scratch ("early convolutions help transformers see better").
    """

    def __init__(self, patch_size: int, width: int, in_channels: int = 3):
        super().__init__()
        steps = int(math.log2(patch_size))
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(steps):
            out = max(16, width // 2 ** (steps - 1 - i))
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(8, out), out),
                nn.GELU(),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, width, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ViTBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        attn = attend(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))  # (B, T, D)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class BuiltinViT(nn.Module):
    """A small ViT for training from scratch: ``(B', 3, H, W)`` -> ``(B', V, width)``.

    Patch embedding (one patchify convolution, or :class:`ConvStem` when ``conv_stem``), learned
    position embeddings, pre-LN blocks using :func:`~interleaf.model.attention.attend`, a final
    LayerNorm. There is no class token: every output token is a patch.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.kind != "builtin":
            raise ConfigError("vision.kind", f"BuiltinViT needs kind='builtin', got {cfg.kind!r}")
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // cfg.patch_size
        self.width = cfg.width
        if cfg.conv_stem:
            self.patch_embed: nn.Module = ConvStem(cfg.patch_size, cfg.width)
        else:
            self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, cfg.width))
        self.blocks = nn.ModuleList(ViTBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.init_weights()

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise for training from scratch (truncated normal 0.02, zero biases)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                if module.kernel_size == (3, 3):  # stem convolutions, followed by GELU
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                else:  # patchify or final 1x1 projection: unit-variance output
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    nn.init.trunc_normal_(module.weight, std=fan_in**-0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)  # (B', D, g, g)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B', V, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# transformers towers
# --------------------------------------------------------------------------------------------


def _hf_config(kind: str, data: dict):
    """A ``CLIPVisionConfig`` / ``SiglipVisionConfig`` from a dict (as ``to_dict()`` writes it)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    data = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "architectures")}
    return cls(**data)


def _hf_model_from_config(kind: str, data: dict) -> nn.Module:
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    return cls(_hf_config(kind, data))


class HFVisionAdapter(nn.Module):
    """Patch features of a transformers CLIP / SigLIP vision tower at one hidden layer.

    ``feature_layer`` indexes ``hidden_states`` as transformers returns them with
    ``output_hidden_states=True`` (entry 0 is the embedding output, entry ``i`` the output of
    layer ``i``; -1 is the last layer, -2 the penultimate, as LLaVA uses); a list of layers gives
    their features concatenated on the channel axis, each with the class token dropped and the
    final LayerNorm applied as configured (SigLIP's ``last_hidden_state`` is ``feature_layer=-1``
    with ``post_layernorm``; CLIP's hidden states are pre-LN).

    The tower is kept whole as the submodule ``tower``, so its state dict is exactly the
    transformers model's (prefixed ``tower.``) and loads strictly from a full checkpoint. Instead
    of truncating the layer list, :meth:`forward` runs the embeddings and only the layers up to
    ``feature_layer``, so layers past it cost no compute. Their parameters stay in memory and get
    no gradient: freeze them (:meth:`unused_parameters`) when the tower is trained under DDP.
    """

    def __init__(
        self,
        cfg: VisionConfig,
        model: nn.Module | None = None,
    ):
        super().__init__()
        if cfg.kind not in ("clip", "siglip"):
            raise ConfigError("vision.kind", f"HFVisionAdapter needs kind 'clip' or 'siglip', got {cfg.kind!r}")
        if model is None:
            model = _hf_model_from_config(cfg.kind, cfg.hf_config)
        if hasattr(model, "vision_model") and not hasattr(model, "embeddings"):
            model = model.vision_model  # a full CLIPModel / SiglipModel: keep its vision part
        for name in ("embeddings", "encoder", "post_layernorm"):
            if not hasattr(model, name):
                raise ConfigError(
                    "vision.kind",
                    f"{type(model).__name__} has no '{name}': expected a transformers CLIPVisionModel or SiglipVisionModel",
                )
        self.kind = cfg.kind
        self.tower = model
        num_layers = len(model.encoder.layers)
        self.feature_indices: list[int] = []  # entries of hidden_states, concatenated in this order
        for layer in cfg.feature_layers:
            index = layer if layer >= 0 else num_layers + 1 + layer
            if not 0 <= index <= num_layers:
                raise ConfigError(
                    "vision.feature_layer",
                    f"{layer} is out of range for a tower with {num_layers} layers",
                    f"use a value in [-{num_layers + 1}, {num_layers}]",
                )
            self.feature_indices.append(index)
        self.layers_to_run = max(self.feature_indices)
        has_cls = cfg.kind == "clip"
        if cfg.drop_cls_token and not has_cls:
            raise ConfigError("vision.drop_cls_token", "a SigLIP tower has no class token to drop", "set it to false")
        self.drop_cls_token = cfg.drop_cls_token
        self.post_layernorm = cfg.post_layernorm
        hf_cfg = model.config
        grid = hf_cfg.image_size // hf_cfg.patch_size
        self.num_tokens = grid * grid + (1 if has_cls and not cfg.drop_cls_token else 0)
        self.out_dim = hf_cfg.hidden_size * len(self.feature_indices)
        self.image_size = hf_cfg.image_size

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that never reach the features (layers past ``feature_layer``, heads, ...)."""
        used = {id(p) for p in self.tower.embeddings.parameters()}
        pre = getattr(self.tower, "pre_layrnorm", None)
        if pre is not None:
            used |= {id(p) for p in pre.parameters()}
        for layer in self.tower.encoder.layers[: self.layers_to_run]:
            used |= {id(p) for p in layer.parameters()}
        if self.post_layernorm:
            used |= {id(p) for p in self.tower.post_layernorm.parameters()}
        return [p for p in self.tower.parameters() if id(p) not in used]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B', 3, H, W)`` -> ``(B', V, Dv)``."""
        hidden = self.tower.embeddings(pixel_values)  # (B', V(+1), D)
        pre = getattr(self.tower, "pre_layrnorm", None)  # CLIP only
        if pre is not None:
            hidden = pre(hidden)
        chosen = {0: hidden} if 0 in self.feature_indices else {}
        for i, layer in enumerate(self.tower.encoder.layers[: self.layers_to_run], start=1):
            hidden = layer(hidden, None)
            if i in self.feature_indices:
                chosen[i] = hidden
        features = [self._select(chosen[i]) for i in self.feature_indices]
        return features[0] if len(features) == 1 else torch.cat(features, dim=-1)  # (B', V, Dv * layers)

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.drop_cls_token:
            hidden = hidden[:, 1:]
        if self.post_layernorm:
            hidden = self.tower.post_layernorm(hidden)
        return hidden


# --------------------------------------------------------------------------------------------
# The uniform interface
# --------------------------------------------------------------------------------------------


class VisionTower(nn.Module):
    """``forward(pixel_values (B, N_img, 3, H, W)) -> (B, N_img, V, Dv)`` for any backbone.

    ``out_dim`` is Dv and ``num_tokens`` is V. Pass ``model`` to wrap an already-loaded
    transformers vision model instead of building one from ``cfg.hf_config``.
    """

    def __init__(self, cfg: VisionConfig, model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "builtin":
            if model is not None:
                raise ConfigError("vision.kind", "a 'builtin' tower is built from the config; do not pass a model")
            self.backbone: BuiltinViT | HFVisionAdapter | EvaVisionTransformer = BuiltinViT(cfg)
            self.out_dim = cfg.width
        elif cfg.kind == "eva_clip":
            if model is not None and not isinstance(model, EvaVisionTransformer):
                raise ConfigError("vision.kind",
                                  f"an 'eva_clip' tower wraps an EvaVisionTransformer, got {type(model).__name__}")
            self.backbone = model if model is not None else EvaVisionTransformer(cfg)
            self.out_dim = self.backbone.out_dim
        else:
            self.backbone = HFVisionAdapter(cfg, model)
            self.out_dim = self.backbone.out_dim
        self.num_tokens = self.backbone.num_tokens
        self.image_size = self.backbone.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check(pixel_values)
        b, n = pixel_values.shape[:2]
        weight = next(self.backbone.parameters())
        flat = pixel_values.flatten(0, 1).to(device=weight.device, dtype=weight.dtype)  # (B*N, 3, H, W)
        features = self.backbone(flat)  # (B*N, V, Dv)
        return features.view(b, n, *features.shape[1:])  # (B, N, V, Dv)

    def _check(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 5:
            raise InputError(
                f"pixel_values must have shape (batch, images, 3, H, W), got {tuple(pixel_values.shape)}"
                " (add an images axis with pixel_values[:, None] for one image per row)"
            )
        if pixel_values.shape[2] != 3:
            raise InputError(
                f"pixel_values must have 3 colour channels (RGB) on axis 2, got {pixel_values.shape[2]}"
                f" in shape {tuple(pixel_values.shape)} (convert images to RGB; the processor does this)"
            )
        h, w = pixel_values.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise InputError(
                f"images must be {self.image_size}x{self.image_size} pixels for this vision tower, got {h}x{w}"
                " (the model's processor resizes and crops images to this size)"
            )
        if not pixel_values.is_floating_point():
            raise InputError(
                f"pixel_values must be floating point (normalised), got {pixel_values.dtype}"
                " (the model's processor converts and normalises images)"
            )


def build_vision_tower(cfg: VisionConfig, model: nn.Module | None = None) -> VisionTower:
    """The :class:`VisionTower` for ``cfg`` (randomly initialised unless ``model`` is given)."""
    return VisionTower(cfg, model)


def _preprocessing(directory: Path, kind: str) -> dict:
    """image_mean / image_std / resize mode from ``preprocessor_config.json``, else family defaults."""
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    out: dict = {
        "image_mean": mean,
        "image_std": std,
        "resize": "shortest_edge_crop" if kind == "clip" else "squash",
    }
    file = directory / "preprocessor_config.json"
    if file.is_file():
        pre = read_json(file, "vision tower directory", error=CheckpointError)
        for key in ("image_mean", "image_std"):
            if pre.get(key) is not None:
                out[key] = tuple(float(x) for x in pre[key])
        if "do_center_crop" in pre or "crop_size" in pre:
            out["resize"] = "shortest_edge_crop" if pre.get("do_center_crop", True) else "squash"
    return out


def load_vision_tower(
    path: str | Path,
    feature_layer: int = -1,
    drop_cls_token: bool = False,
    post_layernorm: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[VisionConfig, VisionTower]:
    """Load a local CLIP / SigLIP directory saved by transformers, offline.

    ``path`` holds a vision model (``CLIPVisionModel.save_pretrained``) or a full ``CLIPModel`` /
    ``SiglipModel``, whose vision part is kept. Returns the :class:`VisionConfig` (``kind``,
    ``hf_config`` = the vision config dict, preprocessing from ``preprocessor_config.json`` when
    present) and the loaded :class:`VisionTower`.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(
            f"vision tower directory {str(directory)!r} does not exist; expected a local directory saved by "
            "transformers (config.json + model.safetensors), e.g. CLIPVisionModel.save_pretrained(dir)"
        )
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(directory)!r} has no config.json; expected a transformers CLIP or SigLIP directory")
    model_type = read_json(config_file, "vision tower directory", error=CheckpointError).get("model_type")
    if model_type == EVA_MODEL_TYPE:
        cfg, eva = load_eva_clip(directory, dtype, feature_layer=feature_layer, drop_cls_token=drop_cls_token,
                                 post_layernorm=post_layernorm)
        return cfg, VisionTower(cfg, eva)
    if model_type not in _MODEL_TYPES:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not a supported vision tower; "
            f"expected one of {sorted(_MODEL_TYPES)} (a CLIP or SigLIP model saved by transformers) or "
            f"{EVA_MODEL_TYPE!r} (an EVA-CLIP tower written by interleaf.model.eva_clip.save_eva_clip)"
        )
    kind, full = _MODEL_TYPES[model_type]
    from transformers import CLIPModel, CLIPVisionModel, SiglipModel, SiglipVisionModel

    classes = {("clip", False): CLIPVisionModel, ("clip", True): CLIPModel}
    classes |= {("siglip", False): SiglipVisionModel, ("siglip", True): SiglipModel}
    cls = classes[(kind, full)]
    try:
        model, info = cls.from_pretrained(
            directory, local_files_only=True, output_loading_info=True, **({"dtype": dtype} if dtype else {})
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the {kind} vision tower from {str(directory)!r}: {e}") from e
    missing = [k for k in info.get("missing_keys", ()) if not full or k.startswith("vision_model.")]
    if missing:
        raise CheckpointError(
            f"{str(directory)!r} lacks weights for the {kind} vision tower: {sorted(missing)[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (is it a complete save_pretrained directory?)"
        )
    vision = model.vision_model if full else model
    hf_config = vision.config.to_dict()
    cfg = VisionConfig(
        kind=kind,
        hf_config=hf_config,
        feature_layer=feature_layer,
        drop_cls_token=drop_cls_token,
        post_layernorm=post_layernorm,
        **_preprocessing(directory, kind),
    )
    return cfg, VisionTower(cfg, vision)
