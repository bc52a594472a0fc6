"""Tiny Stable Diffusion 1.x checkpoints with RANDOM weights, in the real on-disk layouts.

THE WEIGHTS ARE RANDOM. A checkpoint written here has the key names, nesting, shapes (scaled
down, unless ``full_size``) and file formats of a real SD 1.x release, but it is not a usable
model: it generates noise. It exists so that ``make demo``, the tests and the benchmarks can
exercise every code path that reads, edits and writes checkpoints without downloading
gigabytes, and without any network access.

Two layouts are produced:

* a single ``.safetensors`` in the CompVis/LDM layout that A1111 and ComfyUI use
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), optionally
  with the flattened ``model_ema.*`` twins of full-EMA files;
* a diffusers folder (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
  ``vae/``, ``scheduler/``), no safety checker.

The tokenizer is the real CLIP BPE tokenizer, rebuilt offline from the vocabulary file that the
``openai-clip`` package ships, so token ids match real SD 1.x (which is why the tiny text
encoder keeps the real vocabulary size and context length).

Same seed, dtype and options -> byte-identical files.

CLI::

    python -m rece_tool.tiny OUT.safetensors [--seed N] [--dtype fp32|fp16|bf16] [--ema] [--full-size]
    python -m rece_tool.tiny OUT_FOLDER      [--seed N] [--dtype ...]          # diffusers folder
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from .text import clip_bpe_path, clip_tokenizer, clip_vocab_and_merges

__all__ = [
    "SD15_UNET_CONFIG",
    "SD15_TEXT_CONFIG",
    "SD15_VAE_CONFIG",
    "TINY_UNET_CONFIG",
    "TINY_TEXT_CONFIG",
    "TINY_VAE_CONFIG",
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


def build_sd1_components(seed: int = 0, full_size: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Random-initialised UNet, CLIP text encoder and VAE: ``{"unet", "text_encoder", "vae"}``.

    RANDOM weights (each library's default initialisation under ``torch.manual_seed(seed)``).
    The global RNG state of the caller is left untouched.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg, vae_cfg = _configs(full_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        vae = AutoencoderKL(**vae_cfg)
    out = {"unet": unet, "text_encoder": text_encoder, "vae": vae}
    for m in out.values():
        # nn.Module.to, not diffusers' override: that one warns about fp32-pinned modules even
        # when there are none.
        torch.nn.Module.to(m, dtype).eval().requires_grad_(False)
    return out


def _configs(full_size: bool) -> tuple[dict, dict, dict]:
    if full_size:
        return copy.deepcopy(SD15_UNET_CONFIG), copy.deepcopy(SD15_TEXT_CONFIG), copy.deepcopy(SD15_VAE_CONFIG)
    return copy.deepcopy(TINY_UNET_CONFIG), copy.deepcopy(TINY_TEXT_CONFIG), copy.deepcopy(TINY_VAE_CONFIG)


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


def text_to_ldm(state_dict: dict, old_layout: bool = False) -> dict:
    """``CLIPTextModel`` state dict -> ``cond_stage_model.transformer.text_model.*``.

    ``old_layout=True`` gives ``cond_stage_model.transformer.*`` (files saved with transformers
    releases whose CLIPTextModel had no ``text_model`` level). Accepts keys with or without the
    ``text_model.`` prefix: transformers >= 5.6 flattened it away, earlier releases had it.
    """
    prefix = LDM_TEXT_PREFIX_OLD if old_layout else LDM_TEXT_PREFIX
    return {prefix + k.removeprefix("text_model."): v for k, v in state_dict.items()}


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


def sd1_ldm_state_dict(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    ema: bool = False,
    old_text_layout: bool = False,
    full_size: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of :func:`write_sd1_single_file`, in memory (RANDOM weights)."""
    comps = build_sd1_components(seed=seed, full_size=full_size, dtype=torch.float32)
    unet_cfg, _, vae_cfg = _configs(full_size)
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_ldm(comps["unet"].state_dict(), unet_cfg))
    sd.update(vae_to_ldm(comps["vae"].state_dict(), vae_cfg))
    text_prefix = LDM_TEXT_PREFIX_OLD if old_text_layout else LDM_TEXT_PREFIX
    sd.update(text_to_ldm(comps["text_encoder"].state_dict(), old_layout=old_text_layout))
    # Real SD 1.x files keep CLIP's position_ids buffer (int64), which transformers no longer
    # saves; readers must tolerate it.
    n_pos = comps["text_encoder"].config.max_position_embeddings
    sd[text_prefix + "embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
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


def _tmp_sibling(path: Path, suffix: str) -> Path:
    # Same directory, so the final os.replace is an atomic rename; not mkstemp/mkdtemp, whose
    # 0600/0700 modes would survive the rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def write_sd1_single_file(
    path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    ema: bool = False,
    old_text_layout: bool = False,
    full_size: bool = False,
    extra_metadata: dict | None = None,
) -> Path:
    """Write a RANDOM-weight SD 1.x checkpoint as one LDM-layout ``.safetensors``; returns the path.

    ``ema=True`` adds ``model_ema.*`` flattened twins of every UNet tensor (slightly perturbed
    copies) plus ``model_ema.decay`` / ``model_ema.num_updates``, as full-EMA releases have.
    Floating tensors are stored in ``dtype``; the integer buffers (CLIP ``position_ids``,
    ``model_ema.num_updates``) keep their integer type, as in real files.
    """
    from safetensors.torch import save_file

    path = Path(path)
    dtype = _as_dtype(dtype)
    sd = sd1_ldm_state_dict(seed=seed, dtype=dtype, ema=ema, old_text_layout=old_text_layout, full_size=full_size)
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
    """Write a RANDOM-weight SD 1.x diffusers folder (no safety checker); returns the folder.

    Same seed -> the same weights as :func:`write_sd1_single_file` (before the EMA twins).
    The folder is built beside the target and renamed into place; an existing target is replaced.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    dtype = _as_dtype(dtype)
    comps = build_sd1_components(seed=seed, full_size=full_size, dtype=dtype)
    pipe = StableDiffusionPipeline(
        unet=comps["unet"],
        text_encoder=comps["text_encoder"],
        vae=comps["vae"],
        tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

    tmp = _tmp_sibling(folder, ".tmp")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _write_slow_tokenizer_files(tmp / "tokenizer")
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


def _write_slow_tokenizer_files(tok_dir: Path) -> None:
    # transformers 5 saves only tokenizer.json; older readers (and our own fallback) read
    # vocab.json + merges.txt, which is what real SD 1.x folders ship.
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
                    "pad_token": "<|endoftext|>",
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
        description="Write a tiny SD 1.x checkpoint with RANDOM weights (for demos and tests; "
        "not a usable model). OUT ending in .safetensors: LDM single file; otherwise a diffusers folder.",
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--ema", action="store_true", help="add full-EMA model_ema.* twins (single file only)")
    parser.add_argument("--full-size", action="store_true", help="real SD 1.5 shapes (~4 GB in fp32)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = DTYPES[args.dtype]
    if args.out.suffix == ".safetensors":
        path = write_sd1_single_file(args.out, seed=args.seed, dtype=dtype, ema=args.ema, full_size=args.full_size)
    else:
        if args.ema:
            parser.error("--ema applies to single files only")
        path = write_sd1_diffusers(args.out, seed=args.seed, dtype=dtype, full_size=args.full_size)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
