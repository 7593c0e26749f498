"""How many bytes a running row's caches take, for the server's admission by memory.

- KV cache, per position of a row: every decoder layer keeps a key and a value of
  ``key_value_heads x head_dim`` elements (grouped-query LMs keep fewer heads than they attend with);
  read from the LM's config (``num_hidden_layers``, ``num_key_value_heads`` or
  ``num_attention_heads``, ``head_dim`` or ``hidden_size / heads``), in the LM's parameter dtype.
- Cross-attention media cache, per image of a row: its latents (``L x Dv``) and, in every gated
  cross-attention block, their projected keys and values (``2 x L x heads x head_dim``). A
  token-insertion model keeps its images in the KV cache, whose positions already count them.
"""

from __future__ import annotations

from ..model.cross_attention import GatedCrossAttentionBlock
from ..model.lm import lm_dims


class CacheSizes:
    """``kv_per_position`` and ``media_per_image``, in bytes, of ``model``."""

    def __init__(self, model):
        text = model.language_model.config
        hidden, heads, _ = lm_dims(text)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        element = next(model.language_model.parameters()).element_size()
        self.kv_per_position = 2 * int(text.num_hidden_layers) * int(kv_heads) * int(head_dim) * element
        self.media_per_image = 0
        blocks = [m for m in model.modules() if isinstance(m, GatedCrossAttentionBlock)]
        if blocks:
            resampler = model.resampler
            latents = resampler.num_latents if resampler is not None else model.vision_tower.num_tokens
            self.media_per_image = latents * model.vision_tower.out_dim * element
            self.media_per_image += sum(2 * latents * b.heads * b.head_dim * element for b in blocks)
