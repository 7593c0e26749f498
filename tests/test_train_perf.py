"""What a training step costs: the log-partition without a second pass over the vocabulary (and
no gradient through it without z-loss), what autograd keeps for frozen linear layers, DDP's search
for unused parameters only when a trainable weight can miss a gradient, and the model FLOPs, FLOP/s
and MFU the trainer reports."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.families import FAMILIES, POLICIES, build_family, stage_model
from tiny import tiny_lm
from torch import nn

from interleaf.model.loss import causal_lm_loss, weighted_token_loss
from interleaf.training import train
from interleaf.training.distributed import DistState, needs_unused_parameter_search, wrap_model
from interleaf.training.flops import FlopCount, flop_count

# ----------------------------------------------------------------------------- the log-partition


def _logits_and_labels(seed: int = 0, b: int = 3, t: int = 7, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, t, v, generator=g)).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    return logits, labels


def _count_logsumexp(monkeypatch) -> list[int]:
    """Count calls of the real ``torch.logsumexp`` and ``Tensor.logsumexp`` (they still run)."""
    calls = []
    real_fn, real_method = torch.logsumexp, torch.Tensor.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **k: (calls.append(1), real_fn(*a, **k))[1])
    monkeypatch.setattr(torch.Tensor, "logsumexp", lambda *a, **k: (calls.append(1), real_method(*a, **k))[1])
    return calls


def test_z_squared_and_its_gradient_equal_logsumexp_s():
    logits, labels = _logits_and_labels()
    w = torch.tensor([1.0, 0.5, 2.0])
    wce, wz, _, _ = weighted_token_loss(logits, labels, w)
    (grad,) = torch.autograd.grad(wz.sum(), logits)
    # the reference: torch's logsumexp over the whole vocabulary, masked and weighted the same way
    mask = (labels[:, 1:] != -100).float()
    ref = (torch.logsumexp(logits[:, :-1], -1).pow(2) * mask).sum(-1) * w
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(wz, ref, rtol=1e-5) and torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # the model's loss with z-loss: mean CE + z_loss * mean Z^2 over trained tokens
    loss, z = causal_lm_loss(logits, labels, z_loss=1e-2)
    keep = labels[:, 1:] != -100
    flat = logits[:, :-1][keep]
    ref_z = torch.logsumexp(flat, -1).pow(2).mean()
    ref_loss = torch.nn.functional.cross_entropy(flat, labels[:, 1:][keep]) + 1e-2 * ref_z
    assert torch.allclose(z, ref_z, rtol=1e-5) and torch.allclose(loss, ref_loss, rtol=1e-5)
    g1, g2 = (torch.autograd.grad(x, logits)[0] for x in (loss, ref_loss))
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)


def test_no_full_vocabulary_logsumexp_and_no_z_gradient_without_z_loss(monkeypatch):
    calls = _count_logsumexp(monkeypatch)
    logits, labels = _logits_and_labels()
    _, wz, _, _ = weighted_token_loss(logits, labels, torch.ones(3), z_grad=False)
    assert not wz.requires_grad  # reported, never differentiated
    _, wz, _, _ = weighted_token_loss(logits, labels, torch.ones(3))
    assert wz.requires_grad
    assert causal_lm_loss(logits, labels)[1] is None and causal_lm_loss(logits, labels, 1e-3)[1] is not None
    assert calls == []


def _saved_bytes(fn) -> tuple[int, set[int]]:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, and their addresses."""
    ptrs: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            ptrs[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(ptrs.values()), set(ptrs)


def test_the_loss_keeps_one_vocabulary_sized_tensor_with_or_without_z_loss():
    logits, labels = _logits_and_labels(b=4, t=33, v=257)
    full = 4 * 32 * 257 * 4  # one (B, T-1, V) float32 tensor
    plain, _ = _saved_bytes(lambda: torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 257), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"))
    with_z, _ = _saved_bytes(lambda: weighted_token_loss(logits, labels, torch.ones(4)))
    without_z, _ = _saved_bytes(lambda: weighted_token_loss(logits, labels, torch.ones(4), z_grad=False))
    logsumexp_z, _ = _saved_bytes(lambda: torch.logsumexp(logits[:, :-1].float(), -1))  # what Z cost before
    assert full <= plain < 2 * full and logsumexp_z >= full
    assert with_z < plain + full // 4 and without_z < plain + full // 4


# ----------------------------------------------------------------------------- frozen linear layers


def _down_proj_inputs_saved(model, batch) -> tuple[int, int, int]:
    """(saved bytes, LM MLP down-projections, how many of their inputs autograd keeps) in one forward."""
    inputs: list[torch.Tensor] = []  # held, so that no later tensor reuses their memory
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
             for name, m in model.language_model.named_modules() if name.endswith("mlp.down_proj")]
    try:
        total, saved = _saved_bytes(lambda: model(**batch).logits.sum())
    finally:
        for h in hooks:
            h.remove()
    return total, len(inputs), sum(x.untyped_storage().data_ptr() in saved for x in inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_frozen_linear_layer_keeps_no_input_for_its_weight_gradient(family):
    """A frozen LM still passes gradients down to what trains below it, which needs its weights,
    not its inputs: freezing the LM drops every MLP down-projection's input from what autograd keeps."""
    model, _ = build_family(family)
    ids = torch.randint(3, 100, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.train()
    trained, frozen = POLICIES[family]  # the LM trains, then not
    model.apply_freeze(trained)
    bytes_trained, n, kept = _down_proj_inputs_saved(model, batch)
    assert n >= 2 and kept == n
    model.apply_freeze(frozen)
    bytes_frozen, n, kept = _down_proj_inputs_saved(model, batch)
    assert kept == 0 and bytes_frozen < bytes_trained


# ----------------------------------------------------------------------------- DDP's unused-parameter search


@pytest.mark.parametrize("family", FAMILIES)
def test_the_unused_parameter_search_follows_what_trains(family, monkeypatch):
    model, _ = build_family(family)
    made = []

    class RecordingDDP(nn.Module):  # stands in for DDP (which needs a process group) to see its arguments
        def __init__(self, module, **kwargs):
            super().__init__()
            made.append(kwargs)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
    two = DistState(rank=0, world_size=2)
    for policy in POLICIES[family] + ("all_trainable",):  # every policy trains the image path
        model.apply_freeze(policy)
        assert needs_unused_parameter_search(model), policy
        wrap_model(model, "ddp", two)
        assert made.pop()["find_unused_parameters"] is True
    # only the LM's own weights train (the image path and any cross-attention frozen): every
    # trainable weight gets a gradient in every step, image or not
    model.requires_grad_(False)
    model.language_model.requires_grad_(True)
    for block in getattr(model, "cross_attention_blocks", []):
        block.requires_grad_(False)
    assert not needs_unused_parameter_search(model)
    wrap_model(model, "ddp", two)
    assert made.pop()["find_unused_parameters"] is False
    # a trainable cross-attention block alone is enough to need it (a batch without images skips it)
    if family == "cross_attention":
        model.cross_attention_blocks[0].requires_grad_(True)
        assert needs_unused_parameter_search(model)


def test_an_lm_with_routed_experts_needs_the_search():
    model, _ = build_family("cross_attention")
    model.requires_grad_(False)
    model.language_model.model.layers[0].decoder_layer.mlp.requires_grad_(True)
    assert not needs_unused_parameter_search(model)
    model.language_model.config.num_local_experts = 4
    assert needs_unused_parameter_search(model)


# ----------------------------------------------------------------------------- FLOPs and MFU


class _Wrapper(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.language_model = lm


@pytest.mark.parametrize("tied", [False, True])
def test_flop_count_against_a_hand_count(tied):
    # tests/tiny.py's llama: hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 KV heads, vocabulary 120
    lm = tiny_lm("llama", tie_word_embeddings=tied)
    attn = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # q, k, v, o (no biases)
    mlp = 3 * 32 * 64  # gate, up, down
    layer = attn + mlp + 2 * 32  # and the two norms
    n = 2 * layer + 32 + 120 * 32  # the final norm and the head; the embedding lookup is not a product
    model = _Wrapper(lm)
    count = flop_count(model)
    assert (count.path, count.trainable_path, count.layers, count.attention_width, count.trains) == (n, n, 2, 32, True)
    # only layer 1's MLP trains: forward 2N, activation gradients 2N, weight gradients 2 * its weights
    model.requires_grad_(False)
    lm.model.layers[1].mlp.requires_grad_(True)
    count = flop_count(model)
    assert count.trainable_path == mlp
    rows = [5, 7]  # two rows: 12 positions
    assert count.step(12, sum(r * r for r in rows)) == (4 * n + 2 * mlp) * 12 + 12 * 2 * 32 * (25 + 49)
    model.requires_grad_(False)
    frozen = flop_count(model)
    assert not frozen.trains and frozen.step(12, 74) == 2 * n * 12 + 4 * 2 * 32 * 74
    # everything trains: the standard 6N + 12 L d T per token
    assert FlopCount(n, n, 2, 32, True).step(1, 9) == 6 * n + 12 * 2 * 32 * 9


@pytest.fixture(scope="module")
def corpus(synth_corpus):
    return synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)


def _stage(corpus, out, **kw) -> dict:
    return {
        "model": stage_model("cross_attention"), "freeze": "flamingo",
        "data": {"sources": [{"name": "vqa", "format": "llava", "paths": str(corpus / "llava" / "vqa_train.json"),
                              "images_root": str(corpus / "images")}]},
        "batch_size": 2, "max_steps": 2, "max_length": 40, "log_every": 1, "out": str(out), **kw,
    }


def test_the_trainer_reports_flops_and_mfu(corpus, tmp_path, monkeypatch):
    calls = _count_logsumexp(monkeypatch)
    [result] = train(_stage(corpus, tmp_path / "a", peak_flops=1e9), progress=False)
    assert calls == []  # no z-loss: no logsumexp anywhere in the step
    records = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    model, _ = build_family("cross_attention")
    model.apply_freeze("flamingo")
    count = flop_count(model)
    for r in records:
        per_token = r["flops_per_s"] / r["tokens_per_s"]  # FLOPs per position of this step
        assert 4 * count.path + 2 * count.trainable_path < per_token
        assert per_token <= 4 * count.path + 2 * count.trainable_path + 12 * count.layers * count.attention_width * 40
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e9)
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["mfu"] == pytest.approx(summary["flops_per_s"] / 1e9)
    # on a CPU without peak_flops there is no peak to compare with: FLOP/s only
    [plain] = train(_stage(corpus, tmp_path / "b", max_steps=1), progress=False)
    record = json.loads((plain.out / "metrics.jsonl").read_text())
    assert "mfu" not in record and record["flops_per_s"] > 0
    assert "mfu" not in json.loads((plain.out / "summary.json").read_text())


# ----------------------------------------------------------------------------- built on the meta device


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_built_on_meta_takes_the_main_process_s_tensors(family):
    """What a process that builds on the meta device does (training.distributed.materialise_from_main,
    with the broadcast replaced by a copy): every tensor the model computes with is a parameter or a
    buffer, so after them it computes what the main process's model computes."""
    from interleaf.training.distributed import _to_empty_keeping_ties

    main, _ = build_family(family, seed=3)
    other, _ = build_family(family, seed=3, device="meta")
    assert all(p.is_meta for p in other.parameters())
    _to_empty_keeping_ties(other, torch.device("cpu"))
    with torch.no_grad():
        for mine, theirs in zip([*other.parameters(), *other.buffers()], [*main.parameters(), *main.buffers()]):
            mine.copy_(theirs)
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, main(input_ids=ids).logits)


def test_allocating_a_meta_model_keeps_shared_weights_shared():
    with torch.device("meta"):
        model = _Wrapper(tiny_lm("llama", seed=None, tie_word_embeddings=True))
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    from interleaf.training.distributed import _to_empty_keeping_ties

    _to_empty_keeping_ties(model, torch.device("cpu"))
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.weight.device.type == "cpu"


def test_only_random_weights_are_received_from_the_main_process():
    from interleaf.training.config import load_recipe
    from interleaf.training.prepare import _random_weights

    def stage(model):
        return load_recipe({"model": model}).stages[0]

    assert _random_weights(stage({"preset": "tiny-random"}))
    assert _random_weights(stage({"preset": "tiny-llava", "projector": {"kind": "linear"}}))
    # weights to load: every process loads them itself
    assert not _random_weights(stage({"preset": "tiny-random", "lm": "/some/lm"}))
    assert not _random_weights(stage({"from_stage": "pretrain"}))
