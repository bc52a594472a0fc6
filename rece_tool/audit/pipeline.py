"""A diffusers pipeline built offline from a checkpoint's own weights, for the image smoke audit.

Single files carry no configs: the UNet and VAE configs are derived from the tensor shapes (and
the family's constants for what shapes cannot tell, such as the number of attention heads),
converted with diffusers' own `convert_ldm_*` functions, and assembled in memory; the text
encoder(s) and tokenizer(s) come from `text.py`, exactly as the erase step uses them, and are
run so that the pipeline's `encode_prompt` yields the rows the edit assumed (DESIGN.md §3):

- SD 1.x: `StableDiffusionPipeline`, which takes `last_hidden_state`.
- SD 2.x: the same pipeline. A single file carries OpenCLIP's whole tower and the edit takes the
  penultimate block then `ln_final`, so the pipeline's copy drops the last block (what diffusers'
  converter does: a diffusers folder's text encoder is already that 23-block tower).
- SDXL: `StableDiffusionXLPipeline`, which takes the penultimate hidden states of both encoders,
  and the pooled, projected output of the second (a `CLIPTextModelWithProjection`: a single file
  stores OpenCLIP's `text_projection` as [width, proj], used as `x @ P`, so the Linear weight is
  its transpose).

What the weights cannot tell is a family constant, or, for the prediction type of SD 2.x / XL
single files (768-v models are v-prediction, 512-base ones epsilon, with identical shapes), read
from the header metadata or an A1111-style `.yaml` beside the file; failing those it is assumed
epsilon, and the assumption is recorded in the pipeline description (audit.json).

Diffusers folders load with `from_pretrained(local_files_only=True)`. No network, no safety
checker, no watermark, and one fixed scheduler (DDIM, deterministic with eta = 0) from the
family's noise schedule (a folder's own schedule and prediction type, when it is a folder).

The pipeline keeps the source K/V weights, so a sanitized model is the same pipeline with its
cross-attention K/V parameters swapped (`set_kv`); nothing else of the model differs.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import text
from ..checkpoint.layout import Checkpoint, TextEncoderSource, WeightFile
from ..checkpoint.safetensors_format import Header, read_tensor
from ..errors import BadInput, CheckpointError

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
# sgm's micro-conditioning embedding (SDXL): diffusers' `add_embedding` ("text_time").
LDM_LABEL_EMB = LDM_UNET + "label_emb.0.0.weight"
SDXL_TIME_IDS = 6  # original size, crop offset, target size: 2 values each


@dataclass(frozen=True)
class FamilyPipeline:
    """What a family's configs hold that the weights cannot tell."""

    attention_heads: int | None   # SD1.x: 8 heads in every block (diffusers' `attention_head_dim`)
    unet_constants: dict
    vae_constants: dict
    scheduler: dict               # the family's training noise schedule, for DDIM
    pipeline_class: str = "StableDiffusionPipeline"
    head_channels: int | None = None   # SD2.x, SDXL: heads = block channels / 64
    text_time: bool = False            # SDXL: the UNet's add-embedding takes time ids + pooled text
    # SD2.x / XL single files: epsilon or v-prediction from the metadata, else assumed and recorded;
    # they also describe their text encoders and derived constants in audit.json. (SD1's audit.json
    # is kept as it was: its scheduler config already records epsilon.)
    reads_prediction_type: bool = False
    pipeline_kwargs: dict = field(default_factory=dict)


# The rows each pipeline's encode_prompt takes from a text encoder it is handed (clip_skip None).
PIPELINE_TAKES = {"StableDiffusionPipeline": "last", "StableDiffusionXLPipeline": "penultimate"}

_SD_UNET = {"act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1,
            "norm_eps": 1e-05, "norm_num_groups": 32, "sample_size": 64}
_SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "prediction_type": "epsilon"}
_NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

# stable-diffusion-v1-5's unet/vae/scheduler configs, minus what is derived from the shapes.
SD1 = FamilyPipeline(
    attention_heads=8,
    unet_constants=dict(_SD_UNET),
    vae_constants={"act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
                   "scaling_factor": 0.18215},
    scheduler=dict(_SD_SCHEDULE),
    pipeline_kwargs=_NO_SAFETY_CHECKER,
)
# stabilityai/stable-diffusion-2-1's. upcast_attention as 2.1 ships it: attention in float32,
# without which SD 2.1 renders NaN (black) in float16; no effect in float32.
SD2 = FamilyPipeline(
    attention_heads=None, head_channels=64,
    unet_constants={**_SD_UNET, "upcast_attention": True},
    vae_constants=dict(SD1.vae_constants),
    scheduler=dict(_SD_SCHEDULE),
    reads_prediction_type=True,
    pipeline_kwargs=_NO_SAFETY_CHECKER,
)
# stabilityai/stable-diffusion-xl-base-1.0's (its Euler schedule's betas, for DDIM). The VAE's
# scaling factor is not in the weights; force_upcast decodes in float32 (SDXL's VAE overflows
# float16). No invisible watermark: it alters the pixels NudeNet and CLIP score.
SDXL = FamilyPipeline(
    attention_heads=None, head_channels=64,
    unet_constants={**_SD_UNET, "sample_size": 128, "addition_embed_type_num_heads": 64},
    vae_constants={"act_fn": "silu", "norm_num_groups": 32, "sample_size": 1024,
                   "scaling_factor": 0.13025, "force_upcast": True},
    scheduler=dict(_SD_SCHEDULE),
    pipeline_class="StableDiffusionXLPipeline", text_time=True, reads_prediction_type=True,
    # (force_zeros_for_empty_prompt: the constructor's default, True, as SDXL base ships it; a
    # folder keeps its own model_index.json value.)
    pipeline_kwargs={"add_watermarker": False},
)
FAMILY_PIPELINES = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


# --- prediction type -----------------------------------------------------------------------------

EPSILON, V_PREDICTION = "epsilon", "v_prediction"
# `modelspec.prediction_type` values in use (the ModelSpec says "`v` or `epsilon`"; trainers
# also write diffusers' and their own names).
PREDICTION_VALUES = {"epsilon": EPSILON, "eps": EPSILON, "v": V_PREDICTION, "v_prediction": V_PREDICTION,
                     "v-prediction": V_PREDICTION, "vpred": V_PREDICTION, "v_pred": V_PREDICTION,
                     "velocity": V_PREDICTION}
# ModelSpec architectures that name the prediction type: "…-768-v" (v), SD 2.x's "-512" base.
# (Plain family names such as "stable-diffusion-v2" or "stable-diffusion-xl-v1-base", which
# tools, rece-tool included, write for any model of the family, say nothing about it.)
EPSILON_ARCHITECTURES = {"stable-diffusion-v2-512"}
YAML_PARAMETERIZATION = re.compile(r"""^\s*parameterization\s*:\s*["']?([A-Za-z_-]+)""", re.MULTILINE)
# Empty marker tensors some v-prediction SDXL releases carry (NoobAI-XL V-Pred), as ComfyUI reads
# them: `v_pred` (v-prediction) and `ztsnr` (trained with zero terminal SNR).
V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"


def prediction_type(ckpt: Checkpoint) -> dict:
    """What a single file's UNet predicts, with where that came from.

    The weights of a v-prediction model and an epsilon one have the same shapes, so this is read
    from, in order: the header's `modelspec.prediction_type`, a `v_pred` marker tensor, the
    header's `modelspec.architecture`, an A1111-style `<name>.yaml` beside the file (LDM's
    `parameterization`; LDM's default is eps). Failing those: epsilon, marked `assumed`.
    A `ztsnr` marker adds `zero_terminal_snr` (the scheduler's betas are rescaled for it).
    """
    found = _stated_prediction(ckpt)
    if ZTSNR_MARKER in ckpt.weight_files[0].header.tensors:
        found["zero_terminal_snr"] = f"the checkpoint's {ZTSNR_MARKER!r} marker tensor"
    return found


def _stated_prediction(ckpt: Checkpoint) -> dict:
    meta = ckpt.metadata
    notes = []
    raw = meta.get("modelspec.prediction_type")
    if raw is not None:
        value = PREDICTION_VALUES.get(raw.strip().lower())
        if value:
            return {"value": value, "assumed": False,
                    "source": f"header metadata modelspec.prediction_type = {raw!r}"}
        notes.append(f"modelspec.prediction_type = {raw!r} is not a known value")
    if V_PRED_MARKER in ckpt.weight_files[0].header.tensors:
        return {"value": V_PREDICTION, "assumed": False,
                "source": f"the checkpoint's {V_PRED_MARKER!r} marker tensor"}
    arch = meta.get("modelspec.architecture")
    if arch is not None:
        base = arch.split("/")[0].strip().lower()
        if base.endswith("-v") or base in EPSILON_ARCHITECTURES:
            return {"value": V_PREDICTION if base.endswith("-v") else EPSILON, "assumed": False,
                    "source": f"header metadata modelspec.architecture = {arch!r}"}
        notes.append(f"modelspec.architecture = {arch!r} does not name one")
    yaml = ckpt.path.with_suffix(".yaml")
    if yaml.is_file():
        try:
            config = yaml.read_text("utf-8", errors="replace")
        except OSError as exc:
            notes.append(f"{yaml.name} is unreadable ({exc})")
        else:
            found = YAML_PARAMETERIZATION.search(config)
            value = PREDICTION_VALUES.get(found.group(1).lower()) if found else None
            if value or (not found and "ldm.models.diffusion" in config):
                return {"value": value or EPSILON, "assumed": False,
                        "source": f"{yaml.name} beside the checkpoint: " + (
                            f"parameterization {found.group(1)!r}" if found
                            else "an LDM config without `parameterization` (LDM's default, eps)")}
            notes.append(f"{yaml.name} beside the checkpoint does not name one")
    return {"value": EPSILON, "assumed": True,
            "source": "assumed: the weights cannot tell epsilon from v-prediction (SD 2.x 768-v models "
                      "are v-prediction) and neither the header metadata (modelspec.prediction_type, "
                      "modelspec.architecture), a v_pred marker, nor a .yaml beside the file names it"
                      + ("; " + "; ".join(notes) if notes else ""),
            "hint": "if the model is v-prediction, put its LDM .yaml (parameterization: \"v\") beside it, "
                    "or add modelspec.prediction_type = \"v\" to its header metadata; a mismatched "
                    "prediction type renders noise"}


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


def _depth(keys, stem: str) -> int:
    """How many transformer blocks the attention module at `stem` holds (0: none)."""
    head = stem + ".transformer_blocks."
    return len({k[len(head):].split(".")[0] for k in keys if k.startswith(head)})


def unet_config_from_ldm(header: Header, family: FamilyPipeline, context_dim: int,
                         pooled_dim: int | None = None) -> dict:
    """A diffusers UNet2DConditionModel config from an LDM single file's UNet tensor shapes.

    LDM numbers the encoder as conv_in, then per level `layers_per_block` (resnet[, attention])
    blocks and a downsampler (`.0.op`) between levels; the decoder mirrors it in groups of
    `layers_per_block + 1`. SDXL's levels differ in transformer depth ([1, 2, 10]), and its
    `label_emb` takes the 6 time ids (each embedded to `addition_time_embed_dim`) and the pooled
    text projection of width `pooled_dim`.
    """
    keys = header.tensors
    p = LDM_UNET + "input_blocks."
    levels: list[dict] = [{"channels": None, "attention": False, "resnets": 0, "depths": set()}]
    i = 1
    while f"{p}{i}.0.op.weight" in keys or f"{p}{i}.0.out_layers.3.weight" in keys:
        if f"{p}{i}.0.op.weight" in keys:
            levels.append({"channels": None, "attention": False, "resnets": 0, "depths": set()})
        else:
            level = levels[-1]
            level["channels"] = _shape(header, f"{p}{i}.0.out_layers.3.weight")[0]
            level["resnets"] += 1
            if f"{p}{i}.1.proj_in.weight" in keys:
                level["attention"] = True
                level["depths"].add(_depth(keys, f"{p}{i}.1"))
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
    proj_in = _shape(header, stem + ".proj_in.weight")

    # Transformer depth per level (a level without attention takes 1, as diffusers' configs do);
    # the middle block's must be the last level's, which is where diffusers takes it from.
    if any(len(lv["depths"]) > 1 for lv in levels):
        raise CheckpointError(f"transformer depth varies within a level ({[sorted(lv['depths']) for lv in levels]})",
                              path=header.path, field=p + "*")
    depths = [lv["depths"].pop() if lv["depths"] else 1 for lv in levels]
    mid = _depth(keys, LDM_UNET + "middle_block.1")
    if len(set(depths)) == 1 and (mid in (0, depths[0])):
        depth: int | list[int] = depths[0]
    elif mid in (0, depths[-1]):
        depth = depths
    else:
        raise CheckpointError(f"the middle block's transformer depth {mid} differs from the last level's "
                              f"{depths[-1]}; diffusers cannot represent that", path=header.path,
                              field=LDM_UNET + "middle_block.1.*")

    if family.attention_heads is not None:
        # The number of heads is not in the weights; the family fixes it.
        heads: int | list[int] = family.attention_heads
    else:
        # SD 2.x, SDXL: 64 channels per head, so heads = channels / 64 per level (at least one,
        # for the scaled-down test models); as diffusers derives it from LDM's num_head_channels.
        heads = [max(1, lv["channels"] // family.head_channels) for lv in levels]

    config = {
        **family.unet_constants,
        "in_channels": _shape(header, f"{p}0.0.weight")[1],
        "out_channels": _shape(header, LDM_UNET + "out.2.weight")[0],
        "block_out_channels": [lv["channels"] for lv in levels],
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attention"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": len(proj_in) == 2,
    }
    if LDM_LABEL_EMB in keys and not family.text_time:
        # SD 2.x unCLIP (image embeddings) and the x4 upscaler (noise level) condition on more
        # than text.
        raise BadInput("the UNet has a class/label embedding (an unCLIP or upscaler model); the image "
                       "smoke audit renders text-to-image only", path=header.path,
                       field="audit.images.enabled")
    if family.text_time:
        in_dim = _shape(header, LDM_LABEL_EMB)[1]
        if pooled_dim is None or (in_dim - pooled_dim) <= 0 or (in_dim - pooled_dim) % SDXL_TIME_IDS:
            raise CheckpointError(f"the add-embedding takes {in_dim} inputs, not {SDXL_TIME_IDS} time ids "
                                  f"plus the pooled text projection ({pooled_dim}); is this an SDXL refiner?",
                                  path=header.path, field=LDM_LABEL_EMB)
        config.update({
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": (in_dim - pooled_dim) // SDXL_TIME_IDS,
            "projection_class_embeddings_input_dim": in_dim,
        })
    return config


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


def _scheduler(family: FamilyPipeline, config: dict | None = None, prediction: dict | None = None):
    from diffusers import DDIMScheduler

    if config is None:
        settings = dict(family.scheduler)
        if prediction is not None:
            settings["prediction_type"] = prediction["value"]
            if prediction.get("zero_terminal_snr"):
                # diffusers' settings for zero-terminal-SNR models (Lin et al., "Common Diffusion
                # Noise Schedules and Sample Steps are Flawed"): rescaled betas, trailing steps.
                settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return DDIMScheduler(**settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DDIMScheduler.from_config(config)


# --- text encoders -------------------------------------------------------------------------------

ROWS = {"last": "last_hidden_state (after the final LayerNorm)",
        "penultimate_norm": "the penultimate block, then the final LayerNorm",
        "penultimate": "the penultimate block's hidden states (no final LayerNorm)"}


def _without_last_block(model):
    """SD 2.x: drop OpenCLIP's last block, so `last_hidden_state` is the penultimate block's
    output through `ln_final`, as diffusers' converter builds SD 2.x's text encoder."""
    inner = getattr(model, "text_model", model)  # transformers < 5.6 keeps a text_model level
    blocks = inner.encoder.layers
    inner.encoder.layers = blocks[:-1]
    model.config.num_hidden_layers = len(blocks) - 1
    return model


def _pooled_dim(source: TextEncoderSource) -> int:
    """The width of OpenCLIP's `text_projection` ([width, proj]): SDXL's pooled embedding."""
    key = source.prefix + "text_projection"
    entry = source.header.tensors.get(key)
    if entry is None or len(entry.shape) != 2:
        raise CheckpointError("no 2-D OpenCLIP text_projection: SDXL's pipeline needs it for the pooled "
                              "text embedding", path=source.header.path, field=key)
    return entry.shape[1]


def _with_projection(model, source: TextEncoderSource):
    """A CLIPTextModelWithProjection of `model` with the single file's OpenCLIP `text_projection`.

    OpenCLIP pools at the EOS token after `ln_final` and computes `pooled @ text_projection`
    ([width, proj]); transformers' Linear computes `pooled @ W.T`, so W is its transpose.
    """
    from transformers import CLIPTextModelWithProjection

    from ..erase import check_finite

    key = source.prefix + "text_projection"
    _pooled_dim(source)
    projection = read_tensor(source.header, key).float()
    if projection.shape[0] != model.config.hidden_size:
        raise CheckpointError(f"text_projection is {list(projection.shape)}, its first dimension should be "
                              f"the text width {model.config.hidden_size}", path=source.header.path, field=key)
    check_finite(projection, f"{source.header.path}: text encoder tensor {key}")
    config = model.config
    config.projection_dim = projection.shape[1]
    with torch.device("meta"):
        out = CLIPTextModelWithProjection(config)
    weights = {"text_model." + k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    weights["text_projection.weight"] = projection.T.contiguous()
    try:
        out.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"text encoder weights do not fit a CLIP text model with projection "
                              f"({str(exc)[:160]})", path=source.header.path, field=source.prefix) from None
    # Buffers not in the state dict (position_ids) are still on meta: rebuild them.
    out.text_model.embeddings.register_buffer(
        "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False)
    return out.eval()


def _single_file_text_encoders(ckpt: Checkpoint, family: FamilyPipeline) -> tuple[list, list[dict]]:
    """The checkpoint's text encoders as the pipeline runs them, giving the edit's rows."""
    takes = PIPELINE_TAKES[family.pipeline_class]
    models, described = [], []
    for source in ckpt.text_encoders:
        model = text.load_text_encoder(source, torch.device("cpu"))
        blocks = model.config.num_hidden_layers
        rule = source.hidden_state
        if rule == "penultimate_norm" and takes == "last":
            model = _without_last_block(model)
        elif rule != takes:
            raise CheckpointError(f"{family.pipeline_class} takes {ROWS[takes]} from its text encoders, but "
                                  f"this family's edit uses {ROWS.get(rule, rule)}", path=source.header.path)
        pooled = family.text_time and source.layout.role == "text_encoder_2"
        if pooled:
            model = _with_projection(model, source)
        described.append({
            "role": source.layout.role, "weights": f"{source.prefix}* ({source.weights_format})",
            "blocks_in_file": blocks, "blocks_run": model.config.num_hidden_layers,
            "rows": ROWS[rule], "class": type(model).__name__,
            **({"pooled": "EOS token after the final LayerNorm @ text_projection (OpenCLIP [width, proj], "
                          "transposed into the Linear weight)"} if pooled else {}),
        })
        models.append(model)
    return models, described


def _enforce_pad(tokenizer, source: TextEncoderSource):
    """The pad is the text encoder's (DESIGN §3), whatever the tokenizer folder says."""
    pad = text.PAD_TOKENS[source.layout.pad]
    if tokenizer.pad_token != pad:
        tokenizer.pad_token = pad
    return tokenizer


# --- pipelines -----------------------------------------------------------------------------------

def _read(header: Header, prefix: str) -> dict[str, torch.Tensor]:
    return {k: read_tensor(header, k) for k in header.tensors if k.startswith(prefix)}


def _from_single_file(ckpt: Checkpoint, family: FamilyPipeline, tokenizers: list):
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    header = ckpt.weight_files[0].header
    pooled_dim = _pooled_dim(ckpt.text_encoders[-1]) if family.text_time else None
    unet_cfg = unet_config_from_ldm(header, family, ckpt.kv_width, pooled_dim)
    vae_cfg = vae_config_from_ldm(header, family)
    # EMA twins are edited with the same T but not rendered: the pipeline runs the live UNet.
    # One module's tensors in memory at a time.
    unet = _load_module(UNet2DConditionModel, unet_cfg, convert_ldm_unet_checkpoint(_read(header, LDM_UNET), unet_cfg),
                        header.path, "UNet")
    vae = _load_module(AutoencoderKL, vae_cfg, convert_ldm_vae_checkpoint(_read(header, LDM_VAE), vae_cfg),
                       header.path, "VAE")
    encoders, encoders_described = _single_file_text_encoders(ckpt, family)
    prediction = prediction_type(ckpt) if family.reads_prediction_type else None
    components = {"vae": vae, "unet": unet,
                  "scheduler": _scheduler(family, prediction=prediction)}
    for source, encoder, tokenizer in zip(ckpt.text_encoders, encoders, tokenizers):
        components[source.layout.role] = encoder
        components[source.layout.tokenizer_folder] = tokenizer
    pipe = getattr(diffusers, family.pipeline_class)(**components, **family.pipeline_kwargs)
    described = {"built_from": "single file: diffusers convert_ldm_* with configs derived from the "
                               "tensor shapes and the family's constants",
                 "unet_config": unet_cfg, "vae_config": vae_cfg, "unet_weights": "live (non-EMA)"}
    if family.reads_prediction_type:
        described.update({
            "prediction_type": prediction,
            "text_encoders": encoders_described,
            "not_in_the_weights": {
                "attention_head_dim": f"block channels / {family.head_channels} (the family's head width)",
                "vae scaling_factor": vae_cfg["scaling_factor"],
                "noise schedule": {k: family.scheduler[k] for k in ("beta_schedule", "beta_start", "beta_end",
                                                                      "num_train_timesteps")},
                **({"upcast_attention": True} if unet_cfg.get("upcast_attention") else {}),
            },
        })
    return pipe, _kv_slots_single_file(ckpt, unet_cfg), described


def _folder_prediction_type(ckpt: Checkpoint, scheduler_config) -> dict:
    config_file = ckpt.path / "scheduler" / "scheduler_config.json"
    try:
        stated = "prediction_type" in json.loads(config_file.read_text("utf-8"))
    except (OSError, ValueError):
        stated = False
    value = scheduler_config.get("prediction_type", EPSILON)
    if stated:
        return {"value": value, "assumed": False, "source": "scheduler/scheduler_config.json prediction_type"}
    return {"value": value, "assumed": True,
            "source": "assumed: scheduler/scheduler_config.json does not state prediction_type "
                      f"(diffusers' default, {value})"}


def _from_diffusers(ckpt: Checkpoint, family: FamilyPipeline, tokenizers: list | None):
    import diffusers

    takes = PIPELINE_TAKES[family.pipeline_class]
    for source in ckpt.text_encoders:
        if source.hidden_state != takes:
            raise CheckpointError(f"{family.pipeline_class} takes {ROWS[takes]} from its text encoders, but "
                                  f"this family's edit uses {ROWS.get(source.hidden_state)}", path=source.config_dir)
    variant = "fp16" if any(".fp16." in wf.relpath.name for wf in ckpt.weight_files) else None
    try:
        pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
            str(ckpt.path), local_files_only=True, use_safetensors=True, variant=variant,
            **family.pipeline_kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"diffusers cannot load the folder offline ({str(exc)[:200]})",
                              path=ckpt.path) from None
    for i, source in enumerate(ckpt.text_encoders):
        name = source.layout.tokenizer_folder
        setattr(pipe, name, tokenizers[i] if tokenizers is not None
                else _enforce_pad(getattr(pipe, name), source))
    pipe.scheduler = _scheduler(family, pipe.scheduler.config)
    params = dict(pipe.unet.named_parameters())
    slots = []
    for wf in ckpt.weight_files:
        for key in wf.kv_keys:
            if key not in params:
                raise CheckpointError("K/V projection has no parameter of that name in the loaded UNet",
                                      path=wf.header.path, field=key)
            slots.append(KVSlot(wf, key, key))
    described = {"built_from": f"diffusers folder: {family.pipeline_class}.from_pretrained "
                               "(local_files_only)", "variant": variant}
    if family.reads_prediction_type:
        described["prediction_type"] = _folder_prediction_type(ckpt, pipe.scheduler.config)
        described["text_encoders"] = [
            {"role": s.layout.role, "weights": f"{s.config_dir.name}/", "rows": ROWS[s.hidden_state],
             "class": type(getattr(pipe, s.layout.role)).__name__} for s in ckpt.text_encoders]
    return pipe, slots, described


class SmokePipeline:
    """The source model as a pipeline; `set_kv` turns it into any edited variant."""

    def __init__(self, ckpt: Checkpoint, tokenizer_override, device: torch.device):
        import diffusers

        family = FAMILY_PIPELINES.get(ckpt.family.name)
        if family is None:
            raise BadInput(f"the image smoke audit does not support {ckpt.family.title}",
                           field="audit.images.enabled", hint="set enabled = false for this manifest")
        self.device = device
        # Half precision only where it is fast; the CPU renders in float32.
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        # One tokenizer per text encoder, each with that encoder's pad (SDXL: `<|endoftext|>`, "!").
        override = [text.load_tokenizer(tokenizer_override, s.layout.pad) for s in ckpt.text_encoders] \
            if tokenizer_override else None
        if ckpt.is_folder:
            pipe, self.slots, described = _from_diffusers(ckpt, family, override)
        else:
            tokenizers = override or [text.load_tokenizer(folder, s.layout.pad)
                                      for s, folder in zip(ckpt.text_encoders, ckpt.tokenizer_dirs)]
            pipe, self.slots, described = _from_single_file(ckpt, family, tokenizers)
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
        if family.reads_prediction_type:
            self.description["watermark"] = None

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


__all__ = ["SmokePipeline", "KVSlot", "unet_config_from_ldm", "vae_config_from_ldm", "prediction_type",
           "FAMILY_PIPELINES"]
