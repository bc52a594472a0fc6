"""Stable Diffusion model families and checkpoint layouts, as data.

Adding a family means adding a record here (and a test), not editing branches elsewhere.
A family is recognised from the text encoder(s) a checkpoint carries; the UNet's cross-attention
width must then equal the text encoders' total width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where one text encoder lives and how its embeddings are taken (DESIGN.md §3)."""

    role: str                         # "text_encoder", "text_encoder_2"
    single_file_prefixes: tuple[str, ...]  # tried in order; first with keys wins
    weights_format: str               # "hf_clip" (transformers layout) or "open_clip"
    hidden_act: str                   # for single files, which carry no config
    hidden_state: str                 # single files: "last" (after final LayerNorm), "penultimate_norm"
                                      # (penultimate layer, then the final LayerNorm), "penultimate"
    folder_hidden_state: str          # diffusers folders: the same rows, from diffusers' copy of the tower
    pad: str                          # "eos" (<|endoftext|>) or "zero" (id 0)
    tokenizer_folder: str             # diffusers folder holding its tokenizer


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    modelspec_architecture: str
    context_dim: int                  # the real models' cross-attention width
    real_kv_count: int                # K/V matrices in the real UNet
    real_unet_params: int             # UNet parameters in the real config
    single_file_marker: str           # a key prefix only this family's single files carry
    text_encoders: tuple[TextEncoderLayout, ...]


SD1_CLIP = TextEncoderLayout(
    role="text_encoder",
    single_file_prefixes=("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."),
    weights_format="hf_clip", hidden_act="quick_gelu", hidden_state="last", folder_hidden_state="last",
    pad="eos", tokenizer_folder="tokenizer")
# diffusers' converter drops the last of OpenCLIP ViT-H's 24 blocks (SD 2.x conditions on the
# penultimate one), so a folder's 23-layer text_encoder gives the same rows as `last`.
SD2_OPENCLIP = TextEncoderLayout(
    role="text_encoder", single_file_prefixes=("cond_stage_model.model.",),
    weights_format="open_clip", hidden_act="gelu", hidden_state="penultimate_norm",
    folder_hidden_state="last", pad="zero", tokenizer_folder="tokenizer")
SDXL_CLIP_L = TextEncoderLayout(
    role="text_encoder", single_file_prefixes=("conditioner.embedders.0.transformer.text_model.",
                                                 "conditioner.embedders.0.transformer."),
    weights_format="hf_clip", hidden_act="quick_gelu", hidden_state="penultimate",
    folder_hidden_state="penultimate", pad="eos", tokenizer_folder="tokenizer")
SDXL_OPENCLIP_G = TextEncoderLayout(
    role="text_encoder_2", single_file_prefixes=("conditioner.embedders.1.model.",),
    weights_format="open_clip", hidden_act="gelu", hidden_state="penultimate",
    folder_hidden_state="penultimate", pad="zero", tokenizer_folder="tokenizer_2")

FAMILIES: tuple[Family, ...] = (
    Family("sd1", "Stable Diffusion 1.x", "stable-diffusion-v1", 768, 32, 859_520_964,
           "cond_stage_model.transformer.", (SD1_CLIP,)),
    Family("sd2", "Stable Diffusion 2.x", "stable-diffusion-v2", 1024, 32, 865_910_724,
           "cond_stage_model.model.", (SD2_OPENCLIP,)),
    Family("sdxl", "Stable Diffusion XL", "stable-diffusion-xl-v1-base", 2048, 140, 2_567_463_684,
           "conditioner.embedders.", (SDXL_CLIP_L, SDXL_OPENCLIP_G)),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class Layout:
    """How UNet keys are spelled in one on-disk layout."""

    name: str
    kv_pattern: re.Pattern            # a cross-attention key/value projection weight
    unet_prefix: str                  # what every UNet tensor key starts with
    kv_lookalike: re.Pattern          # anything that smells like a K/V copy we must not miss


SINGLE_FILE = Layout(
    name="single-file",
    kv_pattern=re.compile(r"^model\.diffusion_model\.(?:.+\.)?attn2\.to_[kv]\.weight$"),
    unet_prefix="model.diffusion_model.",
    kv_lookalike=re.compile(r"attn2\.?to_?[kv]"),
)
DIFFUSERS = Layout(
    name="diffusers",
    kv_pattern=re.compile(r"^(?:.+\.)?attn2\.to_[kv]\.weight$"),
    unet_prefix="",
    kv_lookalike=re.compile(r"attn2\.?to_?[kv]"),
)

EMA_PREFIX = "model_ema."


def ema_twin(kv_key: str) -> str:
    """`model.diffusion_model.a.b.attn2.to_k.weight` → `model_ema.diffusion_modelabattn2to_kweight`."""
    return EMA_PREFIX + kv_key[len("model."):].replace(".", "")
