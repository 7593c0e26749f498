"""The seeds' architectures as presets: IDEFICS, OpenFlamingo and InfiMM, at their real sizes.

``interleaf.build("idefics-9b", device="meta")`` builds the architecture without memory (random
weights otherwise); real weights come from the converters (:mod:`interleaf.convert`). The LMs are
written out as transformers configs. These presets carry no tokenizer (``tokenizer="none"``):
their vocabularies are sized from the config, and the IDEFICS / OpenFlamingo special tokens sit
where the released checkpoints put them (``tokens.extra_start`` / ``image_token_id``).

Dimensions (REFERENCE.md and the released configs):

- IDEFICS-9B: LLaMA-7B + CLIP ViT-H/14 (224 px, width 1280); perceiver 6 x 64 latents, 16 heads
  x 96, q/k norms; cross-attention before every 4th layer (0, 4, ...), q/k RMSNorm; 2 added
  tokens (``<fake_token_around_image>`` 32000, ``<image>`` 32001). IDEFICS-80B: LLaMA-65B.
- OpenFlamingo: CLIP ViT-L/14 (open_clip's, = OpenAI's), patch tokens after ``ln_post``;
  perceiver 6 x 64 latents, 8 heads x 64; cross-attention 8 heads x 64, LayerNorm, GELU x4; 3B:
  MPT-1B every layer, 4B: RedPajama-INCITE-3B (GPT-NeoX) every 2nd, 9B: MPT-7B every 4th. The
  embedding is resized to the tokenizer plus ``<|endofchunk|>``, ``<image>``, ``<PAD>`` (50280).
- xGen-MM (BLIP-3) r-v1.5 (``xgen-mm-phi3-mini``: base, instruct and DPO share it): SigLIP so400m/14 at
  384 px (post-LN ``last_hidden_state``, all 729 tokens), the perceiver token sampler (6 layers, 128
  latents, 16 heads x 96, 1152 -> 3072), Phi-3-mini; 3 decoupled rows (``<image>`` 32012, ``<image
  placeholder>`` 32013, ``<|endofchunk|>`` 32014) and xGen-MM's biased head; anyres with the (W, H) grids
  (1,2), (2,1), (2,2), (3,1), (1,3) x 384. The preset is the instruct form (one ``<image>`` per image,
  replaced by its anyres tokens); the base checkpoint's format is ``interleaf convert xgen-mm --mode base``.
- InfiMM (the released config.json files): ``infimm-zephyr-7b`` is EVA02-CLIP-L/14 at 336 px (RoPE,
  SwiGLU, sub-LN) + Zephyr-7B-beta (Mistral) with cross-attention before every 2nd layer (1, 3, ...,
  31); ``infimm-vicuna-13b`` is EVA-CLIP-4B (EVA02-CLIP-bigE-14's tower, post-norm) at 224 px +
  Vicuna-13B-v1.5 with cross-attention before every 4th layer (3, 7, ..., 39). Both: the perceiver
  as InfiMM's code builds it (6 x 64 latents, 8 heads x 64, no projection; its model card's 16 x 96
  is not what loads the weights), OpenFlamingo's gated cross-attention (8 heads x 64), and 32002
  token rows: ``<|endofchunk|>`` 32000 and ``<image>`` 32001 after the LM's 32000. The towers are
  written as InfiMM's ``visual`` config dicts for the EVA-CLIP vision kind; transformers has no
  EVA-CLIP, so these presets declare the tower unavailable (``Preset.unavailable``) and building
  them raises an error that says so. ``infimm-llama2-13b`` (Llama-2-13B + a "ViT-G-224" tower, says
  its card) has no public config: its tower and cross-attention interval are not established, and
  the preset says so.
- LLaVA-NeXT (v1.6, llava-hf's ``llava-v1.6-mistral-7b-hf`` / ``llava-v1.6-vicuna-7b-hf``): CLIP
  ViT-L/14 at 336 px read at its penultimate layer without the class token, a two-layer GELU
  MLP, any-resolution tiling over five grids (pinpoints (height, width) 336x672, 672x336,
  672x672, 1008x336, 336x1008) with a learned ``image_newline``; Mistral-7B-Instruct-v0.2 or
  Vicuna-7B-v1.5 with the checkpoints' 32064-row vocabulary, ``<image>`` = 32000.
"""

from __future__ import annotations

from typing import Any

from .registry import Preset, register

# -- vision towers (transformers CLIPVisionConfig fields) --

CLIP_VIT_H14 = dict(  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as IDEFICS uses it
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
    image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
)
CLIP_VIT_L14 = dict(  # OpenAI ViT-L/14 (open_clip "ViT-L-14", "openai")
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

# -- language models (transformers configs) --

LLAMA_7B = dict(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=2048,
    rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
LLAMA_65B = {**LLAMA_7B, "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 64, "rms_norm_eps": 1e-5}
LLAMA2_13B = {**LLAMA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5}
MISTRAL_7B = dict(  # Zephyr-7B-beta
    model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-5, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
OPENFLAMINGO_VOCAB = 50280  # gpt-neox-20b tokenizer (50277) + <|endofchunk|>, <image>, <PAD>
MPT_1B = dict(
    model_type="mpt", vocab_size=OPENFLAMINGO_VOCAB, d_model=2048, n_heads=16, n_layers=24, expansion_ratio=4,
    max_seq_len=2048, no_bias=True, attn_config=dict(alibi=True, attn_impl="torch"), tie_word_embeddings=True,
)
MPT_7B = {**MPT_1B, "d_model": 4096, "n_heads": 32, "n_layers": 32}
REDPAJAMA_3B = dict(  # RedPajama-INCITE-Base-3B-v1
    model_type="gpt_neox", vocab_size=OPENFLAMINGO_VOCAB, hidden_size=2560, intermediate_size=10240,
    num_hidden_layers=32, num_attention_heads=32, rotary_pct=1.0, use_parallel_residual=False,
    max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
)

# -- the fusion parts --

IDEFICS_RESAMPLER = dict(depth=6, num_latents=64, heads=16, head_dim=96, ff_mult=4, qk_norm=True, activation="relu")
OPENFLAMINGO_RESAMPLER = dict(depth=6, num_latents=64, heads=8, head_dim=64, ff_mult=4, activation="gelu")
OPENFLAMINGO_XATTN = dict(
    heads=8, head_dim=64, norm="layer", ffn="plain", activation="gelu", gate_init="zeros",
    ffn_without_image=True, norm_eps=1e-5,
)


def _idefics_xattn(num_layers: int, interval: int, text: dict) -> dict[str, Any]:
    return dict(
        layers=list(range(0, num_layers, interval)), heads=text["num_attention_heads"],
        head_dim=text["hidden_size"] // text["num_attention_heads"], qk_norm=True, norm="rms", ffn="gated",
        ffn_dim=text["intermediate_size"], activation="silu", gate_init="zeros", gate_shape="scalar",
        ffn_without_image=True, norm_eps=text["rms_norm_eps"],
    )


def _idefics(name: str, text: dict, size: str) -> Preset:
    return Preset(
        name=name,
        description=f"IDEFICS-{size} architecture: {'LLaMA-7B' if size == '9B' else 'LLaMA-65B'} + CLIP ViT-H/14, "
        "cross-attention every 4 layers (random weights; convert real ones with `interleaf convert idefics`)",
        vision=dict(kind="clip", hf_config=CLIP_VIT_H14, feature_layer=-1, resize="squash"),
        resampler=IDEFICS_RESAMPLER,
        cross_attention=_idefics_xattn(text["num_hidden_layers"], 4, text),
        text_config=text,
        tokens=dict(prompt_format="idefics", extra_start=32000, num_extra=2, image_token_id=32001),
        tokenizer="none",
        note="Matches transformers' IdeficsForVisionText2Text parameter for parameter.",
    )


def _openflamingo(name: str, text: dict, every: int, lm: str, note: str) -> Preset:
    return Preset(
        name=name,
        description=f"OpenFlamingo architecture: CLIP ViT-L/14 + {lm}, cross-attention every {every} layer(s)",
        vision=dict(kind="clip", hf_config=CLIP_VIT_L14, feature_layer=-1, drop_cls_token=True, post_layernorm=True),
        resampler=OPENFLAMINGO_RESAMPLER,
        cross_attention=dict(every_n_layers=every, **OPENFLAMINGO_XATTN),
        text_config=text,
        tokens=dict(prompt_format="openflamingo", extra_start=50277, num_extra=3, image_token_id=50278),
        tokenizer="none",
        note=note,
    )


# -- xGen-MM (BLIP-3) r-v1.5 --

SIGLIP_SO400M_384 = dict(  # google/siglip-so400m-patch14-384's vision config
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, num_channels=3,
    image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    vision_use_head=True,
)
PHI3_MINI_4K = dict(  # microsoft/Phi-3-mini-4k-instruct, as xGen-MM's config holds it (Phi3Config's defaults)
    model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
    original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=2047,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
)
XGENMM_INITIAL_TOKENIZER_LEN = 32012  # Phi-3's tokenizer with <pad>; xGen-MM's 3 tokens follow
# The instruct checkpoints' chat template (VLMEvalKit, LAVIS conv_phi_3), one "<image> " per image in the
# user's content, no BOS; generation stops at <|end|> (id 32007), padding on the left with <pad> (32011).
XGENMM_INSTRUCT_TEMPLATE = (
    "<|system|>\nA chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.<|end|>\n<|user|>\n{content}<|end|>\n"
    "<|assistant|>\n"
)
XGENMM_STOP_TOKEN = "<|end|>"
XGENMM_STOP_TOKEN_ID = 32007
XGENMM_PAD_TOKEN_ID = 32011
# XGENMM_INSTRUCT_TEMPLATE as a chat template: a system message replaces the default system text; the user's
# and the assistant's turns follow LAVIS' conv_phi_3 ("<|role|>\n{text}<|end|>\n"); images are written by the
# processor as "<image> " where they stand in the message. {% generation %} marks the trained assistant text.
XGENMM_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = 'A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s "
    "questions.' %}{% set turns = messages %}{% endif %}"
    "<|system|>\n{{ system }}<|end|>\n"
    "{% for message in turns %}{% if message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>\n{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _xgenmm(name: str) -> Preset:
    return Preset(
        name=name,
        description="xGen-MM (BLIP-3) r-v1.5 architecture: SigLIP so400m/14 (384 px, anyres) + perceiver token "
        "sampler (128 tokens per view) + Phi-3-mini (random weights; convert the released ones with "
        "`interleaf convert xgen-mm`)",
        vision=dict(kind="siglip", hf_config=SIGLIP_SO400M_384, feature_layer=-1, post_layernorm=True,
                    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), resize="squash"),
        resampler={},
        cross_attention={},
        text_config=PHI3_MINI_4K,
        tokens=dict(prompt_format="llava", image_token="<image>", image_seq_length=1,
                    extra_start=XGENMM_INITIAL_TOKENIZER_LEN, num_extra=3,
                    image_token_id=XGENMM_INITIAL_TOKENIZER_LEN, decoupled_head="xgenmm"),
        tokenizer="none",
        freeze="projector_lm",
        fusion="token_insertion",
        projector=dict(kind="token_sampler", token_sampler=dict(dim=1152, out_dim=3072, depth=6, num_latents=128,
                                                                heads=16, head_dim=96, ff_mult=4)),
        insertion=dict(placement="replace", anyres=dict(convention="xgenmm", base_size=384, patch_size=14)),
        chat_template=XGENMM_CHAT_TEMPLATE,
        stop_token=XGENMM_STOP_TOKEN,
        generation=dict(eos_token_id=XGENMM_STOP_TOKEN_ID, pad_token_id=XGENMM_PAD_TOKEN_ID),
        note="Real weights: download a released checkpoint (Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5, "
        "-instruct-singleimg-, -instruct-dpo- or -base-r-v1.5: config.json, the model*.safetensors shards with their "
        "index, the tokenizer files) and run `interleaf convert xgen-mm <that folder> <output>` (add --mode base "
        "for the base model). The instruct prompt is XGENMM_INSTRUCT_TEMPLATE (the preset's chat_template), "
        "generation stops at <|end|> (32007) and pads with <pad> (32011) on the left. The SigLIP MAP head is built and counted (the checkpoint holds it) but never used.",
    )


# -- InfiMM (Infi-MM/infimm-zephyr and Infi-MM/infimm-vicuna13b config.json values) --

# The towers of the released configs' "visual" dicts, as interleaf's EVA-CLIP vision kind takes them
# (interleaf.model.eva_clip.eva_vision_config maps a "visual" dict to exactly these; the tests check it).
# The features InfiMM takes: the last block's output, every token (class token first), no final norm;
# the final norm and the head (to embed_dim) are in the checkpoints, built and counted, but unused.
INFIMM_PREPROCESSING = dict(  # InfiMM's processor: Resize(shortest edge, bicubic), CenterCrop, OpenAI CLIP's statistics
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
    resize="shortest_edge_crop",
)
INFIMM_ZEPHYR_VISION = dict(  # EVA02-CLIP-L/14-336: "eva-clip-l-14-336", head_width 64
    kind="eva_clip", image_size=336, patch_size=14, width=1024, layers=24, heads=16,
    eva=dict(mlp_ratio=2.6667, rope=True, pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True,
             embed_dim=768),
    **INFIMM_PREPROCESSING,
)
INFIMM_VICUNA_VISION = dict(  # EVA-CLIP-4B ("eva-clip-4b-14-x"), the vision tower of EVA02-CLIP-bigE-14, head_width 112
    kind="eva_clip", image_size=224, patch_size=14, width=1792, layers=64, heads=16,
    eva=dict(mlp_ratio=8.571428571428571, postnorm=True, embed_dim=1024),
    **INFIMM_PREPROCESSING,
)
# The LMs as the checkpoints hold them: 32002 rows, InfiMM's two added tokens (<|endofchunk|> 32000,
# <image> 32001) among the LM's own rows, as `interleaf convert infimm` writes them.
ZEPHYR_7B_BETA = {**MISTRAL_7B, "vocab_size": 32002, "pad_token_id": 2, "rope_theta": 10000.0}
VICUNA_13B_V15_BASE = {**LLAMA2_13B, "vocab_size": 32002}  # lmsys/vicuna-13b-v1.5: Llama-2-13B's dimensions
INFIMM_TOKENS = dict(prompt_format="openflamingo", image_token_id=32001)
INFIMM_RESAMPLER = OPENFLAMINGO_RESAMPLER  # InfiMM's PerceiverResampler defaults: 6 x 64 latents, 8 heads x 64
# OpenFlamingo's blocks; InfiMM's per-row flag: a row without an <image> skips every gated block
INFIMM_XATTN = dict(OPENFLAMINGO_XATTN, skip_rows_without_image=True)


def _eva_clip_unavailable(tower: str) -> str:
    return (
        f"this preset's vision tower is EVA-CLIP ({tower}) and its dimensions are not established from public "
        "facts; build it with a tower you know: interleaf.build(vision=<local CLIP, SigLIP or EVA-CLIP "
        "directory>, lm=..., cross_attention=..., resampler=...)"
    )


def _infimm(name: str, text: dict, lm: str, vision: dict, every: int, tower: str) -> Preset:
    return Preset(
        name=name,
        description=f"InfiMM architecture: EVA-CLIP tower {tower} ({vision['image_size']} px) + {lm}, "
        f"cross-attention every {every} layers (random weights; convert real ones with `interleaf convert infimm`)",
        vision=dict(vision, eva=dict(vision["eva"])),
        resampler=dict(INFIMM_RESAMPLER),
        cross_attention=dict(every_n_layers=every, **INFIMM_XATTN),
        text_config=text,
        tokens=dict(INFIMM_TOKENS),
        tokenizer="none",
        note="The perceiver is what InfiMM's code builds and its checkpoints hold (8 heads x 64); its model card's "
        "16 heads x 96 is not. Images: shortest edge to the tower's size (bicubic), centre crop, OpenAI CLIP's "
        "mean and std; chat prompts with an empty system turn first (InterleafProcessor(..., default_system='')). "
        "Real weights: download the released folder (config.json, pytorch_model.bin, the tokenizer files) and run "
        "`interleaf convert infimm <that folder> <output>`.",
    )


def _infimm_llama2_13b() -> Preset:
    """Infi-MM/infimm-llama13b: its card names the parts, but no public config gives their dimensions."""
    return Preset(
        name="infimm-llama2-13b",
        description="InfiMM architecture: EVA-CLIP (\"ViT-G-224\" per its card) + LLaMA2-13B; tower and "
        "cross-attention interval not established from public facts",
        vision={},
        resampler=dict(INFIMM_RESAMPLER),
        cross_attention=dict(INFIMM_XATTN),  # the interval (every_n_layers) is not known
        text_config=VICUNA_13B_V15_BASE,  # Llama-2-13B's dimensions, 32002 rows
        tokens=dict(INFIMM_TOKENS),
        tokenizer="none",
        note="Infi-MM/infimm-llama13b's config.json was not found in public sources: its model card names "
        "Llama-2-13B and a 224 px \"ViT-G-224\" EVA-CLIP tower (probably EVA01-CLIP-g/14, unverified).",
        unavailable=_eva_clip_unavailable('"ViT-G-224" per the model card') + "; its cross-attention interval "
        "is not established either (the released config.json was not found), so it cannot state the architecture",
    )


# -- LLaVA-NeXT (llava-hf/llava-v1.6-*-hf config.json values) --

CLIP_VIT_L14_336 = {**CLIP_VIT_L14, "image_size": 336}  # openai/clip-vit-large-patch14-336
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (height, width) in px
LLAVA_NEXT_VOCAB = 32064  # the llava-hf checkpoints' padded vocabulary; <image> is id 32000
MISTRAL_7B_INSTRUCT_V02 = dict(  # mistralai/Mistral-7B-Instruct-v0.2, as llava-v1.6-mistral-7b-hf's text_config
    model_type="mistral", vocab_size=LLAVA_NEXT_VOCAB, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1_000_000.0, sliding_window=None,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
VICUNA_7B_V15 = {**LLAMA_7B, "vocab_size": LLAVA_NEXT_VOCAB, "max_position_embeddings": 4096,
                 "rms_norm_eps": 1e-5}  # lmsys/vicuna-7b-v1.5, as llava-v1.6-vicuna-7b-hf's text_config
# The prompts the llava-hf model cards use, as chat templates (set tokenizer.chat_template to use them).
LLAVA_NEXT_CHAT_TEMPLATES = {
    "llava-v1.6-mistral-7b": (
        "{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
        "{% else %}{{ message['content'] }}</s>{% endif %}{% endfor %}"
    ),
    "llava-v1.6-vicuna-7b": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. {% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: {{ message['content'] }} {% else %}ASSISTANT: "
        "{{ message['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
}


# -- LLaVA-1.5 (llava-hf/llava-1.5-{7b,13b}-hf config.json values) --

VICUNA_13B_V15 = {**LLAMA2_13B, "vocab_size": LLAVA_NEXT_VOCAB}  # lmsys/vicuna-13b-v1.5, as llava-1.5-13b-hf's
LLAVA_15_CHAT_TEMPLATE = (  # the llava-hf model cards' prompt: "USER: <image>\n... ASSISTANT:"
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _llava_15(name: str, text: dict, lm: str) -> Preset:
    return Preset(
        name=name,
        description=f"LLaVA-1.5 architecture: CLIP ViT-L/14-336 + two-layer MLP projector + {lm}, 576 image "
        "tokens (random weights; convert real ones with `interleaf convert llava`)",
        vision=dict(kind="clip", hf_config=CLIP_VIT_L14_336, feature_layer=-2, drop_cls_token=True),
        resampler={},
        cross_attention={},
        fusion="token_insertion",
        projector=dict(kind="mlp2x_gelu", activation="gelu", bias=True),
        insertion=dict(placement="expand"),
        tokens=dict(prompt_format="llava", image_token_id=32000, image_seq_length=576),  # (336 / 14) ** 2
        freeze="projector",
        text_config=text,
        tokenizer="none",
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        stop_token="</s>",
        generation=dict(eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"]),
        note=(f"Matches transformers' LlavaForConditionalGeneration parameter for parameter. Real weights: "
              f"download llava-hf/{name}-hf (its processor files included) and run `interleaf convert llava "
              "<that directory> <output>`. Prompt: LLAVA_15_CHAT_TEMPLATE; images are 336 px (shortest edge, "
              "centre crop) with CLIP's mean and std."),
    )


def _llava_next(name: str, text: dict, lm: str) -> Preset:
    return Preset(
        name=name,
        description=f"LLaVA-NeXT (v1.6) architecture: CLIP ViT-L/14-336 + {lm}, any-resolution tiling "
        "(random weights; convert real ones with `interleaf convert llava-next`)",
        vision=dict(kind="clip", hf_config=CLIP_VIT_L14_336, feature_layer=-2, drop_cls_token=True),
        resampler={},
        cross_attention={},
        fusion="token_insertion",
        projector=dict(kind="mlp2x_gelu", activation="gelu", bias=True),
        insertion=dict(placement="expand", anyres=dict(convention="llava_next", base_size=336, patch_size=14,
                                                       grids=LLAVA_NEXT_PINPOINTS, max_crops=4)),
        tokens=dict(prompt_format="llava", image_token_id=32000),
        freeze="projector",
        text_config=text,
        tokenizer="none",
        chat_template=LLAVA_NEXT_CHAT_TEMPLATES[name],
        stop_token="</s>",
        generation=dict(eos_token_id=text["eos_token_id"]),
        note=(f"Matches transformers' LlavaNextForConditionalGeneration parameter for parameter. Real weights: "
              f"download llava-hf/{name}-hf (its processor files included) and run `interleaf convert llava-next "
              f"<that directory> <output>`. Prompt: LLAVA_NEXT_CHAT_TEMPLATES[{name!r}]; images are 336 px views "
              "with CLIP's mean and std."),
    )


for _preset in (
    _llava_15("llava-1.5-7b", VICUNA_7B_V15, "Vicuna-7B-v1.5"),
    _llava_15("llava-1.5-13b", VICUNA_13B_V15, "Vicuna-13B-v1.5"),
    _llava_next("llava-v1.6-mistral-7b", MISTRAL_7B_INSTRUCT_V02, "Mistral-7B-Instruct-v0.2"),
    _llava_next("llava-v1.6-vicuna-7b", VICUNA_7B_V15, "Vicuna-7B-v1.5"),
    _idefics("idefics-9b", LLAMA_7B, "9B"),
    _idefics("idefics-80b", LLAMA_65B, "80B"),
    _openflamingo(
        "openflamingo-3b", MPT_1B, 1, "MPT-1B",
        "MPT-1B (mosaicml mpt-1b-redpajama-200b) is custom 'mosaic_gpt' code; the closest transformers family is "
        "MPT (same blocks, ALiBi, no biases, tied embedding), used here. transformers' MPT has no q/k LayerNorm "
        "(MosaicGPT's attn_qk_ln), so the real MPT-1B weights need that added before they load.",
    ),
    _openflamingo(
        "openflamingo-4b", REDPAJAMA_3B, 2, "RedPajama-INCITE-3B",
        "RedPajama-INCITE-Base-3B is GPT-NeoX; its 50432-row embedding is resized to 50280 as OpenFlamingo does.",
    ),
    _openflamingo(
        "openflamingo-9b", MPT_7B, 4, "MPT-7B",
        "MPT-7B is transformers' MPT; its 50432-row embedding is resized to 50280 as OpenFlamingo does.",
    ),
    _xgenmm("xgen-mm-phi3-mini"),
    _infimm("infimm-zephyr-7b", ZEPHYR_7B_BETA, "Zephyr-7B-beta", INFIMM_ZEPHYR_VISION, 2, "EVA02-CLIP-L/14"),
    _infimm_llama2_13b(),
    _infimm("infimm-vicuna-13b", VICUNA_13B_V15_BASE, "Vicuna-13B-v1.5", INFIMM_VICUNA_VISION, 4, "EVA-CLIP-4B"),
):
    register(_preset)
