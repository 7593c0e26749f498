"""interleaf on a GPU: training MFU, decoding against the memory-bandwidth floor, generate vs IDEFICS.

    python benchmarks/gpu.py [--train 1b,9b] [--decode 9b] [--generate 1b] [--results [DIR]]
    torchrun --nproc-per-node 8 benchmarks/gpu.py --train 9b          # FSDP2 over 8 GPUs
    python benchmarks/gpu.py --dry-run                                 # CPU, tiny shapes: the layout

Random weights in the shapes of ``SHAPES`` (``9b``: the ``idefics-9b`` preset, LLaMA-7B + CLIP
ViT-H/14 + perceiver + cross-attention before every 4th layer; ``1b``: LLaMA 2048 wide x 16
layers + CLIP ViT-B/16, the same layout, about 1.2 B parameters; ``dry``: a few hundred thousand).

- train: bf16 weights, the IDEFICS freeze (perceiver, cross-attention and added token rows train),
  FSDP2 (``fully_shard`` on each decoder layer, cross-attention block, the tower and the
  perceiver, then the root) and activation checkpointing as the trainer applies it: the LM's own,
  on each decoder layer (the cross-attention blocks keep their activations: they project the media
  keys and values into a per-call cache on first use, which a recomputation would not repeat,
  so a checkpoint around a block fails its saved-tensor check); AdamW.
  Model FLOPs per step are counted once by ``torch.utils.flop_counter.FlopCounterMode`` on one
  row before sharding and checkpointing (forward + backward, no recomputation, matrix products
  and attention), times the rows per GPU, so
  MFU = FLOPs per step per GPU / step time / the GPU's dense bf16 peak (``PEAKS`` or --peak-tflops).
- decode: batch 1, one image, greedy and length forced; decoding rate = (T - 1) / (t(T) - t(1)).
  The floor: the bytes of the weights one decoding step reads (the LM without its input
  embedding, the cross-attention blocks; not the tower or the perceiver, whose output is cached)
  over the GPU's memory bandwidth (``PEAKS`` or --bandwidth-gbs).
- generate: interleaf vs transformers' ``IdeficsForVisionText2Text`` with the same weights (through
  ``from_idefics``), batch 8, 4 images per row, bf16, ``--new-tokens`` tokens.

Meant for a lent GPU machine, never run by the tests (they run ``--dry-run``). One process by
default (FSDP2 over a group of one); under ``torchrun`` every rank trains its share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import Row  # noqa: E402
from vs_transformers import build_idefics, generate, inputs_for  # noqa: E402

import interleaf  # noqa: E402
from interleaf.model.modeling import causal_lm_loss  # noqa: E402
from interleaf.presets.seeds import CLIP_VIT_H14, IDEFICS_RESAMPLER, LLAMA_7B  # noqa: E402

# dense bf16 peak (TFLOP/s, without sparsity) and memory bandwidth (GB/s), by a word of the device name
PEAKS = {"h200": (989.0, 4800.0), "h100": (989.0, 3350.0), "a100": (312.0, 2039.0), "l40s": (362.0, 864.0),
         "a10": (125.0, 600.0), "l4": (121.0, 300.0)}


def _xattn(text: dict) -> dict:
    return dict(layers=list(range(0, text["num_hidden_layers"], 4)), heads=text["num_attention_heads"],
                head_dim=text["hidden_size"] // text["num_attention_heads"], ffn_dim=text["intermediate_size"])


LLAMA_1B = {**LLAMA_7B, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16,
            "num_attention_heads": 16, "num_key_value_heads": 16}
LLAMA_DRY = {**LLAMA_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4}
CLIP_B16 = {**CLIP_VIT_H14, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "patch_size": 16}
CLIP_DRY = {**CLIP_VIT_H14, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 28, "patch_size": 14}
# interleaf.build("idefics-9b", **options): the preset as it is, or its layout at another size
SHAPES = {
    "9b": dict(),
    "1b": dict(lm=LLAMA_1B, vision=dict(kind="clip", hf_config=CLIP_B16, feature_layer=-1, resize="squash"),
               cross_attention=_xattn(LLAMA_1B)),
    "dry": dict(lm=LLAMA_DRY, vision=dict(kind="clip", hf_config=CLIP_DRY, feature_layer=-1, resize="squash"),
                resampler={**IDEFICS_RESAMPLER, "depth": 1, "num_latents": 8, "heads": 2, "head_dim": 16},
                cross_attention=_xattn(LLAMA_DRY)),
}


def _idefics_size(options: dict) -> dict:
    """The same shape as a :func:`vs_transformers.build_idefics` size (transformers' IDEFICS)."""
    lm = options.get("lm", LLAMA_7B)
    v = options.get("vision", {}).get("hf_config", CLIP_VIT_H14)
    r = {**IDEFICS_RESAMPLER, **options.get("resampler", {})}
    return dict(
        lm={k: lm[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
        vision=dict(hidden=v["hidden_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                    mlp=v["intermediate_size"], image=v["image_size"], patch=v["patch_size"]),
        perceiver=dict(resampler_n_latents=r["num_latents"], resampler_depth=r["depth"], resampler_n_heads=r["heads"],
                       resampler_head_dim=r["head_dim"]),
        interval=4, new_tokens=32,
    )


def build(shape: str, device, dtype):
    model, _ = interleaf.build("idefics-9b", device=device, dtype=dtype, seed=0, **SHAPES[shape])
    return model


def synthetic_batch(model, batch: int, seq: int, images: int, device, dtype) -> dict:
    """Random token ids with ``images`` ``<image>`` tokens spread over each row, random pixels."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.tokens_cfg.extra_start
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    ids[:, torch.arange(images) * (seq // images)] = model.image_token_id
    side = model.config.vision_cfg.hf_config["image_size"]
    pixels = torch.randn(batch, images, 3, side, side, generator=g)
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=pixels.to(device, dtype), labels=labels.to(device))


def model_flops(model, data: dict) -> float:
    """FLOPs of one forward and backward over ``data`` (``FlopCounterMode``), before checkpointing
    and sharding, so no recomputation is counted; the gradients it leaves are dropped."""
    from torch.utils.flop_counter import FlopCounterMode

    data = dict(data)
    labels = data.pop("labels")
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = causal_lm_loss(model(**data).logits.float(), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def shard(model) -> None:
    """Activation checkpointing as the trainer applies it (the LM's own, on each decoder layer; not
    the cross-attention blocks, see the module's docstring), then FSDP2 on every unit and the root."""
    from torch.distributed.fsdp import fully_shard

    from interleaf.training.distributed import fsdp_units

    lm = model.language_model
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for unit in fsdp_units(model):
        fully_shard(unit)
    fully_shard(model)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_case(shape: str, args, device, dtype) -> dict:
    import torch.distributed as dist

    world = dist.get_world_size()
    model = build(shape, device, dtype)
    model.apply_freeze()
    model.train()
    data = synthetic_batch(model, args.batch, args.seq, args.images, device, dtype)
    # counted on one row (the unsharded model's activations stay small), times the rows of a rank
    flops = model_flops(model, {k: v[:1] for k, v in data.items()}) * args.batch
    shard(model)
    labels = data.pop("labels")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss, _ = causal_lm_loss(model(**data).logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    mfu = flops / seconds / (args.peak_tflops * 1e12) if args.peak_tflops else None
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None
    del model, optimizer
    return dict(shape=shape, layout=f"{world} x {args.batch} x {args.seq}, {args.images} images/row", step=seconds,
                tokens=args.batch * args.seq / seconds, tflop=flops / 1e12, mfu=mfu, memory=mem)


def decode_case(shape: str, args, device, dtype) -> dict:
    model = build(shape, device, dtype).eval()
    data = synthetic_batch(model, 1, 32, 1, device, dtype)
    data.pop("labels")
    data["input_ids"][0, 0] = model.image_token_id  # the image first, every token attends to it
    data["input_ids"][0, 1:] = data["input_ids"][0, 1:].masked_fill(data["input_ids"][0, 1:] == model.image_token_id, 5)

    def run(n):
        out = model.generate(**data, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return out

    with torch.no_grad():
        full = benchlib.timed(lambda: run(args.new_tokens), args.repeats)
        first = benchlib.timed(lambda: run(1), args.repeats)
    rate = (args.new_tokens - 1) / max(full - first, 1e-9)
    read = sum(p.numel() * p.element_size() for n, p in model.language_model.named_parameters()
               if "embed_tokens" not in n)
    ceiling = args.bandwidth_gbs * 1e9 / read if args.bandwidth_gbs else None
    del model
    return dict(shape=shape, read=read / 2**30, ceiling=ceiling, rate=rate)


def generate_rows(shape: str, args, device, dtype) -> tuple[list[Row], bool]:
    with tempfile.TemporaryDirectory() as tmp:
        reference, ours, processor = build_idefics(_idefics_size(SHAPES[shape]), Path(tmp), dtype)
    reference.to(device)
    ours.to(device)
    mine, _ = inputs_for("idefics", processor, 8, 4)
    mine = {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in mine.items()}

    def run(model):
        out = generate(model, mine, args.new_tokens)
        sync(device)
        return out

    with torch.no_grad():
        same = bool(torch.equal(run(reference), run(ours)))
        t_ref = benchlib.timed(lambda: run(reference), args.repeats, warm_up=False)
        t_our = benchlib.timed(lambda: run(ours), args.repeats, warm_up=False)
    tokens = 8 * args.new_tokens
    return [Row(f"generate {shape} vs transformers IDEFICS, batch 8, 4 images", tokens / t_ref, tokens / t_our,
                "new tokens/s", True, None if args.dry_run else 2.5)], same


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process_group(device):
    """The torchrun group when launched so, else a group of one (FSDP2 needs one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    launched = "RANK" in os.environ  # torchrun: its rendezvous; else a free local port, no variables set
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if launched else (0, 1)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init = "env://" if launched else f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, the 'dry' shape for every part, float32")
    parser.add_argument("--train", default="1b,9b", help="shapes to train (comma-separated; empty: none)")
    parser.add_argument("--decode", default="9b", help="shapes to decode at batch 1")
    parser.add_argument("--generate", default="1b", help="shapes to compare with transformers' IDEFICS")
    parser.add_argument("--batch", type=int, default=8, help="training rows per GPU")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--images", type=int, default=4, help="images per training row")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: PEAKS by the device's name")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="default: PEAKS by the device's name")
    parser.add_argument("--results", type=Path, nargs="?", const=benchlib.RESULTS, default=None)
    args = parser.parse_args(argv)
    with benchlib.quiet():
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on the outputs; none edited in place
        if args.dry_run:
            device, dtype = "cpu", torch.float32
            args.train = args.decode = args.generate = "dry"
            args.batch, args.seq, args.images, args.steps, args.warmup = 2, 32, 2, 1, 1
            args.new_tokens, args.repeats = 4, 1
        else:
            if not torch.cuda.is_available():
                parser.error("no GPU here: run with --dry-run to check the script on a CPU")
            device, dtype = "cuda", torch.bfloat16
            name = torch.cuda.get_device_name(0).lower()
            peak, bandwidth = next((v for k, v in PEAKS.items() if k in name), (None, None))
            args.peak_tflops = args.peak_tflops or peak
            args.bandwidth_gbs = args.bandwidth_gbs or bandwidth
        shapes = {part: [s for s in getattr(args, part).split(",") if s] for part in ("train", "decode", "generate")}
        trained, decoded, rows, same = [], [], [], True
        with process_group(device):
            import torch.distributed as dist

            trained = [train_case(shape, args, device, dtype) for shape in shapes["train"]]
            main_rank = dist.get_rank() == 0
        if not main_rank:
            return dict(trained=trained)
        decoded = [decode_case(shape, args, device, dtype) for shape in shapes["decode"]]
        for shape in shapes["generate"]:
            more, ok = generate_rows(shape, args, device, dtype)
            rows, same = rows + more, same and ok
        title = "interleaf on a GPU" + (" (dry run on CPU: tiny shapes, the layout only)" if args.dry_run else "")
        lines = benchlib.header(title, torch.get_num_threads(), argv, "gpu.py")
        lines += [f"dtype {str(dtype).replace('torch.', '')}; peak {_num(args.peak_tflops)} TFLOP/s, bandwidth "
                  f"{_num(args.bandwidth_gbs)} GB/s; identical greedy generations with transformers' IDEFICS: "
                  + ("yes" if same else "NO"), "", *tables(trained, decoded), *benchlib.table(rows, "transformers")]
        return dict(trained=trained, decoded=decoded, rows=rows, same=same, text=benchlib.emit(lines, args.results))


def _num(value, digits: int = 4) -> str:
    return "unknown" if value is None else f"{value:.{digits}g}"


def tables(trained: list[dict], decoded: list[dict]) -> list[str]:
    """The training table (MFU) and the decoding table (against the bandwidth ceiling)."""
    lines = ["| training (FSDP2, checkpointing) | GPUs x rows x tokens | step (s) | tokens/s per GPU "
             "| model TFLOP per step per GPU | MFU | peak memory per GPU (GiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for t in trained:
        mfu = "unknown" if t["mfu"] is None else f"{100 * t['mfu']:.1f} %"
        lines.append(f"| {t['shape']} | {t['layout']} | {t['step']:.3f} | {t['tokens']:.0f} | {_num(t['tflop'])} "
                     f"| {mfu} | {_num(t['memory'], 3)} |")
    lines += ["", "| decoding, batch 1, 1 image | weights read per token (GiB) | ceiling (tokens/s) | interleaf "
              "(tokens/s) | of the ceiling |", "| --- | ---: | ---: | ---: | ---: |"]
    for d in decoded:
        share = "unknown" if d["ceiling"] is None else f"{100 * d['rate'] / d['ceiling']:.0f} %"
        lines.append(f"| {d['shape']} | {d['read']:.3g} | {_num(d['ceiling'])} | {d['rate']:.1f} | {share} |")
    return [*lines, ""]


if __name__ == "__main__":
    main()
