"""The running batch of the continuous-batching server: the rows being generated, with their caches.

Rows join and leave between decoding steps without anyone's prefix being recomputed::

    newcomers (R rows, prompts T_r) ──► left-padded ids, mask (R, T) ──► prefill: one forward with
      their images (either family) and a fresh KV cache ──► logits of each row's first token
    running (B rows, cache width W, each row's length l_b <= W: left padding before it)
      join:  both caches left-padded with zeros to max(W, T), concatenated on the batch axis;
             the cross-attention media caches padded on the image axis and concatenated too
      step:  the last token of every row (B, 1), a mask of ones over each row's last l_b + 1
             positions ──► logits (B, V); every row's length grows by one
      keep:  the rows still running selected from every cache, and the columns no row needs any
             longer (left padding of rows that left) cut away

Each row's positions count its own tokens only (the model derives them from the attention mask),
so a left-padded row computes what it would alone: masked positions add exactly zero to attention.
A token-insertion model's images live in the KV cache after the prefill, so only the
cross-attention family keeps a media cache (:class:`~interleaf.model.cross_attention.MediaCache`:
latents, images per row, each block's projected keys and values) beside the KV cache.

Joining needs every cache layer to be a growing tensor: full attention, or a sliding window (which
keeps each row's last positions: rows end on the same column, so the window's columns are each row's
own last tokens, as alone). A model whose LM keeps another kind (quantised, recurrent state) runs
newcomers only once the running rows have finished (:attr:`RunningBatch.joinable`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..model.cross_attention import CrossAttentionDecoderLayer, MediaCache
from .rows import Row


def batch_images(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The rows' images in a layout ``model.prepare_media`` takes: ``(pixels, image_sizes)``, or None
    when no row has an image. A job with ``n`` choices gives its images to each of its rows.

    - One view per image: pixels ``(R, N_max, 3, S, S)``, row r's images first, then zeros; no sizes.
    - Any resolution (the jobs carry ``image_sizes``): pixels ``(K, V_max, 3, S, S)``, the K images
      of all rows in reading order (row by row), each image's views zero-padded to the most any
      image of the batch has, and ``image_sizes`` ``(K, 2)``: the layout LLaVA-NeXT and xGen-MM's
      any-resolution path both read, whatever mix of image counts and sizes the rows hold.
    """
    given = [(r.job.pixel_values, r.job.image_sizes) for r in rows]
    held = [(p, s) for p, s in given if p is not None and p.shape[0]]
    if not held:
        return None
    tiled = [s is not None for _, s in held]
    if any(tiled) != all(tiled):
        raise ValueError("a batch mixes images with and without image_sizes; one model's processor gives one layout")
    if not all(tiled):  # (R, N_max, 3, S, S): each row's images, zero-padded on the image axis
        empty = held[0][0][:0]
        per_row = [p if p is not None else empty for p, _ in given]
        return pad_sequence(per_row, batch_first=True).to(torch.float32), None
    images = [image for p, _ in held for image in p]  # each (V, 3, S, S), the job's own padding kept
    batch = pad_sequence(images, batch_first=True).to(torch.float32)  # (K, V_max, 3, S, S)
    return batch, torch.cat([torch.as_tensor(s).reshape(-1, 2) for _, s in held])  # (K, 2)


class RunningBatch:
    """Rows in flight: ``cache`` (KV, width W, left-padded), each row's ``lengths`` (its positions in the
    cache), ``last`` (B,) the token each row feeds next, and ``media`` (cross-attention only)."""

    def __init__(self, rows: list[Row], cache: DynamicCache, lengths: list[int], media: MediaCache | None):
        self.rows = rows
        self.cache = cache
        self.lengths = lengths
        self.media = media
        self.last: torch.Tensor | None = None  # (B,) set once the rows' tokens are chosen

    # -- making one --
    @classmethod
    def prefill(cls, model, rows: list[Row], pad_id: int) -> tuple["RunningBatch", torch.Tensor]:
        """Run the rows' prompts (with their images) as one left-padded batch: the batch, and the logits
        of each row's first new token (R, V)."""
        device = model.device
        prompts = [r.job.input_ids for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        media, inputs = None, {}
        images = batch_images(rows)
        if images is not None:
            pixels, sizes = images
            extra = {} if sizes is None else {"image_sizes": sizes}
            media = model.prepare_media(ids, pixels.to(device), mask, **extra)
        lengths = [len(p) for p in prompts]
        if model.config.fusion == "token_insertion":
            if media is not None:
                inputs["image_embeds"] = media.image_embeds
                if media.grown_ids is not None:  # replace placement: the model runs the grown prompt
                    ids, mask = media.grown_ids.to(device), media.grown_mask.to(device)
                    lengths = mask.sum(-1).tolist()
            media = None  # the images are in the KV cache from here on
        elif media is not None:
            inputs["media_cache"] = media
        cache = DynamicCache(config=model.language_model.config)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1,
                    **inputs)
        return cls(rows, out.past_key_values, lengths, media), out.logits[:, -1]

    # -- the rows' caches --
    @property
    def width(self) -> int:
        return self.cache.get_seq_length()

    @property
    def joinable(self) -> bool:
        """Whether other rows can join: every cache layer is a growing tensor (full attention, or a sliding
        window that does not record its past)."""
        return all(_layer_kind(layer) is not None for layer in self.cache.layers)

    def cache_bytes(self) -> int:
        """Bytes held by the KV and media caches."""
        total = sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
                    if t is not None)
        if self.media is not None:
            total += self.media.latents.numel() * self.media.latents.element_size()
            total += sum(t.numel() * t.element_size() for kv in self.media.kv.values() for t in kv)
        return total

    def step(self, model) -> torch.Tensor:
        """Feed each row's ``last`` token: the logits of the next one (B, V); every row grows by one. ``model`` is
        the model, or the model compiled (``torch.compile``, the batcher's ``compile``)."""
        width = self.width
        lengths = torch.tensor(self.lengths, device=self.last.device)
        mask = (torch.arange(width + 1, device=self.last.device)[None, :] >= width - lengths[:, None]).long()
        inputs = {} if self.media is None else {"media_cache": self.media}
        out = model(input_ids=self.last[:, None], attention_mask=mask, past_key_values=self.cache, use_cache=True,
                    decoding=True, **inputs)
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows ``indices`` (in that order), and cut the columns none of them needs."""
        index = torch.tensor(indices, dtype=torch.long, device=self.last.device)
        self.rows = [self.rows[i] for i in indices]
        self.lengths = [self.lengths[i] for i in indices]
        self.last = self.last[index]
        self.cache.batch_select_indices(index)
        width = max(self.lengths)
        if width < self.width and self.joinable:  # (other cache kinds keep their own bookkeeping of positions)
            for layer in self.cache.layers:
                _set_layer(layer, layer.keys, layer.values, width)
        if self.media is not None:
            self.media = self.media.select(index)

    def join(self, other: "RunningBatch", model) -> None:
        """Add ``other``'s rows after this batch's: caches left-padded to one width and concatenated."""
        width = max(self.width, other.width)
        media = join_media(self.media, len(self.rows), other.media, len(other.rows), model)
        joined = []
        for a, b in zip(self.cache.layers, other.cache.layers):
            stored = _stored_width(a, width)
            joined.append(tuple(torch.cat([_left_pad(mine, stored), _left_pad(theirs, stored)])
                                for mine, theirs in ((a.keys, b.keys), (a.values, b.values))))
        for layer, (keys, values) in zip(self.cache.layers, joined):  # nothing changes until all is computed
            _set_layer(layer, keys, values, width)
        self.media = media
        self.rows += other.rows
        self.lengths += other.lengths
        self.last = torch.cat([self.last, other.last])


def _layer_kind(layer) -> str | None:
    """"full" (keeps every position), "sliding" (keeps the last ``sliding_window - 1``), or None for a cache
    layer rows cannot join (a recording sliding window, a quantised, indexed or recurrent state)."""
    if type(layer) is DynamicLayer:
        return "full"
    if type(layer) is DynamicSlidingWindowLayer and not layer.record_past:
        return "sliding"
    return None


def _stored_width(layer, width: int) -> int:
    """How many positions ``layer`` stores for a batch ``width`` positions wide. Rows are aligned on their
    last position (left padding), so a sliding window's last positions are every row's own last ones."""
    return min(width, layer.sliding_window - 1) if _layer_kind(layer) == "sliding" else width


def _set_layer(layer, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
    """Give ``layer`` the keys and values of a batch ``width`` positions wide (the last stored ones kept)."""
    stored = _stored_width(layer, width)
    layer.keys, layer.values = keys[..., keys.shape[-2] - stored:, :], values[..., values.shape[-2] - stored:, :]
    if _layer_kind(layer) == "sliding":
        layer.cumulative_length = width


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D), zeros before."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0)) if t.shape[-2] < width else t


def _pad_images(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zeros appended on ``dim`` up to ``size``."""
    if t.shape[dim] >= size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]
    return F.pad(t, pad)


def join_media(a: MediaCache | None, rows_a: int, b: MediaCache | None, rows_b: int, model) -> MediaCache | None:
    """One cross-attention media cache for two groups of rows (a's first): latents and every block's keys
    and values zero-padded to the most images either holds (a row reads only its own images, by its
    image count); a group without images gets zero images. None when neither has images."""
    if a is None and b is None:
        return None
    blocks = {m.block_index: m.cross_attention for m in model.modules() if isinstance(m, CrossAttentionDecoderLayer)}
    like = a if a is not None else b
    a = a if a is not None else _no_images(like, rows_a)
    b = b if b is not None else _no_images(like, rows_b)
    images = max(a.latents.shape[1], b.latents.shape[1])
    latents = torch.cat([_pad_images(a.latents, 1, images), _pad_images(b.latents, 1, images)])
    kv = {}
    per_image = like.latents_per_image
    for index in sorted(set(a.kv) | set(b.kv)):
        sides = [m.kv.get(index) or _project(blocks[index], m.latents.to(latents.device)) for m in (a, b)]
        kv[index] = tuple(torch.cat([_pad_images(side[j], 2, images * per_image) for side in sides]) for j in (0, 1))
    return MediaCache(latents=latents, num_images=torch.cat([a.num_images, b.num_images.to(a.num_images.device)]),
                      kv=kv)


def _project(block, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's keys and values over ``latents`` (B, N, L, Dv); empty ones for rows without images."""
    if latents.shape[1]:
        return block.project_media(latents)
    rows, dtype = latents.shape[0], block.k_proj.weight.dtype
    empty = torch.zeros(rows, block.heads, 0, block.head_dim, dtype=dtype, device=latents.device)
    return empty, empty


def _no_images(like: MediaCache, rows: int) -> MediaCache:
    latents = like.latents.new_zeros((rows, 0, *like.latents.shape[2:]))
    return MediaCache(latents=latents, num_images=like.num_images.new_zeros(rows))
