"""The model's promises: exact base LM at init, image masks, caches, generation, save/load."""

from __future__ import annotations

import pytest
import torch

from interleaf.errors import ConfigError, InputError

from tiny import CHUNK, IMAGE, LM_FAMILIES, images, tiny_model

TEXT = torch.tensor([[1, 5, 9, 17, 33, 4, 8, 2, 77, 45]])


@pytest.mark.parametrize("family", sorted(LM_FAMILIES))
def test_gates_at_init_give_the_base_lm_exactly(family):
    model, plain = tiny_model(family)
    with torch.no_grad():
        ours = model(input_ids=TEXT).logits
        ref = plain(input_ids=TEXT).logits
        # images in the prompt, zero gates: outside the image tokens themselves (whose embedding is
        # a new trainable row), the logits are the plain LM's
        ids = torch.tensor([[1, IMAGE, 9, 17, 33, IMAGE, 8, 2, 77, 45]])
        with_images = model(input_ids=ids, pixel_values=images(1, 2)).logits
        with_other_images = model(input_ids=ids, pixel_values=images(1, 2, seed=1)).logits
    assert ours.shape[-1] == 122  # base vocabulary + <image> + <|endofchunk|>
    assert (ours[..., :120] - ref).abs().max() <= 1e-6
    assert torch.isfinite(with_images).all()
    assert torch.equal(with_images, with_other_images)  # gates at zero: the pixels change nothing


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_trained_gates_still_leave_text_only_input_untouched(family):
    model, plain = tiny_model(family, gates=1.0)
    with torch.no_grad():
        assert (model(input_ids=TEXT).logits[..., :120] - plain(input_ids=TEXT).logits).abs().max() <= 1e-6


def _prompt_with_images():
    # two images; tokens 0..1 before image 0, 2..4 after image 0, 5..8 after image 1
    return torch.tensor([[1, 5, IMAGE, 9, 17, IMAGE, 33, 4, 8]])


def test_changing_image_k_changes_only_tokens_after_it():
    model, _ = tiny_model("llama", gates=1.0)
    ids = _prompt_with_images()
    pv = images(1, 2)
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=pv).logits
        pv0 = pv.clone()
        pv0[:, 0] = torch.randn_like(pv0[:, 0])
        changed0 = model(input_ids=ids, pixel_values=pv0).logits
        pv1 = pv.clone()
        pv1[:, 1] = torch.randn_like(pv1[:, 1])
        changed1 = model(input_ids=ids, pixel_values=pv1).logits
    diff0 = (changed0 - base).abs().amax(-1)[0]  # (T,)
    diff1 = (changed1 - base).abs().amax(-1)[0]
    assert diff0[:2].max() == 0  # before image 0: untouched
    assert (diff0[2:] > 1e-7).all()  # image 0's token and everything after it
    assert diff1[:5].max() == 0  # before image 1: untouched
    assert (diff1[5:] > 1e-7).all()


def test_one_block_sees_only_the_latest_image():
    model, _ = tiny_model("llama", gates=1.0)
    block = model.cross_attention_blocks[0]
    ids = _prompt_with_images()
    pv = images(1, 2)
    x = torch.randn(1, ids.shape[1], 32)

    def run(pixels):
        cache = model.prepare_media(ids, pixels)
        ctx = model._media_context(ids, cache, past_length=0)
        return block(x, ctx, 0)

    with torch.no_grad():
        base = run(pv)
        pv0 = pv.clone()
        pv0[:, 0] += 1.0
        out0 = run(pv0)
        pv1 = pv.clone()
        pv1[:, 1] += 1.0
        out1 = run(pv1)
    d0 = (out0 - base).abs().amax(-1)[0]
    d1 = (out1 - base).abs().amax(-1)[0]
    assert d0[:2].max() == 0 and d1[:2].max() == 0  # no image yet: no contribution at all
    assert (base[0, :2] == x[0, :2]).all()
    assert (d0[2:5] > 0).all() and d1[2:5].max() == 0  # latest image is image 0
    assert d0[5:].max() == 0 and (d1[5:] > 0).all()  # latest image is image 1


def test_loss_ignores_minus_100_and_adds_z_loss():
    model, _ = tiny_model("llama")
    ids = _prompt_with_images()
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=ids, pixel_values=images(1, 2), labels=labels)
    logits = out.logits[:, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)
    model.config.z_loss = 1e-3
    out_z = model(input_ids=ids, pixel_values=images(1, 2), labels=labels)
    lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1])[labels[:, 1:].reshape(-1) != -100], -1)
    assert torch.allclose(out_z.loss, ref + 1e-3 * lse.pow(2).mean())


def _batch():
    """A left-padded batch: row 0 has two images, row 1 none, row 2 one."""
    rows = [
        [1, IMAGE, 5, 9, CHUNK, IMAGE, 17, 33],
        [1, 44, 45, 46],
        [1, 7, IMAGE, 8, 9],
    ]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    pv = images(3, 2)
    return rows, ids, mask, pv


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_left_padded_batch_equals_each_row_alone(family):
    model, _ = tiny_model(family, gates=0.7)
    rows, ids, mask, pv = _batch()
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        gen_batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=6,
                                     do_sample=False, pad_token_id=0)
    for r, row in enumerate(rows):
        alone_ids = torch.tensor([row])
        with torch.no_grad():
            alone = model(input_ids=alone_ids, pixel_values=pv[r:r + 1]).logits
            gen_alone = model.generate(input_ids=alone_ids, pixel_values=pv[r:r + 1], max_new_tokens=6,
                                       do_sample=False, pad_token_id=0)
        assert (batched[r, -len(row):] - alone[0]).abs().max() <= 1e-5
        assert gen_batched[r, ids.shape[1]:].tolist() == gen_alone[0, len(row):].tolist()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_cache_equals_without(num_beams):
    model, _ = tiny_model("llama", gates=0.7)
    _, ids, mask, pv = _batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=8, do_sample=False,
                  num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**kwargs, use_cache=True)
        uncached = model.generate(**kwargs, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_decoding_steps_never_recompute_images_or_keys():
    model, _ = tiny_model("llama", gates=0.7)
    _, ids, mask, pv = _batch()
    calls: list[tuple[str, tuple]] = []
    top_calls = []
    handles = [model.register_forward_pre_hook(lambda m, a, k: top_calls.append(1), with_kwargs=True)]
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: calls.append((name, len(top_calls), _first_tensor_shape(args, kwargs))),
                with_kwargs=True))
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=5,
                                 do_sample=False, num_beams=2, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    assert out.shape[1] == ids.shape[1] + 5  # no EOS among these random logits' greedy choices
    assert len(top_calls) == 5  # one forward call per new token: the prefill, then four single-token steps
    vision_calls = [c for c in calls if c[0].startswith(("vision_tower", "resampler"))]
    assert vision_calls and all(step == 0 for _, step, _ in vision_calls)  # encoded before the first step
    kv_calls = [c for c in calls if c[0].endswith(("cross_attention.k_proj", "cross_attention.v_proj"))]
    assert len(kv_calls) == 2 * len(model.cross_attention_blocks)  # once per block and call, beams included
    assert all(step == 1 for _, step, _ in kv_calls)  # during the prefill
    rows = ids.shape[0] * 2
    later = [(n, s, shape) for n, s, shape in calls if s >= 2]
    assert later
    for name, step, shape in later:
        module = model.get_submodule(name)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or name.endswith(("embed_tokens", "lm_head")):
            positions = int(torch.tensor(shape[:-1]).prod()) if isinstance(module, torch.nn.Linear) or name.endswith("lm_head") else int(torch.tensor(shape).prod())
            assert positions == rows, f"{name} got {shape} at step {step}"


def _first_tensor_shape(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if torch.is_tensor(a):
            return tuple(a.shape)
    return ()


def test_generation_options():
    model, _ = tiny_model("llama", gates=0.7)
    _, ids, mask, pv = _batch()
    base = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pad_token_id=0)
    greedy = model.generate(**base, max_new_tokens=6, do_sample=False)
    first = greedy[:, ids.shape[1]]
    # bad_words_ids forbids the greedy choice
    banned = model.generate(**base, max_new_tokens=6, do_sample=False, bad_words_ids=[[int(t)] for t in first])
    assert not (banned[:, ids.shape[1]] == first).any()
    # several EOS ids: stopping at whichever comes first
    eos = [int(first[0]), int(greedy[0, ids.shape[1] + 1])]
    stopped = model.generate(**base, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert stopped[0, ids.shape[1]] == eos[0] and stopped.shape[1] <= greedy.shape[1]
    # min_new_tokens suppresses EOS
    long = model.generate(**base, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert long.shape[1] == ids.shape[1] + 6 and int(long[0, ids.shape[1]]) not in eos
    # sampling is reproducible with a seed and differs from greedy somewhere
    torch.manual_seed(0)
    s1 = model.generate(**base, max_new_tokens=6, do_sample=True, temperature=5.0, top_k=0)
    torch.manual_seed(0)
    s2 = model.generate(**base, max_new_tokens=6, do_sample=True, temperature=5.0, top_k=0)
    assert s1.tolist() == s2.tolist() and s1.tolist() != greedy.tolist()
    # several return sequences from beams share the images
    beams = model.generate(**base, max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 6


def test_freeze_policies():
    model, _ = tiny_model("llama")
    n_flamingo = model.apply_freeze("flamingo")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("cross_attention" in n or n.startswith("resampler") or n.endswith(".extra")) for n in trainable)
    assert not any(n.startswith("vision_tower") for n in trainable)
    assert any(n.endswith("embed_tokens.extra") for n in trainable) and any(n.endswith("lm_head.extra") for n in trainable)
    assert not model.get_input_embeddings().weight.requires_grad
    n_vision = model.apply_freeze("flamingo_train_vision")
    assert n_vision == n_flamingo + sum(p.numel() for p in model.vision_tower.parameters())
    n_lm = model.apply_freeze("unfreeze_lm")
    assert n_lm > n_flamingo and model.get_input_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    n_all = model.apply_freeze("all_trainable")
    assert n_all == model.num_parameters() > n_lm
    with pytest.raises(InputError, match="unknown freeze policy 'frozen'"):
        model.apply_freeze("frozen")


def test_training_moves_only_what_the_policy_trains():
    model, _ = tiny_model("llama")
    model.apply_freeze("flamingo")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _prompt_with_images()
    for _ in range(3):
        loss = model(input_ids=ids, pixel_values=images(1, 2), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("attn_gate" in n for n in moved) and any(n.startswith("resampler") for n in moved)
    assert not any(n.startswith("vision_tower") for n in moved)
    assert not any(n.endswith("embed_tokens.weight") or ".decoder_layer." in n for n in moved)


def test_config_errors_name_the_field():
    from interleaf.config import InterleafConfig

    with pytest.raises(ConfigError, match=r"cross_attention\.every_n_layers"):
        InterleafConfig(cross_attention={"every_n_layers": 0})
    with pytest.raises(ConfigError, match=r"cross_attention\.gate_init"):
        InterleafConfig(cross_attention={"gate_init": "sometimes"})
    with pytest.raises(ConfigError, match=r"resampler\.heads"):
        InterleafConfig(resampler={"heads": -1})
    with pytest.raises(ConfigError, match=r"vision\.patch_size"):
        InterleafConfig(vision={"image_size": 30, "patch_size": 4})
    with pytest.raises(ConfigError, match=r"vision\.colour.*known fields"):
        InterleafConfig(vision={"colour": 1})
    with pytest.raises(ConfigError, match=r"cross_attention\.layers.*out of range"):
        tiny_model("llama", cross_attention={"layers": [0, 5]})
    with pytest.raises(ConfigError, match=r"^config field 'freeze'"):
        InterleafConfig(freeze="some")


def test_cross_attention_layer_choice():
    model, _ = tiny_model("llama", cross_attention={"every_n_layers": 2})
    assert len(model.cross_attention_blocks) == 1  # before layer 1 only ((i + 1) % 2 == 0)
    layers = model.language_model.model.layers
    assert type(layers[0]).__name__ != "CrossAttentionDecoderLayer"
    assert type(layers[1]).__name__ == "CrossAttentionDecoderLayer"
    model, _ = tiny_model("llama", cross_attention={"layers": [0]})
    assert type(model.language_model.model.layers[0]).__name__ == "CrossAttentionDecoderLayer"


def test_more_image_tokens_than_images_is_an_error():
    model, _ = tiny_model("llama")
    ids = torch.tensor([[1, IMAGE, 5, IMAGE, 6]])
    with pytest.raises(InputError, match="batch row 0 has 2 image tokens but pixel_values holds 1"):
        model(input_ids=ids, pixel_values=images(1, 1))
    with pytest.raises(InputError, match=r"\(batch, images, 3, height, width\)"):
        model(input_ids=ids, pixel_values=torch.zeros(3, 16, 16))


def test_media_context_does_not_outlive_the_call():
    from interleaf.model.cross_attention import current_media

    model, _ = tiny_model("llama", gates=0.5)
    assert current_media() is None
    model(input_ids=_prompt_with_images(), pixel_values=images(1, 2))
    assert current_media() is None


def test_model_moves_between_dtypes_and_devices():
    model, _ = tiny_model("llama", gates=0.5)
    ids = _prompt_with_images()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=images(1, 2)).logits
        model.to(torch.float64).to("cpu")
        assert next(model.parameters()).dtype == torch.float64
        out = model(input_ids=ids, pixel_values=images(1, 2).double()).logits
    assert (out.float() - ref).abs().max() < 1e-4
