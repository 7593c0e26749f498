"""IDEFICS <-> interleaf: convert transformers ``IdeficsForVisionText2Text`` checkpoints both ways.

``from_idefics(src, dst)`` reads what ``IdeficsForVisionText2Text.save_pretrained`` writes (plus
the tokenizer / processor files when present), offline, and writes an interleaf directory that
:func:`interleaf.load` reads; ``to_idefics(src, dst)`` goes back. The logits are the same to float
rounding (the tests hold them within 1e-5 in float32).

How the architectures correspond
--------------------------------
- Language model: IDEFICS' decoder is LLaMA (RMSNorm, RoPE, SwiGLU, no biases), so it becomes a
  transformers ``LlamaForCausalLM`` with ``num_key_value_heads = num_attention_heads``.
- Vision tower: ``IdeficsVisionTransformer`` is CLIP's vision transformer (class token, patch
  convolution without bias, learned positions, pre-LayerNorm, pre-LN blocks with biases, the
  ``hidden_act`` of its config). IDEFICS feeds ``last_hidden_state``: every token, class token
  included, *before* ``post_layernorm``. That is ``VisionConfig(kind="clip", feature_layer=-1,
  drop_cls_token=False, post_layernorm=False)``; the weights keep their names.
- Perceiver: the same math as :class:`~interleaf.model.resampler.PerceiverResampler` with
  ``activation="relu"`` and ``ff_mult=4``; keys by :func:`idefics_perceiver_key_map`.
- Gated cross-attention: IDEFICS runs ``gated_cross_attn_layers[j]`` before decoder layer
  ``j * cross_layer_interval`` (``idx % interval == 0``; it has ``num_hidden_layers // interval``
  blocks), so ``cross_attention.layers`` lists those indices. RMSNorm, optional per-head RMSNorm
  on q and k, no RoPE, a SwiGLU MLP of the LM's size, tanh gates (``alpha_cross_attn`` /
  ``alpha_dense``, float -> ``gate_shape="scalar"``, vector -> ``"vector"``), and the MLP acts on
  every token (``ffn_without_image=True``).
- Decoupled vocabulary: ids >= ``vocab_size`` use ``additional_embedding`` and the head's
  ``additional_fc``; ours are ``embed_tokens.extra`` / ``lm_head.extra`` with ``extra_start =
  vocab_size``.

Modules: :mod:`.keys` (where IDEFICS puts its blocks and the key table, both directions),
:mod:`.importer` (IDEFICS -> interleaf: the config translation and :func:`from_idefics`),
:mod:`.exporter` (interleaf -> IDEFICS: the architecture check, the ``IdeficsConfig`` and
:func:`to_idefics`).
"""

from .exporter import interleaf_to_idefics_config, to_idefics
from .importer import from_idefics, idefics_to_interleaf_config
from .keys import idefics_key_map

__all__ = [
    "from_idefics",
    "idefics_key_map",
    "idefics_to_interleaf_config",
    "interleaf_to_idefics_config",
    "to_idefics",
]
