"""rece_tool.tiny: random SD 1.x checkpoints in the real layouts.

The key mapping is checked against diffusers' own LDM -> diffusers converters (the code every
A1111/ComfyUI file goes through when diffusers loads it), not against our own inverse.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_same_state
from rece_tool import tiny


@pytest.fixture(scope="module")
def comps():
    return tiny.build_sd1_components(seed=0)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return tiny.write_sd1_diffusers(tmp_path_factory.mktemp("d") / "tiny-sd15", seed=0)


@pytest.fixture(scope="module")
def ema_file(tmp_path_factory):
    return tiny.write_sd1_single_file(tmp_path_factory.mktemp("s") / "tiny-ema.safetensors", seed=0, ema=True)


def _to_diffusers_text(ldm: dict) -> dict:
    # diffusers keeps the "text_model." level; transformers >= 5.6 CLIPTextModel has none.
    return {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()}


# ---- tokenizer -------------------------------------------------------------------------------


def test_clip_tokenizer_matches_real_clip_ids():
    tok = tiny.clip_tokenizer()
    assert len(tok) == 49408
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    nudity = tok("nudity").input_ids
    assert len(nudity) == 4 and nudity[0] == 49406 and nudity[-1] == 49407  # two BPE tokens
    padded = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert tiny.clip_bpe_path().name == "bpe_simple_vocab_16e6.txt.gz"


# ---- key mapping round trips -----------------------------------------------------------------


def test_tiny_config_shape(comps):
    kv = [k for k in comps["unet"].state_dict() if ".attn2.to_k." in k or ".attn2.to_v." in k]
    assert len(kv) == 12
    width = tiny.TINY_TEXT_CONFIG["hidden_size"]
    assert tiny.TINY_UNET_CONFIG["cross_attention_dim"] == width
    assert width // 64 == tiny.TINY_TEXT_CONFIG["num_attention_heads"]
    assert all(comps["unet"].state_dict()[k].shape[1] == width for k in kv)


def test_unet_round_trip(comps):
    sd = comps["unet"].state_dict()
    ldm = tiny.unet_to_ldm(sd, tiny.TINY_UNET_CONFIG)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    assert_same_state(convert_ldm_unet_checkpoint(ldm, tiny.TINY_UNET_CONFIG), sd)


def test_vae_round_trip(comps):
    sd = comps["vae"].state_dict()
    ldm = tiny.vae_to_ldm(sd, tiny.TINY_VAE_CONFIG)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM: 1x1 conv
    assert_same_state(convert_ldm_vae_checkpoint(ldm, tiny.TINY_VAE_CONFIG), sd)


@pytest.mark.parametrize("old_layout", [False, True])
def test_text_round_trip(comps, old_layout):
    sd = comps["text_encoder"].state_dict()
    ldm = tiny.text_to_ldm(sd, old_layout=old_layout)
    prefix = "cond_stage_model.transformer." + ("" if old_layout else "text_model.")
    assert all(k.startswith(prefix) for k in ldm)
    assert not old_layout or not any(".text_model." in k for k in ldm)
    if old_layout:
        back = {k.removeprefix("cond_stage_model.transformer."): v for k, v in ldm.items()}
    else:
        back = _to_diffusers_text(ldm)
    assert_same_state(back, sd)
    # Keys that still carry transformers' older "text_model." level map to the same names.
    assert tiny.text_to_ldm({"text_model." + k: v for k, v in sd.items()}, old_layout) == ldm


def test_full_size_mapping_on_meta_device():
    """Real SD 1.5 shapes, without allocating them: the names real files use."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny.SD15_UNET_CONFIG)
        vae = AutoencoderKL(**tiny.SD15_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**tiny.SD15_TEXT_CONFIG))
    u = tiny.unet_to_ldm(unet.state_dict(), tiny.SD15_UNET_CONFIG)
    v = tiny.vae_to_ldm(vae.state_dict(), tiny.SD15_VAE_CONFIG)
    t = tiny.text_to_ldm(text.state_dict())
    assert (len(u), len(v), len(t)) == (686, 248, 196)  # as in v1-5-pruned-emaonly
    for key in (
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # diffusers' v1 marker
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    ):
        assert key in u, key
    assert u["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sum(".attn2.to_k." in k or ".attn2.to_v." in k for k in u) == 32
    assert v["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in v
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in t
    assert_same_state(convert_ldm_unet_checkpoint(u, tiny.SD15_UNET_CONFIG), unet.state_dict())
    assert_same_state(convert_ldm_vae_checkpoint(v, tiny.SD15_VAE_CONFIG), vae.state_dict())


def test_unmapped_key_is_an_error():
    with pytest.raises(KeyError, match="no LDM name"):
        tiny.unet_to_ldm({"brand_new_block.weight": torch.zeros(1)}, tiny.TINY_UNET_CONFIG)


# ---- files ------------------------------------------------------------------------------------


def test_single_file_loads_offline_in_diffusers(ema_file, diffusers_folder, comps):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(ema_file), config=str(diffusers_folder), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, name).state_dict(), comps[name].state_dict())
    assert pipe.safety_checker is None


def test_single_file_layout(ema_file):
    sd = load_file(ema_file)
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert "alphas_cumprod" in sd
    with safe_open(ema_file, "pt") as f:
        assert "RANDOM" in f.metadata()["rece_tool.tiny"]


def test_ema_twins_for_every_unet_tensor(ema_file):
    sd = load_file(ema_file)
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    twins = {k for k in sd if k.startswith("model_ema.")} - {"model_ema.decay", "model_ema.num_updates"}
    assert len(twins) == len(unet)
    assert "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_kweight" in twins
    for k, v in unet.items():
        twin = sd["model_ema." + k.removeprefix("model.").replace(".", "")]
        assert twin.shape == v.shape and twin.dtype == v.dtype
        if v.numel() > 1:
            assert not torch.equal(twin, v), k  # distinguishable ...
            assert float((twin - v).abs().max()) <= 0.1 * max(float(v.std()), 1.0), k  # ... but close
    assert sd["model_ema.num_updates"].dtype == torch.int32
    # diffusers' own EMA extraction finds every twin under the name we wrote.
    ema_unet = convert_ldm_unet_checkpoint(sd, tiny.TINY_UNET_CONFIG, extract_ema=True)
    assert all(v is not None for v in ema_unet.values())


def test_no_ema_by_default(tmp_path):
    p = tiny.write_sd1_single_file(tmp_path / "m.safetensors", dtype=torch.float16)
    sd = load_file(p)
    assert not any(k.startswith("model_ema") for k in sd)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary left behind
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    assert p.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777  # not safetensors' 0600


def _digest(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_deterministic_single_file(tmp_path):
    a = tiny.write_sd1_single_file(tmp_path / "a" / "m.safetensors", seed=3, dtype=torch.bfloat16, ema=True)
    b = tiny.write_sd1_single_file(tmp_path / "b" / "m.safetensors", seed=3, dtype=torch.bfloat16, ema=True)
    c = tiny.write_sd1_single_file(tmp_path / "c" / "m.safetensors", seed=4, dtype=torch.bfloat16, ema=True)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_deterministic_diffusers_folder(tmp_path, diffusers_folder):
    again = tiny.write_sd1_diffusers(tmp_path / "tiny-sd15", seed=0)
    assert _digest(again) == _digest(diffusers_folder)
    # Rewriting over an existing folder replaces it.
    assert _digest(tiny.write_sd1_diffusers(again, seed=0)) == _digest(diffusers_folder)


def test_diffusers_folder_layout(diffusers_folder):
    import json

    index = json.loads((diffusers_folder / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None]
    for rel in (
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (diffusers_folder / rel).is_file(), rel
    assert len(json.loads((diffusers_folder / "tokenizer/vocab.json").read_text())) == 49408

    from transformers import CLIPTokenizer

    # The saved tokenizer reloads as the real one (through either file set).
    ref = tiny.clip_tokenizer()("a photo of a nude cat").input_ids
    assert CLIPTokenizer.from_pretrained(diffusers_folder / "tokenizer")("a photo of a nude cat").input_ids == ref


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert tiny.main([str(out), "--seed", "1", "--dtype", "fp16", "--ema"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    sd = load_file(out)
    assert "model_ema.decay" in sd
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16


def test_deterministic_with_many_metadata_keys(tmp_path):
    # safetensors writes __metadata__ from a hash map; with several keys only our canonical
    # rewrite keeps the bytes stable.
    meta = {f"key{i}": str(i) for i in range(6)}
    a = tiny.write_sd1_single_file(tmp_path / "a.safetensors", extra_metadata=meta)
    b = tiny.write_sd1_single_file(tmp_path / "b.safetensors", extra_metadata=meta)
    assert a.read_bytes() == b.read_bytes()
    with safe_open(a, "pt") as f:
        assert {k: f.metadata()[k] for k in meta} == meta
