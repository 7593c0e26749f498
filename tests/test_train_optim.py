"""Optimiser groups (no decay on norms, biases, gates, embeddings), frozen parameters without state, schedules."""

from __future__ import annotations

import math

import pytest
import torch

import interleaf
from interleaf.training import OptimConfig, build_optimizer, lr_factor, param_groups


@pytest.fixture(scope="module")
def model():
    m, _ = interleaf.build("tiny-random", seed=0)
    m.apply_freeze("unfreeze_lm")
    return m


def test_no_weight_decay_on_norms_biases_gates_and_embeddings(model):
    groups = {g["group"]: g for g in param_groups(model, 0.1)}
    decay, no_decay = set(groups["decay"]["names"]), set(groups["no_decay"]["names"])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert not decay & no_decay
    gates = [n for n in no_decay if n.endswith(("attn_gate", "ffn_gate"))]
    assert len(gates) == 2 * len(model.cross_attention_blocks)
    for name in no_decay:
        leaf = name.rsplit(".", 1)[-1]
        p = dict(model.named_parameters())[name]
        assert p.ndim < 2 or leaf in ("attn_gate", "ffn_gate", "latents", "pos_embed") or "embed_tokens" in name, name
    assert any("norm" in n for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert "language_model.model.embed_tokens.extra" in no_decay and "language_model.model.embed_tokens.weight" in no_decay
    assert "language_model.lm_head.extra" in decay  # the added output rows are a weight matrix
    assert "language_model.model.layers.0.cross_attention.q_proj.weight" in decay
    for name in decay:
        assert dict(model.named_parameters())[name].ndim >= 2


def test_frozen_parameters_get_no_optimizer_state():
    m, _ = interleaf.build("tiny-random", seed=0)
    m.apply_freeze("flamingo")
    opt = build_optimizer(m, OptimConfig(lr=1e-3))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.parameters() if p.requires_grad}
    ids = torch.tensor([[1, m.image_token_id, 5, 6, 7]])
    out = m(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 32, 32), labels=ids)
    out.loss.backward()
    opt.step()
    stateful = {id(p) for p in opt.state}
    assert stateful <= in_opt and stateful
    frozen = [p for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p not in opt.state for p in frozen)


def test_schedules():
    approx = pytest.approx
    warm = OptimConfig(schedule="constant", warmup_steps=4)
    assert [lr_factor(s, 100, warm) for s in (0, 1, 3, 4, 99)] == approx([0.25, 0.5, 1.0, 1.0, 1.0])
    lin = OptimConfig(schedule="linear", warmup_steps=0, min_lr_ratio=0.1)
    assert [lr_factor(s, 10, lin) for s in (0, 5, 10)] == approx([1.0, 0.55, 0.1])
    cos = OptimConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
    assert lr_factor(0, 12, cos) == approx(0.5)
    assert lr_factor(2, 12, cos) == approx(1.0)
    assert lr_factor(7, 12, cos) == approx(0.5)  # half way through the decay
    assert lr_factor(12, 12, cos) == approx(0.0, abs=1e-12)
    floor = OptimConfig(schedule="cosine", min_lr_ratio=0.2)
    assert lr_factor(5, 10, floor) == approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
