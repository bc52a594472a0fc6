"""Tiny Stable Diffusion 1.x / 2.x / XL checkpoints with RANDOM weights, in the real on-disk layouts.

THE WEIGHTS ARE RANDOM. A checkpoint written here has the key names, nesting, shapes (scaled
down, unless ``full_size``) and file formats of a real SD 1.x, SD 2.x or SDXL-base release, but
it is not a usable model: it generates noise. It exists so that ``make demo``, the tests and the
benchmarks can exercise every code path that reads, edits and writes checkpoints without
downloading gigabytes, and without any network access.

Two layouts are produced, for each family (``TINY_FAMILIES``: ``sd1``, ``sd2``, ``sdxl``):

* a single ``.safetensors`` in the CompVis/LDM (SD 1.x, 2.x) or Stability ``sgm`` (SDXL) layout
  that A1111 and ComfyUI use (``model.diffusion_model.*``, ``first_stage_model.*``, the text
  encoder(s) under ``cond_stage_model.*`` or ``conditioner.embedders.N.*``, OpenCLIP towers in
  OpenCLIP's own names), optionally with the flattened ``model_ema.*`` twins of full-EMA files;
* a diffusers folder (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
  [``text_encoder_2/``, ``tokenizer_2/``,] ``vae/``, ``scheduler/``), no safety checker.

The tokenizer is the real CLIP BPE tokenizer, rebuilt offline from the vocabulary file that the
``openai-clip`` package ships, so token ids match the real models (which is why the tiny text
encoders keep the real vocabulary size and context length). Text widths stay multiples of 64:
single files carry no text config, and readers derive heads = width / 64 as for the real ones.

Same family, seed, dtype and options -> byte-identical files.

CLI::

    python -m rece_tool.tiny OUT.safetensors [--family sd1|sd2|sdxl] [--seed N]
                             [--dtype fp32|fp16|bf16] [--ema] [--full-size]
    python -m rece_tool.tiny OUT_FOLDER [--family ...] [--seed N] [--dtype ...]  # diffusers folder
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .text import (HF_CLIP_BLOCK, OPEN_CLIP_BLOCK, OPEN_CLIP_BLOCK_TO_HF, OPEN_CLIP_FUSED_TO_HF,
                   OPEN_CLIP_TO_HF, PAD_TOKENS, clip_bpe_path, clip_tokenizer, clip_vocab_and_merges)

__all__ = [
    "SD15_UNET_CONFIG",
    "SD15_TEXT_CONFIG",
    "SD15_VAE_CONFIG",
    "TINY_UNET_CONFIG",
    "TINY_TEXT_CONFIG",
    "TINY_VAE_CONFIG",
    "SD21_UNET_CONFIG",
    "SD21_TEXT_CONFIG",
    "SDXL_UNET_CONFIG",
    "SDXL_TEXT_CONFIG",
    "SDXL_TEXT_2_CONFIG",
    "TINY_SD2_UNET_CONFIG",
    "TINY_SD2_TEXT_CONFIG",
    "TINY_SDXL_UNET_CONFIG",
    "TINY_SDXL_TEXT_2_CONFIG",
    "TINY_FAMILIES",
    "build_components",
    "ldm_state_dict",
    "write_single_file",
    "write_diffusers",
    "open_clip_from_hf",
    "build_sd1_components",
    "unet_to_ldm",
    "vae_to_ldm",
    "text_to_ldm",
    "write_sd1_single_file",
    "write_sd1_diffusers",
    "clip_bpe_path",
    "clip_tokenizer",
    "sd1_ldm_state_dict",
    "ema_key",
]

# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

# stable-diffusion-v1-5 unet/config.json
SD15_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,  # historically misnamed: it is the number of heads
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# openai/clip-vit-large-patch14 text tower, as SD 1.x embeds it. The token ids are the real
# CLIP ones (bos 49406, eos = pad 49407); eos 49407 also makes transformers pool at the eos
# position rather than the legacy argmax.
SD15_TEXT_CONFIG: dict = {
    "attention_dropout": 0.0,
    "bos_token_id": 49406,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# stable-diffusion-v1-5 vae/config.json
SD15_VAE_CONFIG: dict = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# SD1-shaped, scaled down. Two layers per block as in SD 1.x so the LDM block numbering
# (resnet, attention, downsampler interleaving) is exercised for real; the last down block and
# the first up block have no cross-attention, as in SD 1.x. Cross-attention: 2 down + 1 mid +
# 3 up = 6 attn2 layers = 12 K/V matrices of shape [32, 64].
TINY_UNET_CONFIG: dict = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": 2,
    "block_out_channels": [32, 64],
    # Must equal the text width: the tool reads the text encoder's width from the K/V shapes.
    "cross_attention_dim": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "sample_size": 32,
}

# Width 64 with one head, because single files carry no text config and every SD family has
# heads = width / 64, which is what readers derive. Vocabulary and context length stay real:
# the real CLIP BPE tokenizer feeds it.
TINY_TEXT_CONFIG: dict = {
    **SD15_TEXT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 1,
    "num_hidden_layers": 2,
    "projection_dim": 64,
}

TINY_VAE_CONFIG: dict = {
    **SD15_VAE_CONFIG,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "sample_size": 64,
}

# stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM)
SD15_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# stabilityai/stable-diffusion-2-1 unet/config.json. `attention_head_dim` is again the number of
# heads per block (64 channels each); use_linear_projection: proj_in/proj_out are Linear, not 1x1
# convolutions, in both layouts.
SD21_UNET_CONFIG: dict = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

# OpenCLIP ViT-H/14's text tower, as SD 2.x single files carry it (`cond_stage_model.model.*`, 24
# blocks, exact gelu, pad id 0). Built as a CLIPTextModelWithProjection so the single file also
# gets OpenCLIP's text_projection. diffusers' folders keep only the first 23 blocks (SD 2.x
# conditions on the penultimate one; see `TinyTextEncoder.folder_drops_last_block`).
SD21_TEXT_CONFIG: dict = {
    **SD15_TEXT_CONFIG,
    "pad_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "projection_dim": 1024,
}

SD21_VAE_CONFIG: dict = {**SD15_VAE_CONFIG, "sample_size": 768}

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (v-prediction)
SD21_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys UNet2DConditionModel takes
# that differ from its defaults). `transformer_layers_per_block` [1, 2, 10]: 70 transformer
# blocks, 140 K/V matrices of width 2048; `add_embedding` (text_time) is LDM's `label_emb.0`.
SDXL_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    # 6 micro-conditioning values x addition_time_embed_dim + the pooled text_encoder_2 projection
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# SDXL's first encoder is OpenAI's CLIP ViT-L/14 text tower again (`conditioner.embedders.0.
# transformer.*`, HF layout); the second is OpenCLIP ViT-bigG/14 (`conditioner.embedders.1.
# model.*`, 32 blocks, gelu, pad id 0), a CLIPTextModelWithProjection in diffusers.
SDXL_TEXT_CONFIG: dict = dict(SD15_TEXT_CONFIG)
SDXL_TEXT_2_CONFIG: dict = {
    **SD15_TEXT_CONFIG,
    "pad_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

SDXL_VAE_CONFIG: dict = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025,
                         "force_upcast": True}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (Euler)
SDXL_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# SD2-shaped, scaled down like the SD1 one (12 K/V matrices). Text width 64 (one head); 24 blocks
# as in ViT-H, because diffusers' single-file loader drops OpenCLIP block 23 *by name*: only at
# the real depth does it read a tiny file the way it reads a real one. (24 blocks of width 64 cost
# less than the real-vocabulary token embedding.)
TINY_SD2_UNET_CONFIG: dict = {
    **SD21_UNET_CONFIG,
    "attention_head_dim": [1, 2],
    "block_out_channels": [32, 64],
    "cross_attention_dim": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "sample_size": 32,
}
TINY_SD2_TEXT_CONFIG: dict = {
    **SD21_TEXT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 1,
    "projection_dim": 64,
}

# SDXL-shaped, scaled down: the same block types (no attention in the first down block), several
# transformer layers per block, the text_time add-embedding. Widths 64 (CLIP-L) + 128 (bigG) =
# 192 = cross_attention_dim; they must differ, as 768 and 1280 do, because diffusers' single-file
# loader tells the two encoders apart by width. 17 transformer blocks = 34 K/V matrices.
TINY_SDXL_UNET_CONFIG: dict = {
    **SDXL_UNET_CONFIG,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 2],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 192,
    "projection_class_embeddings_input_dim": 6 * 8 + 128,
    "sample_size": 32,
    "transformer_layers_per_block": [1, 1, 2],
}
TINY_SDXL_TEXT_2_CONFIG: dict = {
    **SDXL_TEXT_2_CONFIG,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 128,
}
TINY_SDXL_VAE_CONFIG: dict = {**TINY_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}


@dataclass(frozen=True)
class TinyTextEncoder:
    """One text encoder of a family: how it is built, and where each layout keeps it."""

    role: str                  # diffusers component ("text_encoder", "text_encoder_2")
    tokenizer_role: str        # its tokenizer's component
    config: dict               # tiny
    full_config: dict          # the real model's
    model_class: str           # transformers class built (and written to single files)
    ldm_root: str              # single-file key prefix
    ldm_format: str            # "hf_clip": transformers names (+ "text_model."); "open_clip": OpenCLIP names
    pad: str                   # "eos" (<|endoftext|>) or "zero" (id 0, "!")
    folder_drops_last_block: bool = False  # diffusers keeps blocks 0..N-2 as a CLIPTextModel (SD 2.x)


@dataclass(frozen=True)
class TinyFamily:
    name: str
    unet_config: dict
    full_unet_config: dict
    vae_config: dict
    full_vae_config: dict
    text_encoders: tuple[TinyTextEncoder, ...]
    scheduler_class: str
    scheduler_config: dict
    pipeline_class: str
    pipeline_kwargs: dict = field(default_factory=dict)
    # CompVis LatentDiffusion (SD 1.x, 2.x) registers its DDPM schedule as buffers, which real
    # files therefore carry; Stability's sgm DiffusionEngine (SDXL) does not.
    ldm_schedule_buffers: bool = True


_NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

TINY_FAMILIES: dict[str, TinyFamily] = {
    "sd1": TinyFamily(
        "sd1", TINY_UNET_CONFIG, SD15_UNET_CONFIG, TINY_VAE_CONFIG, SD15_VAE_CONFIG,
        (TinyTextEncoder("text_encoder", "tokenizer", TINY_TEXT_CONFIG, SD15_TEXT_CONFIG, "CLIPTextModel",
                         "cond_stage_model.transformer.", "hf_clip", "eos"),),
        "PNDMScheduler", SD15_SCHEDULER_CONFIG, "StableDiffusionPipeline", _NO_SAFETY_CHECKER),
    "sd2": TinyFamily(
        "sd2", TINY_SD2_UNET_CONFIG, SD21_UNET_CONFIG, TINY_VAE_CONFIG, SD21_VAE_CONFIG,
        (TinyTextEncoder("text_encoder", "tokenizer", TINY_SD2_TEXT_CONFIG, SD21_TEXT_CONFIG,
                         "CLIPTextModelWithProjection", "cond_stage_model.model.", "open_clip", "zero",
                         folder_drops_last_block=True),),
        "DDIMScheduler", SD21_SCHEDULER_CONFIG, "StableDiffusionPipeline", _NO_SAFETY_CHECKER),
    "sdxl": TinyFamily(
        "sdxl", TINY_SDXL_UNET_CONFIG, SDXL_UNET_CONFIG, TINY_SDXL_VAE_CONFIG, SDXL_VAE_CONFIG,
        (TinyTextEncoder("text_encoder", "tokenizer", TINY_TEXT_CONFIG, SDXL_TEXT_CONFIG, "CLIPTextModel",
                         "conditioner.embedders.0.transformer.", "hf_clip", "eos"),
         TinyTextEncoder("text_encoder_2", "tokenizer_2", TINY_SDXL_TEXT_2_CONFIG, SDXL_TEXT_2_CONFIG,
                         "CLIPTextModelWithProjection", "conditioner.embedders.1.model.", "open_clip", "zero")),
        "EulerDiscreteScheduler", SDXL_SCHEDULER_CONFIG, "StableDiffusionXLPipeline",
        # No invisible-watermark post-processing: it needs a package, and the images are noise.
        {"force_zeros_for_empty_prompt": True, "add_watermarker": False},
        ldm_schedule_buffers=False),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Real full-EMA files carry these two beside the twins; values as in sd-v1-4-full-ema.
_EMA_DECAY = 0.9999
_EMA_NUM_UPDATES = 470000
# Noise (relative to each tensor's std) that makes EMA twins differ from the live weights, so
# a reader that confuses the two (or edits one and not the other) is caught. Large enough to
# survive rounding to bf16 (8 significant bits).
_EMA_NOISE = 1e-2


# --------------------------------------------------------------------------------------------
# Random components
# --------------------------------------------------------------------------------------------


def build_components(family: str = "sd1", seed: int = 0, full_size: bool = False,
                     dtype: torch.dtype = torch.float32) -> dict:
    """Random-initialised UNet, text encoder(s) and VAE of a family, keyed by diffusers role.

    RANDOM weights (each library's default initialisation under ``torch.manual_seed(seed)``, in
    the order UNet, text encoders, VAE). The text encoders are the towers single files carry (SD
    2.x: all 24 blocks, with OpenCLIP's projection). The caller's global RNG state is untouched.
    """
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = TINY_FAMILIES[family]
    unet_cfg, vae_cfg = _family_configs(spec, full_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = {"unet": UNet2DConditionModel(**unet_cfg)}
        for te in spec.text_encoders:
            config = transformers.CLIPTextConfig(**_text_config(te, full_size))
            out[te.role] = getattr(transformers, te.model_class)(config)
        out["vae"] = AutoencoderKL(**vae_cfg)
    for m in out.values():
        # nn.Module.to, not diffusers' override: that one warns about fp32-pinned modules even
        # when there are none.
        torch.nn.Module.to(m, dtype).eval().requires_grad_(False)
    return out


def build_sd1_components(seed: int = 0, full_size: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Random-initialised SD 1.x UNet, CLIP text encoder and VAE: ``{"unet", "text_encoder", "vae"}``."""
    return build_components("sd1", seed=seed, full_size=full_size, dtype=dtype)


def _family_configs(spec: TinyFamily, full_size: bool) -> tuple[dict, dict]:
    if full_size:
        return copy.deepcopy(spec.full_unet_config), copy.deepcopy(spec.full_vae_config)
    return copy.deepcopy(spec.unet_config), copy.deepcopy(spec.vae_config)


def _text_config(te: TinyTextEncoder, full_size: bool) -> dict:
    return copy.deepcopy(te.full_config if full_size else te.config)


def _configs(full_size: bool) -> tuple[dict, dict, dict]:
    """SD 1.x (UNet, text, VAE) configs."""
    spec = TINY_FAMILIES["sd1"]
    unet_cfg, vae_cfg = _family_configs(spec, full_size)
    return unet_cfg, _text_config(spec.text_encoders[0], full_size), vae_cfg


# --------------------------------------------------------------------------------------------
# diffusers -> LDM key mapping
#
# Expressed as tables of module-path prefixes (diffusers prefix -> LDM prefix, plus the kind of
# module under it) and, per kind, the renames of the first path segments inside the module.
# Everything not in a table is named alike in both layouts (e.g. the whole transformer block of
# a UNet attention). A key no table covers is an error: silently passing it through would write
# a file no LDM reader understands.
# --------------------------------------------------------------------------------------------

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
LDM_TEXT_PREFIX_OLD = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's micro-conditioning embedding (text_time): sgm's `label_emb` Sequential(Sequential(
    # Linear, SiLU, Linear)).
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

# Renames inside one module, by module kind: (diffusers sub-path, LDM sub-path).
_INNER_RENAMES = {
    "plain": (),
    "unet_resnet": (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ),
    "vae_resnet": (("conv_shortcut", "nin_shortcut"),),
    "vae_attention": (
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ),
}
# LDM's VAE attention projections are 1x1 convolutions; diffusers' are Linear.
_VAE_CONV_PROJECTIONS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


def _unet_prefix_table(config: dict) -> dict[str, tuple[str, str]]:
    n = config["layers_per_block"]
    down_types = config["down_block_types"]
    up_types = config["up_block_types"]
    table = {k: (v, "plain") for k, v in _UNET_TOP.items()}

    # input_blocks.0 is conv_in; each down block then takes n (resnet[, attention]) slots and,
    # except the last, one downsampler slot.
    for i, block_type in enumerate(down_types):
        for j in range(n):
            slot = 1 + i * (n + 1) + j
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{slot}.0", "unet_resnet")
            if "CrossAttn" in block_type:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{slot}.1", "plain")
        if i < len(down_types) - 1:
            slot = 1 + i * (n + 1) + n
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{slot}.0.op", "plain")

    table["mid_block.resnets.0"] = ("middle_block.0", "unet_resnet")
    table["mid_block.attentions.0"] = ("middle_block.1", "plain")
    table["mid_block.resnets.1"] = ("middle_block.2", "unet_resnet")

    # Up blocks have n + 1 resnets; the upsampler sits in the last slot of the block, after the
    # attention when there is one.
    for i, block_type in enumerate(up_types):
        has_attn = "CrossAttn" in block_type
        for j in range(n + 1):
            slot = i * (n + 1) + j
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{slot}.0", "unet_resnet")
            if has_attn:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{slot}.1", "plain")
        if i < len(up_types) - 1:
            slot = i * (n + 1) + n
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{slot}.{2 if has_attn else 1}.conv", "plain")
    return table


def _vae_prefix_table(config: dict) -> dict[str, tuple[str, str]]:
    n = config["layers_per_block"]
    n_blocks = len(config["block_out_channels"])
    table = {k: (v, "plain") for k, v in _VAE_TOP.items()}
    for i in range(n_blocks):
        for j in range(n):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", "vae_resnet")
        if i < n_blocks - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", "plain")
        # LDM numbers decoder levels by resolution (0 = highest), diffusers by execution order.
        level = n_blocks - 1 - i
        for j in range(n + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", "vae_resnet")
        if i < n_blocks - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", "plain")
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", "vae_resnet")
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", "vae_resnet")
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", "vae_attention")
    return table


def _rename(key: str, table: dict[str, tuple[str, str]]) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        ldm_prefix, kind = hit
        rest = ".".join(parts[cut:])
        for old, new in _INNER_RENAMES[kind]:
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        return f"{ldm_prefix}.{rest}"
    raise KeyError(f"no LDM name for diffusers key {key!r}")


def unet_to_ldm(state_dict: dict, config: dict) -> dict:
    """diffusers ``UNet2DConditionModel`` state dict -> LDM keys under ``model.diffusion_model.``."""
    table = _unet_prefix_table(config)
    return {LDM_UNET_PREFIX + _rename(k, table): v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: dict, config: dict) -> dict:
    """diffusers ``AutoencoderKL`` state dict -> LDM keys under ``first_stage_model.``."""
    table = _vae_prefix_table(config)
    out = {}
    for k, v in state_dict.items():
        new = _rename(k, table)
        if new.endswith(_VAE_CONV_PROJECTIONS) and ".mid.attn_1." in new and v.ndim == 2:
            v = v[:, :, None, None]
        out[LDM_VAE_PREFIX + new] = v
    return out


def text_to_ldm(state_dict: dict, old_layout: bool = False, root: str = LDM_TEXT_PREFIX_OLD) -> dict:
    """``CLIPTextModel`` state dict -> ``cond_stage_model.transformer.text_model.*``.

    ``old_layout=True`` gives ``cond_stage_model.transformer.*`` (files saved with transformers
    releases whose CLIPTextModel had no ``text_model`` level). Accepts keys with or without the
    ``text_model.`` prefix: transformers >= 5.6 flattened it away, earlier releases had it.
    ``root`` is where the encoder sits (SDXL: ``conditioner.embedders.0.transformer.``).
    """
    prefix = root if old_layout else root + "text_model."
    return {prefix + k.removeprefix("text_model."): v for k, v in state_dict.items()}


# transformers -> OpenCLIP names: the inverse of the tables the reader (rece_tool.text) uses.
_HF_TO_OPEN_CLIP = {hf: oc for oc, hf in OPEN_CLIP_TO_HF.items()}
_HF_BLOCK_TO_OPEN_CLIP = {hf: oc for oc, hf in OPEN_CLIP_BLOCK_TO_HF.items()}
_HF_FUSED_PARTS = {part for parts in OPEN_CLIP_FUSED_TO_HF.values() for part in parts}
# OpenCLIP's logit scale saturates at ln(100) during training; the LAION towers hold that value.
_OPEN_CLIP_LOGIT_SCALE = math.log(100.0)


def open_clip_from_hf(state_dict: dict, root: str = "") -> dict:
    """``CLIPTextModel[WithProjection]`` state dict -> OpenCLIP text-tower names under ``root``.

    q, k, v projections are stacked into OpenCLIP's fused ``attn.in_proj_*``; the projection is
    stored transposed (OpenCLIP computes ``x @ text_projection``, nn.Linear ``x @ W.T``); a
    ``logit_scale`` is added, as OpenCLIP towers carry one. A key no table covers is an error.
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out, layers = {}, set()
    for name, tensor in sd.items():
        if name == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
            continue
        if name in _HF_TO_OPEN_CLIP:
            out[_HF_TO_OPEN_CLIP[name]] = tensor
            continue
        layer, _, sub = name.removeprefix(HF_CLIP_BLOCK).partition(".")
        if name.startswith(HF_CLIP_BLOCK) and sub in _HF_BLOCK_TO_OPEN_CLIP:
            out[f"{OPEN_CLIP_BLOCK}{layer}.{_HF_BLOCK_TO_OPEN_CLIP[sub]}"] = tensor
        elif name.startswith(HF_CLIP_BLOCK) and sub in _HF_FUSED_PARTS:
            layers.add(layer)
        else:
            raise KeyError(f"no OpenCLIP name for transformers key {name!r}")
    for layer in sorted(layers, key=int):
        for fused, parts in OPEN_CLIP_FUSED_TO_HF.items():
            out[f"{OPEN_CLIP_BLOCK}{layer}.{fused}"] = torch.cat([sd[f"{HF_CLIP_BLOCK}{layer}.{p}"] for p in parts])
    out["logit_scale"] = torch.tensor(_OPEN_CLIP_LOGIT_SCALE)
    return {root + k: v for k, v in out.items()}


def _text_encoder_to_ldm(te: TinyTextEncoder, model, old_layout: bool) -> dict:
    """One text encoder's single-file tensors, in its family's names and place."""
    sd = model.state_dict()
    if te.ldm_format == "open_clip":
        return open_clip_from_hf(sd, te.ldm_root)
    out = text_to_ldm(sd, old_layout=old_layout, root=te.ldm_root)
    # Real files keep CLIP's position_ids buffer (int64), which transformers no longer saves;
    # readers must tolerate it.
    prefix = te.ldm_root if old_layout else te.ldm_root + "text_model."
    out[prefix + "embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings,
                                                            dtype=torch.int64)[None]
    return out


# --------------------------------------------------------------------------------------------
# Single file
# --------------------------------------------------------------------------------------------


def _ldm_schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers LatentDiffusion registers (and real SD 1.x files therefore carry)."""
    t = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    betas = t
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in buffers.items()}


def ema_key(ldm_unet_key: str) -> str:
    """LDM's flattened EMA name: ``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab``."""
    rest = ldm_unet_key.removeprefix("model.")
    return "model_ema." + rest.replace(".", "")


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Integer buffers stay integer, as the usual fp16 converters (`v.half() if floating`) do.
    return (t.to(dtype) if t.is_floating_point() else t).contiguous()


def ldm_state_dict(
    family: str = "sd1",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    ema: bool = False,
    old_text_layout: bool = False,
    full_size: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of :func:`write_single_file`, in memory (RANDOM weights).

    ``old_text_layout`` drops the ``text_model.`` level of transformers-layout encoders (SD 1.x,
    SDXL's first), as files saved with older transformers releases have it.
    """
    spec = TINY_FAMILIES[family]
    comps = build_components(family, seed=seed, full_size=full_size, dtype=torch.float32)
    unet_cfg, vae_cfg = _family_configs(spec, full_size)
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_ldm(comps["unet"].state_dict(), unet_cfg))
    sd.update(vae_to_ldm(comps["vae"].state_dict(), vae_cfg))
    for te in spec.text_encoders:
        sd.update(_text_encoder_to_ldm(te, comps[te.role], old_text_layout))
    if spec.ldm_schedule_buffers:
        sd.update(_ldm_schedule_buffers())

    if ema:
        gen = torch.Generator().manual_seed(seed + 0x5EED)
        for k in [k for k in sd if k.startswith(LDM_UNET_PREFIX)]:
            v = sd[k]
            scale = _EMA_NOISE * (float(v.float().std()) if v.numel() > 1 else 1.0) or _EMA_NOISE
            sd[ema_key(k)] = v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        sd["model_ema.decay"] = torch.tensor(_EMA_DECAY, dtype=torch.float32)
        sd["model_ema.num_updates"] = torch.tensor(_EMA_NUM_UPDATES, dtype=torch.int32)

    return {k: _cast(v, dtype) for k, v in sd.items()}


def sd1_ldm_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, ema: bool = False,
                       old_text_layout: bool = False, full_size: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of :func:`write_sd1_single_file`, in memory (RANDOM weights)."""
    return ldm_state_dict("sd1", seed=seed, dtype=dtype, ema=ema, old_text_layout=old_text_layout,
                          full_size=full_size)


def _tmp_sibling(path: Path, suffix: str) -> Path:
    # Same directory, so the final os.replace is an atomic rename; not mkstemp/mkdtemp, whose
    # 0600/0700 modes would survive the rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def write_sd1_single_file(path, seed: int = 0, dtype: torch.dtype = torch.float32, ema: bool = False,
                          old_text_layout: bool = False, full_size: bool = False,
                          extra_metadata: dict | None = None) -> Path:
    """Write a RANDOM-weight SD 1.x checkpoint as one LDM-layout ``.safetensors`` (see write_single_file)."""
    return write_single_file(path, "sd1", seed=seed, dtype=dtype, ema=ema, old_text_layout=old_text_layout,
                             full_size=full_size, extra_metadata=extra_metadata)


def write_single_file(
    path,
    family: str = "sd1",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    ema: bool = False,
    old_text_layout: bool = False,
    full_size: bool = False,
    extra_metadata: dict | None = None,
) -> Path:
    """Write a RANDOM-weight checkpoint of ``family`` as one ``.safetensors``; returns the path.

    ``ema=True`` adds ``model_ema.*`` flattened twins of every UNet tensor (slightly perturbed
    copies) plus ``model_ema.decay`` / ``model_ema.num_updates``, as full-EMA releases have.
    Floating tensors are stored in ``dtype``; the integer buffers (CLIP ``position_ids``,
    ``model_ema.num_updates``) keep their integer type, as in real files.
    """
    from safetensors.torch import save_file

    path = Path(path)
    dtype = _as_dtype(dtype)
    sd = ldm_state_dict(family, seed=seed, dtype=dtype, ema=ema, old_text_layout=old_text_layout,
                        full_size=full_size)
    metadata = {
        "format": "pt",
        "rece_tool.tiny": "RANDOM weights generated for tests; not a usable model",
    }
    metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})

    tmp = _tmp_sibling(path, ".tmp")
    try:
        # safetensors 0.8 creates its files 0600; give ours the mode a plain open() gets.
        with open(tmp, "xb"):
            pass
        mode = os.stat(tmp).st_mode & 0o777
        save_file(sd, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        _sort_metadata_in_place(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _sort_metadata_in_place(path: Path) -> None:
    """Put ``__metadata__`` keys in sorted order, rewriting only the header.

    safetensors (0.8) serialises the metadata from a Rust HashMap, so with two or more keys
    their order, and hence the file bytes, changes from run to run. The tensor entries are
    already in a fixed order and are kept as written. The reordered JSON has the same length
    (same compact serialisation), so data offsets are untouched.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        canon = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
        canon.update(header)
        text = json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:
            raise RuntimeError(f"{path}: canonical safetensors header longer than the original")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


# --------------------------------------------------------------------------------------------
# Diffusers folder
# --------------------------------------------------------------------------------------------


def write_sd1_diffusers(folder, seed: int = 0, dtype: torch.dtype = torch.float32, full_size: bool = False) -> Path:
    """Write a RANDOM-weight SD 1.x diffusers folder (see write_diffusers)."""
    return write_diffusers(folder, "sd1", seed=seed, dtype=dtype, full_size=full_size)


def write_diffusers(folder, family: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float32,
                    full_size: bool = False) -> Path:
    """Write a RANDOM-weight diffusers folder of ``family`` (no safety checker); returns the folder.

    Same family and seed -> the same model as :func:`write_single_file` (before the EMA twins), in
    the form diffusers' own converters give it (SD 2.x: the text encoder without its last block).
    The folder is built beside the target and renamed into place; an existing target is replaced.
    """
    import diffusers

    spec = TINY_FAMILIES[family]
    folder = Path(folder)
    dtype = _as_dtype(dtype)
    comps = build_components(family, seed=seed, full_size=full_size, dtype=dtype)
    parts = {"unet": comps["unet"], "vae": comps["vae"],
             "scheduler": getattr(diffusers, spec.scheduler_class)(**spec.scheduler_config)}
    for te in spec.text_encoders:
        parts[te.role] = _folder_text_encoder(te, comps[te.role], full_size, dtype)
        parts[te.tokenizer_role] = clip_tokenizer(te.pad)
    pipe = getattr(diffusers, spec.pipeline_class)(**parts, **spec.pipeline_kwargs)

    tmp = _tmp_sibling(folder, ".tmp")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for te in spec.text_encoders:
            _write_slow_tokenizer_files(tmp / te.tokenizer_role, te.pad)
        if folder.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = _tmp_sibling(folder, ".old")
            os.replace(folder, old)
            shutil.rmtree(old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _folder_text_encoder(te: TinyTextEncoder, model, full_size: bool, dtype: torch.dtype):
    """diffusers' copy of a text encoder: SD 2.x's is a CLIPTextModel of all blocks but the last
    (what diffusers' converter makes of OpenCLIP ViT-H), without the unused projection."""
    if not te.folder_drops_last_block:
        return model
    from transformers import CLIPTextConfig, CLIPTextModel

    config = _text_config(te, full_size)
    config["num_hidden_layers"] -= 1
    dropped = f"{HF_CLIP_BLOCK}{config['num_hidden_layers']}."
    kept = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    kept = {k: v for k, v in kept.items() if not k.startswith(dropped) and k != "text_projection.weight"}
    with torch.device("meta"):
        truncated = CLIPTextModel(CLIPTextConfig(**config))
    truncated.load_state_dict(kept, strict=True, assign=True)
    # The position_ids buffer is not in the state dict: rebuild it off the meta device.
    truncated.embeddings.register_buffer(
        "position_ids", torch.arange(config["max_position_embeddings"]).unsqueeze(0), persistent=False)
    return torch.nn.Module.to(truncated, dtype).eval().requires_grad_(False)


def _write_slow_tokenizer_files(tok_dir: Path, pad: str = "eos") -> None:
    # transformers 5 saves only tokenizer.json; older readers (and our own fallback) read
    # vocab.json + merges.txt, which is what real SD folders ship.
    vocab, merges = clip_vocab_and_merges()
    if not (tok_dir / "vocab.json").exists():
        (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    if not (tok_dir / "merges.txt").exists():
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (tok_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = tok_dir / "special_tokens_map.json"
    if not special.exists():
        special.write_text(
            json.dumps(
                {
                    "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>",
                    "pad_token": PAD_TOKENS[pad],
                    "unk_token": "<|endoftext|>",
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rece_tool.tiny",
        description="Write a tiny SD 1.x / 2.x / XL checkpoint with RANDOM weights (for demos and tests; "
        "not a usable model). OUT ending in .safetensors: single file in the real layout; otherwise a "
        "diffusers folder.",
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=sorted(TINY_FAMILIES), default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--ema", action="store_true", help="add full-EMA model_ema.* twins (single file only)")
    parser.add_argument("--full-size", action="store_true",
                        help="the real model's shapes (SD 1.x ~4 GB, SDXL ~10 GB in fp32)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = DTYPES[args.dtype]
    if args.out.suffix == ".safetensors":
        path = write_single_file(args.out, args.family, seed=args.seed, dtype=dtype, ema=args.ema,
                                 full_size=args.full_size)
    else:
        if args.ema:
            parser.error("--ema applies to single files only")
        path = write_diffusers(args.out, args.family, seed=args.seed, dtype=dtype, full_size=args.full_size)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
