"""Attach cross-attention to any transformers causal LM, by composition.

The decoder layers are found structurally (the ``nn.ModuleList`` whose length is the LM's number
of hidden layers), never by class name; chosen entries are replaced by
:class:`CrossAttentionDecoderLayer`, which runs a gated cross-attention block and then the
original layer with its arguments untouched. The LM class is never rewritten, so ``device_map``,
quantised loading and every LM family's own forward keep working.
"""

from __future__ import annotations

from torch import nn

from ..config import CrossAttentionConfig
from ..errors import ConfigError
from .cross_attention import CrossAttentionDecoderLayer, GatedCrossAttentionBlock
from .embeddings import DecoupledEmbedding, DecoupledHead


def find_decoder_layers(lm: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The LM's list of decoder layers: the ``ModuleList`` of length ``num_layers`` holding the most parameters."""
    candidates = [
        (name, module)
        for name, module in lm.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if not candidates:
        raise ConfigError(
            "text_config",
            f"found no list of {num_layers} decoder layers in {type(lm).__name__}",
            "interleaf needs a decoder-only causal LM whose layers sit in one nn.ModuleList",
        )
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def lm_dims(text_config) -> tuple[int, int, int | None]:
    """(hidden size, attention heads, feed-forward size) of an LM config, across naming conventions."""
    hidden = getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None)
    heads = getattr(text_config, "num_attention_heads", None) or getattr(text_config, "n_head", None)
    ffn = (
        getattr(text_config, "intermediate_size", None)
        or getattr(text_config, "ffn_dim", None)
        or getattr(text_config, "n_inner", None)
    )
    if not hidden or not heads:
        raise ConfigError("text_config", "cannot read the LM's hidden size and number of attention heads")
    return int(hidden), int(heads), ffn


def attach_cross_attention(
    lm: nn.Module, cfg: CrossAttentionConfig, media_dim: int
) -> list[GatedCrossAttentionBlock]:
    """Put a gated cross-attention block in front of each chosen decoder layer; returns the blocks."""
    text_config = lm.config
    num_layers = text_config.num_hidden_layers
    _, layers = find_decoder_layers(lm, num_layers)
    hidden, heads, ffn = lm_dims(text_config)
    blocks = []
    for block_index, layer_index in enumerate(cfg.layer_indices(num_layers)):
        original = layers[layer_index]
        if isinstance(original, CrossAttentionDecoderLayer):
            raise ConfigError("cross_attention", f"decoder layer {layer_index} already has cross-attention")
        block = GatedCrossAttentionBlock(cfg, hidden, media_dim, heads, ffn)
        ref = next(original.parameters(), None)
        if ref is not None:
            block.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        layers[layer_index] = CrossAttentionDecoderLayer(block, original, block_index)
        blocks.append(block)
    return blocks


def decouple_new_tokens(lm: nn.Module, extra_start: int, num_extra: int, head_bias: bool = False) -> None:
    """Give ids >= ``extra_start`` their own trainable embedding and output rows (``head_bias``: xGen-MM's
    biased head whose logits end after the added rows, see :class:`DecoupledHead`)."""
    emb = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ConfigError("text_config", f"the LM's input embedding is a {type(emb).__name__}, not an nn.Embedding")
    vocab = emb.weight.shape[0]
    if extra_start > vocab:
        raise ConfigError(
            "tokens.extra_start",
            f"the tokenizer has {extra_start} tokens but the LM's embedding only {vocab} rows",
            "use the tokenizer that belongs to this LM",
        )
    lm.set_input_embeddings(DecoupledEmbedding(emb, extra_start, num_extra))
    if head is not None:
        if not isinstance(head, nn.Linear):
            raise ConfigError("text_config", f"the LM's output head is a {type(head).__name__}, not an nn.Linear")
        lm.set_output_embeddings(DecoupledHead(head, extra_start, num_extra, bias=head_bias))
