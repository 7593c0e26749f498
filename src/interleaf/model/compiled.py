"""An optional compiled decoding step: a static KV cache and ``torch.compile`` of the model's forward.

``model.generate(..., compile=True)`` (``--compile`` in ``interleaf generate`` and ``interleaf eval``)
asks transformers' ``generate`` for a static KV cache (preallocated for the prompt and the new tokens,
written in place) and a :class:`~transformers.CompileConfig`: the prefill runs as usual, every
decoding step runs the compiled forward. transformers compiles on accelerators by itself; interleaf
asks it to compile on the CPU too, where ``torch.compile`` needs a C compiler.

The first call compiles (seconds to a minute); later calls with the same batch size and cache length
reuse the compiled step. Greedy outputs are the same tokens as without it. Whether it is faster
depends on the machine and the size (see the README's Performance section).

Both families work: a decoding step's media context (which image each row attends) is computed on
the device; generate tells the forward that its input continues the cached prompt (``decoding``), as a
static cache keeps its length on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CompileConfig

from ..errors import InputError


CACHE_LENGTH_STEP = 64  # static caches are sized in steps of this many tokens


def compile_options(device: torch.device, kwargs: dict[str, Any], prompt_length: int) -> dict[str, Any]:
    """``generate``'s keyword arguments with a static cache and a compiled decoding step added.

    An explicit ``cache_implementation``, ``compile_config`` or ``max_cache_len`` in ``kwargs`` is kept.
    The cache holds the prompt and ``max_new_tokens`` rounded up to a multiple of
    :data:`CACHE_LENGTH_STEP`, so that batches of similar lengths (an evaluation) reuse one compiled
    step. CUDA steps run as CUDA graphs (``reduce-overhead``); elsewhere the default mode.
    """
    if kwargs.get("past_key_values") is not None:
        raise InputError(
            "generate(compile=True) builds its own static KV cache; drop past_key_values, or drop compile=True "
            "to continue a cache you pass"
        )
    if kwargs.get("disable_compile"):
        raise InputError("generate got both compile=True and disable_compile=True; keep one")
    out = dict(kwargs)
    out.setdefault("cache_implementation", "static")
    if out.get("max_new_tokens") is not None and out.get("max_cache_len") is None:
        length = prompt_length + int(out["max_new_tokens"])
        out["max_cache_len"] = -(-length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
    if out.get("compile_config") is None:
        config = CompileConfig(fullgraph=False, mode="reduce-overhead" if device.type == "cuda" else "default")
        config._compile_all_devices = True  # transformers compiles only on accelerators unless asked
        out["compile_config"] = config
    return out


def cached_prefix(past_key_values, decoding: bool) -> bool | torch.Tensor:
    """Whether the input continues a cached prefix: a bool known on the host, or a 0-d bool tensor.

    A dynamic cache knows its length on the host. A static cache keeps it on the device: there
    ``decoding`` (``generate``'s decoding steps say so) answers on the host, and otherwise the
    answer is a tensor, for the caller to use on the device or read once (a prompt, not a step).
    """
    if decoding:
        return True
    if past_key_values is None:
        return False
    length = past_key_values.get_seq_length()
    return length > 0 if torch.is_tensor(length) else bool(length)
