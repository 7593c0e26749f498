"""Decoupled input embedding and output head for the tokens interleaf adds to an LM.

The LM's base vocabulary (its embedding matrix and, if untied, its output matrix) stays frozen;
the added tokens (``<image>``, ``<|endofchunk|>``, ...) get a small table of their own that trains.
Ids in ``[extra_start, extra_start + num_extra)`` go to the small table::

    ids ──► base rows (frozen, shared with the LM)  ─┐
        └─► extra rows (trainable)  for added ids ───┴─► (B, T, D)

    hidden (B, T, D) ──► base head (V_base logits) ──► overwrite / append columns
                     └─► extra head (num_extra logits) ─┘──► (B, T, max(V_base, extra_end))

The base weights are the LM's own ``nn.Parameter`` objects (``weight``), so a tied LM stays tied
and a checkpoint of the base LM loads into them unchanged.

An added input row that is never read (token insertion writes the image's embeddings over every
``<image>`` position) can be frozen on its own (:meth:`DecoupledEmbedding.freeze_rows`): it gets no
gradient, and when every added row is frozen the table stops being a trainable parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecoupledEmbedding(nn.Module):
    """An ``nn.Embedding`` whose last ``num_extra`` ids come from a separate trainable table."""

    def __init__(self, base: nn.Embedding, extra_start: int, num_extra: int):
        super().__init__()
        self.weight = base.weight  # (V_base, D), the LM's parameter
        self.padding_idx = base.padding_idx
        # Some LMs (Gemma) scale inside the embedding module: keep that scale as a plain float.
        self.scale: float | None = None
        if type(base).forward is not nn.Embedding.forward and hasattr(base, "embed_scale"):
            scale = getattr(base, "scalar_embed_scale", base.embed_scale)
            self.scale = float(scale) if not torch.is_tensor(scale) or scale.device.type != "meta" else None
            if self.scale is None:
                raise ValueError("cannot read the embedding scale of an LM built on the meta device")
        self.extra_start = extra_start
        self.num_extra = num_extra
        d = base.weight.shape[1]
        self.extra = nn.Parameter(torch.empty(num_extra, d, dtype=base.weight.dtype, device=base.weight.device))
        self.frozen_rows: tuple[int, ...] = ()  # rows of ``extra`` that get no gradient (see freeze_rows)
        with torch.no_grad():
            if self.extra.device.type != "meta":
                nn.init.normal_(self.extra, std=float(base.weight.float().std()) if base.weight.numel() > 1 else 0.02)

    @property
    def num_embeddings(self) -> int:
        return max(self.weight.shape[0], self.extra_start + self.num_extra)

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def freeze_rows(self, rows: tuple[int, ...] | list[int]) -> None:
        """Freeze the added rows ``rows`` (0-based within ``extra``) and let the others train.

        The frozen rows take no gradient (they are read detached); with every row frozen,
        ``extra`` itself stops requiring a gradient. ``()`` leaves ``extra``'s ``requires_grad`` as it is.
        """
        self.frozen_rows = tuple(sorted({int(r) for r in rows if 0 <= int(r) < self.num_extra}))
        if self.num_extra and len(self.frozen_rows) == self.num_extra:
            self.extra.requires_grad_(False)

    def num_frozen_elements(self) -> int:
        """Elements of ``extra`` frozen row by row while ``extra`` itself requires a gradient."""
        return len(self.frozen_rows) * self.extra.shape[1] if self.extra.requires_grad else 0

    def _extra_table(self) -> torch.Tensor:
        if not self.frozen_rows or not self.extra.requires_grad:
            return self.extra
        frozen = torch.zeros(self.num_extra, 1, dtype=torch.bool, device=self.extra.device)
        frozen[list(self.frozen_rows)] = True
        return torch.where(frozen, self.extra.detach(), self.extra)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_extra = (input_ids >= self.extra_start) & (input_ids < self.extra_start + self.num_extra)
        base_ids = input_ids.masked_fill(is_extra, 0)
        out = F.embedding(base_ids, self.weight, self.padding_idx)  # (B, T, D)
        if self.num_extra:
            extra_ids = (input_ids - self.extra_start).clamp(0, self.num_extra - 1)
            out = torch.where(is_extra[..., None], F.embedding(extra_ids, self._extra_table()).to(out.dtype), out)
        if self.scale is not None:
            out = out * torch.tensor(self.scale, dtype=self.weight.dtype, device=out.device)
        return out

    def extra_repr(self) -> str:
        return f"base={tuple(self.weight.shape)}, extra_start={self.extra_start}, num_extra={self.num_extra}"


class DecoupledHead(nn.Module):
    """An output ``nn.Linear`` with ``num_extra`` trainable rows for the added ids.

    By default the extra logits go after (or over) the base ones and the base head keeps its own
    bias, if any. ``bias=True`` is xGen-MM's ``DecoupledLinear``: the base rows get a bias
    (``bias``, created when the LM's head has none), the extra rows one of their own
    (``extra_bias``), and the logits end after the added rows::

        logits = cat((h W^T + b)[..., :extra_start], h A^T + a)      (B, T, extra_start + num_extra)
    """

    def __init__(self, base: nn.Linear, extra_start: int, num_extra: int, bias: bool = False):
        super().__init__()
        self.weight = base.weight  # (V_base, D), the LM's parameter (or the tied embedding)
        self.bias = base.bias
        self.extra_start = extra_start
        self.num_extra = num_extra
        self.in_features = base.weight.shape[1]
        self.ends_at_extra = bias
        device, dtype = base.weight.device, base.weight.dtype
        self.extra = nn.Parameter(torch.zeros(num_extra, self.in_features, dtype=dtype, device=device))
        self.extra_bias = nn.Parameter(torch.zeros(num_extra, dtype=dtype, device=device)) if bias else None
        if bias and self.bias is None:
            self.bias = nn.Parameter(torch.zeros(base.weight.shape[0], dtype=dtype, device=device))
        if self.extra.device.type != "meta":
            with torch.no_grad():
                nn.init.normal_(self.extra, std=0.02)

    @property
    def out_features(self) -> int:
        if self.ends_at_extra:
            return self.extra_start + self.num_extra
        return max(self.weight.shape[0], self.extra_start + self.num_extra)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)  # (B, T, V_base)
        if not self.num_extra:
            return logits
        extra_bias = self.extra_bias.to(hidden.dtype) if self.extra_bias is not None else None
        extra = F.linear(hidden, self.extra.to(hidden.dtype), extra_bias)  # (B, T, num_extra)
        if self.ends_at_extra:
            return torch.cat([logits[..., : self.extra_start], extra.to(logits.dtype)], dim=-1)
        end = self.extra_start + self.num_extra
        v_base = logits.shape[-1]
        if self.extra_start == v_base:
            return torch.cat([logits, extra.to(logits.dtype)], dim=-1)
        if end > v_base:
            logits = F.pad(logits, (0, end - v_base))
        return torch.cat(
            [logits[..., : self.extra_start], extra.to(logits.dtype), logits[..., end:]], dim=-1
        )

    def extra_repr(self) -> str:
        return (f"base={tuple(self.weight.shape)}, extra_start={self.extra_start}, num_extra={self.num_extra}"
                + (", bias=True (logits end after the added rows)" if self.ends_at_extra else ""))

    def full_weight(self) -> torch.Tensor:
        """The ``(out_features, D)`` matrix whose product with the hidden states gives :meth:`forward`'s
        logits (with :meth:`full_bias`): the base rows, the added rows in their ids' places, zero rows for
        ids past the base head that no added row covers. Differentiable in ``weight`` and ``extra``."""
        w, extra = self.weight, self.extra.to(self.weight.dtype)
        if self.ends_at_extra:
            return torch.cat([w[: self.extra_start], extra], dim=0)
        end = self.extra_start + self.num_extra
        if end > w.shape[0]:
            w = F.pad(w, (0, 0, 0, end - w.shape[0]))
        return torch.cat([w[: self.extra_start], extra, w[end:]], dim=0)

    def full_bias(self) -> torch.Tensor | None:
        """The bias matching :meth:`full_weight` (``None`` when neither part has one)."""
        if self.bias is None and self.extra_bias is None:
            return None
        dtype, device = self.weight.dtype, self.weight.device
        b = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0], dtype=dtype, device=device)
        extra = (self.extra_bias.to(b.dtype) if self.extra_bias is not None
                 else torch.zeros(self.num_extra, dtype=b.dtype, device=device))
        if self.ends_at_extra:
            return torch.cat([b[: self.extra_start], extra])
        end = self.extra_start + self.num_extra
        if end > b.shape[0]:
            b = F.pad(b, (0, end - b.shape[0]))
        return torch.cat([b[: self.extra_start], extra, b[end:]])


class FullVocabularyHead(nn.Module):
    """The LM's output head seen as one linear layer over the whole vocabulary, added tokens included.

    What :meth:`InterleafForConditionalGeneration.get_output_embeddings` returns when the LM's head is a
    :class:`DecoupledHead`: ``weight`` (``(V, D)``) and ``bias`` are :meth:`DecoupledHead.full_weight` and
    :meth:`DecoupledHead.full_bias`, computed on each read from the trainable parameters (gradients reach
    the base rows and the added rows), so code that projects hidden states with the head's ``weight``
    itself (TRL's chunked loss) scores every token id. It owns no parameter and holds the LM without
    registering it, so the checkpoint's keys and the parameter list are unchanged; ``forward`` and the
    attributes a decoupled head has (``extra``, ``extra_start``, ``num_extra``, ...) are the head's own.
    The head is looked up on every use, so a head replaced later (PEFT, FSDP) is the one read.
    """

    _DELEGATED = ("extra", "extra_bias", "extra_start", "num_extra", "ends_at_extra", "in_features")

    def __init__(self, language_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_language_model", language_model)  # not a submodule: no second copy of its keys

    @property
    def head(self) -> nn.Module:
        return self._language_model.get_output_embeddings()

    @property
    def weight(self) -> torch.Tensor:
        head = self.head
        return head.full_weight() if isinstance(head, DecoupledHead) else head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        head = self.head
        return head.full_bias() if isinstance(head, DecoupledHead) else getattr(head, "bias", None)

    @property
    def out_features(self) -> int:
        return self.head.out_features

    def __getattr__(self, name: str):
        if name in FullVocabularyHead._DELEGATED:
            return getattr(self.head, name)
        return super().__getattr__(name)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)
