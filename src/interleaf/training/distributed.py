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
the LM's dense weights train (the image path frozen), every trainable parameter gets a gradient in
every step and the search, one graph walk per forward, is skipped. Every freeze policy trains some
of the image path (the connector at least), so a stage's DDP searches unless its model's image path
was frozen by other means.

With several processes, a model built from a preset is built with random weights by the main
process only; the others build it on the meta device (no memory, no random draws) and
:func:`materialise_from_main` gives them the main process's weights, buffers and random-number
state, so every process holds what it would have drawn itself, as with one process.
"""

from __future__ import annotations

from collections import defaultdict

import torch
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


def _to_empty_keeping_ties(model: nn.Module, device: torch.device) -> None:
    """``model.to_empty(device)``, with a parameter shared by several modules still shared after."""
    slots: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                slots[id(p)].append((module, name))
    model.to_empty(device=device)
    for (first, first_name), *others in slots.values():
        for module, name in others:
            setattr(module, name, getattr(first, first_name))


def materialise_from_main(model: nn.Module, state: DistState, fingerprint: dict | None) -> dict:
    """Give every process the main process's model on its own device (collective).

    The main process moves its model to its device; the others, whose model is on the meta device,
    allocate theirs there. Every parameter and buffer (non-persistent ones too), the torch
    random-number state and ``fingerprint`` (of the frozen weights, computed by the main process
    before the move) then come from the main process; returns that fingerprint.
    """
    import torch.distributed as tdist

    if state.is_main:
        model.to(state.device)
    else:
        _to_empty_keeping_ties(model, state.device)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            tdist.broadcast(t.data, src=0)
    shared = [torch.get_rng_state(), fingerprint]
    tdist.broadcast_object_list(shared, src=0, device=state.device if state.device.type == "cuda" else None)
    torch.set_rng_state(shared[0])
    return shared[1]


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
    "DistState", "all_reduce_sum", "barrier", "current_state", "fsdp_units", "gather_objects", "materialise_from_main",
    "needs_unused_parameter_search", "unwrap", "wrap_model",
]
