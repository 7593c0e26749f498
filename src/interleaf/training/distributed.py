"""Process groups and parallel wrappers: DDP or FSDP2 under ``torchrun``, applied outside the model.

``torchrun --nproc_per_node N -m interleaf train CONFIG`` starts N processes; each reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment. The backend is NCCL on GPUs and
gloo on CPU. With one process nothing is wrapped.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each gated cross-attention block, each
decoder layer, the vision tower and the resampler as units, then the root (embeddings, head, final
norm).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistState:
    """Join the ``torchrun`` process group when there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistState(rank=rank, world_size=world, local_rank=local, device=device)


def teardown(state: DistState) -> None:
    if state.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(state: DistState) -> None:
    if state.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, state: DistState) -> torch.Tensor:
    """Sum over processes (in place on a copy); the identity with one process."""
    if not state.enabled:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj, state: DistState) -> list:
    if not state.enabled:
        return [obj]
    out: list = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as one unit each: cross-attention blocks, decoder layers, vision tower, resampler."""
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
    for name in ("vision_tower", "resampler"):
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


__all__ = ["DistState", "all_reduce_sum", "barrier", "fsdp_units", "gather_objects", "setup", "teardown", "unwrap", "wrap_model"]
