"""xGen-MM's token sampler: parity with the reference fixtures, the released key layout, bad input.

The oracles are the fixtures the public xGen-MM code produced (``$INTERLEAF_FIXTURES/xgenmm-*``,
found by their files: a sampler-only checkpoint with inputs ``x`` / ``mask``; a full model whose
outputs hold what its sampler received and made) and the parameter count of the released
architecture (109,901,568, counted by instantiating the public class).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers.fixtures import ENV, config, fixture_dirs, tensor_names, tensors
from interleaf.config import TokenSamplerConfig
from interleaf.convert.xgenmm_keys import (
    XGENMM_SAMPLER_PREFIX,
    interleaf_to_xgenmm_sampler_key_map,
    sampler_state_from_xgenmm,
    sampler_state_to_xgenmm,
    xgenmm_sampler_key_map,
)
from interleaf.errors import CheckpointError, ConfigError, InputError
from interleaf.model.attention import attention_implementation
from interleaf.model.token_sampler import TokenSampler

ATOL = 1e-5  # against the reference's numbers
LATENTS = XGENMM_SAMPLER_PREFIX + "latents"


# -- discovery ---------------------------------------------------------------------------------


def _checkpoint_keys(folder: Path) -> list[str]:
    return tensor_names(folder / "model.safetensors")


def checkpoint_fixtures() -> list[Path]:
    """Every xgenmm-* folder whose checkpoint holds a token sampler."""
    found = [d for d in fixture_dirs("xgenmm-") if LATENTS in _checkpoint_keys(d)]
    assert found, "no xgenmm-* fixture holds a token sampler (vlm.vision_tokenizer.latents)"
    return found


def sampler_fixtures() -> list[Path]:
    """Sampler-only fixtures: every checkpoint key is the sampler's; inputs x / mask, output y."""
    found = [
        d for d in checkpoint_fixtures()
        if all(k.startswith(XGENMM_SAMPLER_PREFIX) for k in _checkpoint_keys(d))
        and {"x", "mask"} <= set(tensor_names(d / "inputs.safetensors"))
        and "y" in tensor_names(d / "outputs.safetensors")
    ]
    assert found, "no sampler-only xgenmm-* fixture (a vlm.vision_tokenizer.* checkpoint with inputs x, mask)"
    return found


def model_fixtures_with_sampler_io() -> list[Path]:
    """Full-model fixtures whose outputs hold the sampler's inputs and the vision tokens it made."""
    found = []
    for d in checkpoint_fixtures():
        names = set(tensor_names(d / "outputs.safetensors"))
        if {"sampler_in.features", "sampler_in.mask"} <= names and any(n.startswith("vision_tokens.") for n in names):
            found.append(d)
    assert found, "no xgenmm-* fixture records sampler_in.features / sampler_in.mask with vision_tokens.*"
    return found


def build(folder: Path) -> TokenSampler:
    """The sampler the fixture's config.json describes, with its weights loaded through the key map."""
    cfg = config(folder)
    section = cfg.get("vision_tokenizer", cfg)  # full models nest it; the sampler fixture is flat
    assert not section.get("max_num_media") and not section.get("max_num_frames"), "media/frame embeddings"
    sampler = TokenSampler(TokenSamplerConfig(
        dim=section["dim"], out_dim=section["dim_inner"], depth=section["depth"], heads=section["heads"],
        head_dim=section["dim_head"], num_latents=section["num_latents"], ff_mult=section["ff_mult"],
    ))
    state = sampler_state_from_xgenmm(tensors(folder / "model.safetensors"), sampler, what=folder.name)
    result = sampler.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return sampler.eval()


def groups(x: torch.Tensor) -> torch.Tensor:
    """The reference's (G, T=1, F=1, V, dim) features as (G, V, dim)."""
    assert x.dim() == 5 and x.shape[1] == x.shape[2] == 1, f"expected (G, 1, 1, V, dim), got {tuple(x.shape)}"
    return x[:, 0, 0]


def close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol:g}"


def test_a_missing_fixtures_folder_fails_naming_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "absent"))
    with pytest.raises(pytest.fail.Exception, match=f"set {ENV}"):
        fixture_dirs("xgenmm-")
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"no fixture folder xgenmm-\*"):
        fixture_dirs("xgenmm-")


# -- parity with the reference -----------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_parity_with_every_sampler_fixture(impl):
    for folder in sampler_fixtures():
        sampler = build(folder)
        inputs, outputs = tensors(folder / "inputs.safetensors"), tensors(folder / "outputs.safetensors")
        x, mask = groups(inputs["x"]), inputs["mask"]
        g, latents = x.shape[0], sampler.num_latents
        with torch.no_grad(), attention_implementation(impl):
            y = sampler(x, mask)
            close(y, outputs["y"].reshape(g, latents, -1), f"{folder.name} y ({impl})")
            if "y_nomask" in outputs:
                close(sampler(x), outputs["y_nomask"].reshape(g, latents, -1), f"{folder.name} y_nomask ({impl})")
            truncated = [n for n in outputs if re.fullmatch(r"y_group\d+_truncated", n)]
            for name in truncated:  # the group cut to its real tokens, unmasked
                k = int(re.findall(r"\d+", name)[0])
                ref = outputs[name].reshape(1, latents, -1)
                close(sampler(x[k:k + 1, mask[k] != 0]), ref, f"{folder.name} {name} ({impl})")
                close(y[k:k + 1], ref, f"{folder.name} masked group {k} vs truncated ({impl})")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_parity_with_the_sampler_of_every_full_model_fixture(impl):
    for folder in model_fixtures_with_sampler_io():
        sampler = build(folder)
        outputs = tensors(folder / "outputs.safetensors")
        x, mask = groups(outputs["sampler_in.features"]), outputs["sampler_in.mask"]
        names = sorted(
            (n for n in outputs if n.startswith("vision_tokens.")),
            key=lambda n: tuple(int(i) for i in n.split(".")[1:]),  # row, then image: the order the sampler saw
        )
        expected = torch.cat([outputs[n] for n in names])  # ((sum of groups) * latents, lm width)
        with torch.no_grad(), attention_implementation(impl):
            ours = sampler(x, mask)
        close(ours.reshape(-1, ours.shape[-1]), expected, f"{folder.name} vision tokens ({impl})")


def test_full_model_fixture_covers_an_all_padding_group():
    """The anyres grouping makes groups with no real token; the fixtures above check them against the reference."""
    masks = [tensors(d / "outputs.safetensors")["sampler_in.mask"] for d in model_fixtures_with_sampler_io()]
    assert any(bool((m.sum(dim=1) == 0).any()) for m in masks)


def test_every_fixture_checkpoint_loads_strictly_and_converts_back_bit_identically():
    for folder in checkpoint_fixtures():
        sampler = build(folder)  # strict: every sampler key mapped, none missing, shapes equal
        weights = tensors(folder / "model.safetensors")
        released = {k: v for k, v in weights.items() if k.startswith(XGENMM_SAMPLER_PREFIX)}
        back = sampler_state_to_xgenmm(sampler.state_dict(), sampler.cfg.depth)
        assert set(back) == set(released), folder.name
        for key, value in released.items():
            assert torch.equal(back[key], value), f"{folder.name} {key}"


def test_released_architecture_parameter_count():
    """xGen-MM r-v1.5's sampler (SigLIP 1152 -> Phi-3 3072) has 109,901,568 parameters."""
    with torch.device("meta"):
        sampler = TokenSampler(TokenSamplerConfig(), dim=1152, out_dim=3072)
    assert sum(p.numel() for p in sampler.parameters()) == 109_901_568
    assert len(xgenmm_sampler_key_map(6)) == len(sampler.state_dict())


# -- properties ----------------------------------------------------------------------------------


def small(**kw) -> TokenSampler:
    torch.manual_seed(0)
    cfg = {"dim": 16, "out_dim": 24, "depth": 2, "heads": 2, "head_dim": 8, "num_latents": 5, "ff_mult": 2, **kw}
    sampler = TokenSampler(TokenSamplerConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that every parameter matters
        for name, p in sampler.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return sampler


def test_eager_and_sdpa_agree():
    sampler = small()
    x, mask = torch.randn(4, 7, 16), torch.rand(4, 7) > 0.4
    mask[0] = False  # an all-padding group too
    with torch.no_grad():
        for m in (mask, None):
            with attention_implementation("eager"):
                eager = sampler(x, m)
            with attention_implementation("sdpa"):
                sdpa = sampler(x, m)
            close(eager, sdpa, f"eager vs sdpa (mask {m is not None})", atol=1e-6)


def test_all_padding_group_is_the_empty_group():
    """Latents always attend to themselves: a group with no real token gives the zero-token group's output."""
    sampler = small()
    x = torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0] * 6, [0] * 6], dtype=torch.float32)
    with torch.no_grad():
        out = sampler(x, mask)
        empty = sampler(x[:1, :0])  # (1, 0, 16): no media at all
    assert torch.isfinite(out).all()
    close(out[1:2], empty, "all-padding group vs no tokens", atol=1e-6)
    close(out[2:3], empty, "all-padding group vs no tokens", atol=1e-6)
    with torch.no_grad():
        close(out[:1], sampler(x[:1, mask[0] != 0]), "masked vs truncated", atol=1e-6)


def test_groups_are_independent_and_masks_accept_bool_or_01():
    sampler = small()
    x, mask = torch.randn(3, 6, 16), torch.rand(3, 6) > 0.3
    with torch.no_grad():
        out = sampler(x, mask)
        for dtype in (torch.float32, torch.int64, torch.uint8):
            assert torch.equal(sampler(x, mask.to(dtype)), out)
        close(sampler(x[2:3], mask[2:3]), out[2:3], "group alone vs in a batch", atol=1e-6)
        changed = x.clone()
        changed[1] = torch.randn(6, 16)
        changed[0, ~mask[0]] = 100.0  # padding of group 0 changes: no effect
        again = sampler(changed, mask)
    close(again[0], out[0], "padding values do not matter", atol=1e-6)
    close(again[2], out[2], "other groups unaffected", atol=1e-6)
    assert not torch.allclose(again[1], out[1])


def test_gradients_reach_every_parameter_and_skip_padding():
    sampler = small()
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    sampler(x, mask).pow(2).sum().backward()
    missing = [n for n, p in sampler.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert torch.all(x.grad[~mask] == 0) and torch.all(x.grad[mask].abs().sum(-1) > 0)


def test_parameter_names_are_the_key_map_targets():
    sampler = small()
    table = xgenmm_sampler_key_map(2)
    assert sorted(table.values()) == sorted(sampler.state_dict())
    inverse = interleaf_to_xgenmm_sampler_key_map(2)
    assert {inverse[v]: v for v in table.values()} == table
    assert table["vlm.vision_tokenizer.layers.1.0.to_kv.weight"] == "layers.1.attn.kv_proj.weight"
    assert table["vlm.vision_tokenizer.layers.0.1.3.weight"] == "layers.0.ff.fc2.weight"
    assert table["vlm.vision_tokenizer.projection.bias"] == "proj.bias"
    assert xgenmm_sampler_key_map(1, prefix="")["layers.0.1.0.weight"] == "layers.0.ff.norm.weight"


# -- bad input -------------------------------------------------------------------------------------


def test_bad_features():
    sampler = small()
    with pytest.raises(InputError, match=r"\(groups, tokens, 16\), got \(3, 7, 12\)"):
        sampler(torch.randn(3, 7, 12))
    with pytest.raises(InputError, match=r"\(groups, tokens, 16\), got \(1, 3, 7, 16\)"):
        sampler(torch.randn(1, 3, 7, 16))
    with pytest.raises(InputError, match="floating-point"):
        sampler(torch.ones(2, 3, 16, dtype=torch.int64))


def test_bad_mask():
    sampler = small()
    x = torch.randn(3, 7, 16)
    with pytest.raises(InputError, match=r"mask must have shape \(groups, tokens\) = \(3, 7\).*got \(3, 6\)"):
        sampler(x, torch.ones(3, 6))
    with pytest.raises(InputError, match=r"got \(3, 1, 7\)"):
        sampler(x, torch.ones(3, 1, 7))
    with pytest.raises(InputError, match="1 \\(real token\\) or 0 \\(padding\\)"):
        sampler(x, torch.full((3, 7), 0.5))


def test_bad_config():
    with pytest.raises(ConfigError, match="token_sampler.dim.*not set.*pass dim="):
        TokenSampler(TokenSamplerConfig(out_dim=8))
    with pytest.raises(ConfigError, match="token_sampler.out_dim.*is 8, but the model gives 12"):
        TokenSampler(TokenSamplerConfig(dim=4, out_dim=8), out_dim=12)
    with pytest.raises(ConfigError, match="token_sampler.depth"):
        TokenSamplerConfig(depth=0)
    with pytest.raises(ConfigError, match="token_sampler.head_dim"):
        TokenSamplerConfig(head_dim="wide")
    assert TokenSampler(TokenSamplerConfig(depth=1, heads=1, head_dim=4, num_latents=2), dim=4, out_dim=6).dim == 4


def test_bad_checkpoints():
    sampler = small(depth=1)
    good = sampler_state_to_xgenmm(sampler.state_dict(), 1)
    for key in good:
        good[key] = good[key].clone()
    missing = dict(good)
    del missing["vlm.vision_tokenizer.layers.0.0.to_q.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layers.0.attn.q_proj.weight"):
        sampler_state_from_xgenmm(missing, sampler)
    extra = {**good, "vlm.vision_tokenizer.layers.1.0.to_q.weight": torch.zeros(16, 16)}
    with pytest.raises(CheckpointError, match=r"does not know \(1\): vlm.vision_tokenizer.layers.1.0.to_q.weight"):
        sampler_state_from_xgenmm(extra, sampler)
    shaped = {**good, "vlm.vision_tokenizer.latents": torch.zeros(4, 16)}
    with pytest.raises(CheckpointError, match=r"shape mismatches.*latents \(4, 16\) vs \(5, 16\)"):
        sampler_state_from_xgenmm(shaped, sampler)
    with pytest.raises(CheckpointError, match="no key under 'vlm.vision_tokenizer.'"):
        sampler_state_from_xgenmm({"vlm.lang_model.lm_head.weight": torch.zeros(2, 2)}, sampler)
    other = {**good, "vlm.lang_model.lm_head.weight": torch.zeros(2, 2)}  # the rest of a checkpoint is left alone
    assert set(sampler_state_from_xgenmm(other, sampler)) == set(sampler.state_dict())
    with pytest.raises(CheckpointError, match=r"no name for \(1\): extra.*missing keys \(1\): norm.bias"):
        state = dict(sampler.state_dict(), extra=torch.zeros(1))
        del state["norm.bias"]
        sampler_state_to_xgenmm(state, 1)
