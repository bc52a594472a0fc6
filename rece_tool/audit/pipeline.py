"""A diffusers pipeline built offline from a checkpoint's own weights, for the image smoke audit.

Single files carry no configs: the UNet and VAE configs are derived from the tensor shapes (and
the family's constants for what shapes cannot tell, such as the number of attention heads),
converted with diffusers' own `convert_ldm_*` functions, and assembled in memory; the text
encoder and tokenizer come from `text.py`, exactly as the erase step uses them. Diffusers
folders load with `from_pretrained(local_files_only=True)`. No network, no safety checker, and
one fixed scheduler (DDIM, deterministic with eta = 0) from the family's noise schedule.

The pipeline keeps the source K/V weights, so a sanitized model is the same pipeline with its
cross-attention K/V parameters swapped (`set_kv`); nothing else of the model differs.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .. import text
from ..checkpoint.layout import Checkpoint, WeightFile
from ..checkpoint.safetensors_format import Header, read_tensor
from ..errors import BadInput, CheckpointError

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."


@dataclass(frozen=True)
class FamilyPipeline:
    """What a family's configs hold that the weights cannot tell."""

    attention_heads: int          # SD1.x: 8 heads in every block (diffusers' `attention_head_dim`)
    unet_constants: dict
    vae_constants: dict
    scheduler: dict               # the family's training noise schedule, for DDIM


# stable-diffusion-v1-5's unet/vae/scheduler configs, minus what is derived from the shapes.
SD1 = FamilyPipeline(
    attention_heads=8,
    unet_constants={"act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
                    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1,
                    "norm_eps": 1e-05, "norm_num_groups": 32, "sample_size": 64},
    vae_constants={"act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
                   "scaling_factor": 0.18215},
    scheduler={"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
               "steps_offset": 1, "prediction_type": "epsilon"},
)
FAMILY_PIPELINES = {"sd1": SD1}


@dataclass(frozen=True, eq=False)  # identity: a slot is a dict key, its WeightFile is not hashable
class KVSlot:
    """One K/V matrix: where the checkpoint stores it, and which pipeline parameter renders it."""

    weight_file: WeightFile
    key: str
    parameter: str


# --- configs from shapes -----------------------------------------------------------------------

def _shape(header: Header, key: str) -> tuple[int, ...]:
    entry = header.tensors.get(key)
    if entry is None:
        raise CheckpointError("tensor missing: cannot derive the diffusion config", path=header.path, field=key)
    return tuple(entry.shape)


def unet_config_from_ldm(header: Header, family: FamilyPipeline, context_dim: int) -> dict:
    """A diffusers UNet2DConditionModel config from an LDM single file's UNet tensor shapes.

    LDM numbers the encoder as conv_in, then per level `layers_per_block` (resnet[, attention])
    blocks and a downsampler (`.0.op`) between levels; the decoder mirrors it in groups of
    `layers_per_block + 1`.
    """
    keys = header.tensors
    p = LDM_UNET + "input_blocks."
    levels: list[dict] = [{"channels": None, "attention": False, "resnets": 0}]
    i = 1
    while f"{p}{i}.0.op.weight" in keys or f"{p}{i}.0.out_layers.3.weight" in keys:
        if f"{p}{i}.0.op.weight" in keys:
            levels.append({"channels": None, "attention": False, "resnets": 0})
        else:
            level = levels[-1]
            level["channels"] = _shape(header, f"{p}{i}.0.out_layers.3.weight")[0]
            level["resnets"] += 1
            level["attention"] |= f"{p}{i}.1.proj_in.weight" in keys
        i += 1
    per_level = {lv["resnets"] for lv in levels}
    if len(per_level) != 1 or 0 in per_level:
        raise CheckpointError(f"unexpected UNet block structure ({[lv['resnets'] for lv in levels]} "
                              "resnets per level)", path=header.path, field=p + "*")
    layers = per_level.pop()

    up_attention = []
    for u in range(len(levels)):
        blocks = range(u * (layers + 1), (u + 1) * (layers + 1))
        up_attention.append(any(f"{LDM_UNET}output_blocks.{b}.1.proj_in.weight" in keys for b in blocks))

    first_attn = next((k for k in keys if k.startswith(LDM_UNET) and ".transformer_blocks." in k), None)
    if first_attn is None:
        raise CheckpointError("no transformer blocks in the UNet", path=header.path)
    stem = first_attn.split(".transformer_blocks.")[0]
    depth = len({k.split(".transformer_blocks.")[1].split(".")[0] for k in keys
                 if k.startswith(stem + ".transformer_blocks.")})
    proj_in = _shape(header, stem + ".proj_in.weight")
    return {
        **family.unet_constants,
        "in_channels": _shape(header, f"{p}0.0.weight")[1],
        "out_channels": _shape(header, LDM_UNET + "out.2.weight")[0],
        "block_out_channels": [lv["channels"] for lv in levels],
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attention"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "cross_attention_dim": context_dim,
        # The number of heads is not in the weights; the family fixes it.
        "attention_head_dim": family.attention_heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": len(proj_in) == 2,
    }


def vae_config_from_ldm(header: Header, family: FamilyPipeline) -> dict:
    keys = header.tensors
    enc = LDM_VAE + "encoder.down."
    levels = len({k[len(enc):].split(".")[0] for k in keys if k.startswith(enc)})
    if not levels:
        raise CheckpointError("no VAE (first_stage_model.encoder.down.*) in the checkpoint",
                              path=header.path, hint="the image audit needs a full checkpoint")
    layers = len({k[len(enc) + 2:].split(".")[1] for k in keys if k.startswith(enc + "0.block.")})
    return {
        **family.vae_constants,
        "in_channels": _shape(header, LDM_VAE + "encoder.conv_in.weight")[1],
        "out_channels": _shape(header, LDM_VAE + "decoder.conv_out.weight")[0],
        "latent_channels": _shape(header, LDM_VAE + "post_quant_conv.weight")[0],
        "block_out_channels": [_shape(header, f"{enc}{i}.block.0.conv2.weight")[0] for i in range(levels)],
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


# --- building ----------------------------------------------------------------------------------

@contextmanager
def quiet_libraries():
    """diffusers and transformers log advice (accelerate, dtype casts) and draw their own
    loading bars on stderr; the tool's output is its own progress bars and summary."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def _load_module(cls, config: dict, weights: dict[str, torch.Tensor], path, what: str):
    with torch.device("meta"):
        module = cls(**config)
    try:
        module.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{what} weights do not fit the config derived from their shapes "
                              f"({str(exc)[:200]})", path=path) from None
    return module.eval()


def _kv_slots_single_file(ckpt: Checkpoint, unet_config: dict) -> list[KVSlot]:
    """Map LDM K/V keys to diffusers parameter names with diffusers' own converter.

    The converter only renames, so running it over shape-only meta tensors and following each
    tensor's identity gives the mapping without a second copy of the weights.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    wf = ckpt.weight_files[0]
    ghosts = {k: torch.empty(e.shape, device="meta") for k, e in wf.header.tensors.items()
              if k.startswith(LDM_UNET)}
    renamed = {id(v): k for k, v in convert_ldm_unet_checkpoint(ghosts, unet_config).items()}
    slots = []
    for key in wf.kv_keys:
        name = renamed.get(id(ghosts[key]))
        if name is None:
            raise CheckpointError("diffusers' converter does not map this K/V projection",
                                  path=wf.header.path, field=key)
        slots.append(KVSlot(wf, key, name))
    return slots


def _scheduler(family: FamilyPipeline, config: dict | None = None):
    from diffusers import DDIMScheduler

    if config is None:
        return DDIMScheduler(**family.scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DDIMScheduler.from_config(config)


def _from_single_file(ckpt: Checkpoint, family: FamilyPipeline, tokenizer):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    header = ckpt.weight_files[0].header
    unet_cfg = unet_config_from_ldm(header, family, ckpt.kv_width)
    vae_cfg = vae_config_from_ldm(header, family)
    # EMA twins are edited with the same T but not rendered: the pipeline runs the live UNet.
    ldm = {k: read_tensor(header, k) for k in header.tensors if k.startswith((LDM_UNET, LDM_VAE))}
    unet = _load_module(UNet2DConditionModel, unet_cfg, convert_ldm_unet_checkpoint(ldm, unet_cfg),
                        header.path, "UNet")
    vae = _load_module(AutoencoderKL, vae_cfg, convert_ldm_vae_checkpoint(ldm, vae_cfg), header.path, "VAE")
    del ldm
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text.load_text_encoder(ckpt.text_encoders[0], torch.device("cpu")),
        tokenizer=tokenizer, unet=unet, scheduler=_scheduler(family), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    described = {"built_from": "single file: diffusers convert_ldm_* with configs derived from the "
                              "tensor shapes and the family's constants",
                 "unet_config": unet_cfg, "vae_config": vae_cfg, "unet_weights": "live (non-EMA)"}
    return pipe, _kv_slots_single_file(ckpt, unet_cfg), described


def _from_diffusers(ckpt: Checkpoint, family: FamilyPipeline, tokenizer):
    from diffusers import StableDiffusionPipeline

    variant = "fp16" if any(".fp16." in wf.relpath.name for wf in ckpt.weight_files) else None
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(ckpt.path), local_files_only=True, use_safetensors=True, variant=variant,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"diffusers cannot load the folder offline ({str(exc)[:200]})",
                              path=ckpt.path) from None
    if tokenizer is not None:
        pipe.tokenizer = tokenizer
    pipe.scheduler = _scheduler(family, pipe.scheduler.config)
    params = dict(pipe.unet.named_parameters())
    slots = []
    for wf in ckpt.weight_files:
        for key in wf.kv_keys:
            if key not in params:
                raise CheckpointError("K/V projection has no parameter of that name in the loaded UNet",
                                      path=wf.header.path, field=key)
            slots.append(KVSlot(wf, key, key))
    return pipe, slots, {"built_from": "diffusers folder: StableDiffusionPipeline.from_pretrained "
                                       "(local_files_only)", "variant": variant}


class SmokePipeline:
    """The source model as a pipeline; `set_kv` turns it into any edited variant."""

    def __init__(self, ckpt: Checkpoint, tokenizer_override, device: torch.device):
        import diffusers

        family = FAMILY_PIPELINES.get(ckpt.family.name)
        if family is None:
            raise BadInput(f"the image smoke audit supports Stable Diffusion 1.x only; this checkpoint "
                           f"is {ckpt.family.title}", field="audit.images.enabled",
                           hint="set enabled = false for this manifest")
        self.device = device
        # Half precision only where it is fast; the CPU renders in float32.
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        override = text.load_tokenizer(tokenizer_override, ckpt.text_encoders[0].layout.pad) \
            if tokenizer_override else None
        build = _from_diffusers if ckpt.is_folder else _from_single_file
        tokenizer = override if ckpt.is_folder else (
            override or text.load_tokenizer(ckpt.tokenizer_dirs[0], ckpt.text_encoders[0].layout.pad))
        pipe, self.slots, described = build(ckpt, family, tokenizer)
        if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
            # Inpainting (9) and instruct-pix2pix (8) UNets need an input image: not text-to-image.
            raise BadInput(f"the UNet takes {pipe.unet.config.in_channels} input channels (an inpainting "
                           "or image-conditioned model); the image smoke audit renders text-to-image only",
                           path=ckpt.path, field="audit.images.enabled")
        pipe.to(device=device, dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.description = {
            **described, "pipeline": type(pipe).__name__, "diffusers": diffusers.__version__,
            "scheduler": {"class": type(pipe.scheduler).__name__, "eta": 0.0,
                          "config": {k: v for k, v in dict(pipe.scheduler.config).items()
                                     if not k.startswith("_")}},
            "dtype": str(self.dtype).removeprefix("torch."), "device": str(device),
            "safety_checker": None, "initial_noise": "torch.Generator('cpu').manual_seed(seed) per image",
        }

    def set_kv(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy K/V tensors (by pipeline parameter name) into the UNet."""
        unet = self.pipe.unet
        with torch.no_grad():
            for name, value in tensors.items():
                param = unet.get_parameter(name)
                param.copy_(value.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int, size: int,
                 guidance: float) -> list[np.ndarray]:
        """One RGB uint8 image per (prompt, seed) pair; the noise comes from a CPU generator so
        the same seed starts from the same latents on every device."""
        out = self.pipe(prompt=list(prompts), height=size, width=size, num_inference_steps=steps,
                        guidance_scale=guidance, eta=0.0, output_type="np",
                        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
        images = np.nan_to_num(np.asarray(out.images, dtype=np.float32), nan=0.0)
        return [(img * 255).round().clip(0, 255).astype(np.uint8) for img in images]


__all__ = ["SmokePipeline", "KVSlot", "unet_config_from_ldm", "vae_config_from_ldm", "FAMILY_PIPELINES"]
