"""Parallel wrappers for training: DDP or FSDP2, applied outside the model.

The process group itself (``torchrun`` environment, gloo on CPU / NCCL on GPUs, teardown, failure
handling) belongs to :mod:`interleaf.distributed`; its state and collectives are re-exported here
for the training modules. With one process nothing is wrapped.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each gated cross-attention block, each
decoder layer, the vision tower and the resampler (token insertion: the projector) as units, then
the root (embeddings, head, final norm).
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

    # Image-less batches skip cross-attention (and its parameters): allow unused parameters.
    return DDP(
        model, device_ids=[state.device.index] if state.device.type == "cuda" else None, find_unused_parameters=True
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = [
    "DistState", "all_reduce_sum", "barrier", "current_state", "fsdp_units", "gather_objects", "unwrap", "wrap_model",
]
