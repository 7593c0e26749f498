"""Parallel wrappers for training: DDP or FSDP2, applied outside the model.

The process group itself (``torchrun`` environment, gloo on CPU / NCCL on GPUs, teardown, failure
handling) belongs to :mod:`interleaf.distributed`; its state and collectives are re-exported here
for the training modules. With one process nothing is wrapped.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each gated cross-attention block, each
decoder layer, the vision tower and the resampler (token insertion: the projector) as units, then
the root (embeddings, head, final norm).

DDP searches the autograd graph for parameters that got no gradient (``find_unused_parameters``)
only when some trainable parameter can miss one (:func:`needs_unused_parameter_search`): the
image path (vision tower, resampler or projector, cross-attention blocks) does not run for a
micro-batch without images, and an LM with routed experts leaves experts without tokens. When only
the LM's dense weights train (for instance LoRA adapters on the LM with the rest frozen), every
trainable parameter gets a gradient in every step and the search, one graph walk per forward, is
skipped.
"""

from __future__ import annotations

from torch import nn

from ..distributed import DistState, all_reduce_sum, barrier, current_state, gather_objects


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as one unit each: cross-attention blocks, decoder layers, vision tower,
    resampler or projector."""
    from ..model.cross_attention import CrossAttentionDecoderLayer
    from ..model.lm import find_decoder_layers

    lm = model.language_model
    _, layers = find_decoder_layers(lm, lm.config.num_hidden_layers)
    units: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, CrossAttentionDecoderLayer):  # the block and the original layer: one unit each
            units += [layer.cross_attention, layer.decoder_layer]
        else:
            units.append(layer)
    for name in ("vision_tower", "resampler", "projector"):
        module = getattr(model, name, None)
        if module is not None and any(True for _ in module.parameters()):
            units.append(module)
    return units


def _routed_experts(lm: nn.Module) -> bool:
    """The LM routes tokens to some of several experts (Mixtral, Qwen-MoE, ...)."""
    cfg = getattr(lm, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg  # a composite config's text part, else the config
    return any((getattr(cfg, key, None) or 0) > 1 for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def needs_unused_parameter_search(model: nn.Module) -> bool:
    """Whether some trainable parameter of ``model`` can get no gradient in a step: one on the image
    path (everything outside the LM, and the cross-attention blocks inside it), which a micro-batch
    without images skips, or one of an LM with routed experts."""
    from ..model.cross_attention import GatedCrossAttentionBlock

    lm = model.language_model
    skippable = {id(p) for m in lm.modules() if isinstance(m, GatedCrossAttentionBlock) for p in m.parameters()}
    always = {id(p) for p in lm.parameters()} - skippable
    if _routed_experts(lm):
        always = set()
    return any(p.requires_grad and id(p) not in always for p in model.parameters())


def wrap_model(model: nn.Module, strategy: str, state: DistState) -> nn.Module:
    """Wrap for DDP or shard with FSDP2 in place; returns the module to call."""
    if not state.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in fsdp_units(model):
            fully_shard(unit)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        model, device_ids=[state.device.index] if state.device.type == "cuda" else None,
        find_unused_parameters=needs_unused_parameter_search(model),
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = [
    "DistState", "all_reduce_sum", "barrier", "current_state", "fsdp_units", "gather_objects", "needs_unused_parameter_search",
    "unwrap", "wrap_model",
]
