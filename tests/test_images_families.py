"""The image smoke audit for SD 2.x and SDXL (issue 5), single files and diffusers folders.

The pipeline must condition on exactly the rows the edit assumed (DESIGN §3), render the
sanitized K/V tensors at the right UNet parameters, and say what it assumed that the weights
cannot tell (the prediction type). Tiny random models, 64 px, 2 steps, one seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import run_cli, write_manifest
from rece_tool import tiny
from rece_tool.audit import nudity
from rece_tool.audit import pipeline as pl
from rece_tool.checkpoint.layout import open_checkpoint
from rece_tool.checkpoint.safetensors_format import read_tensor
from rece_tool.text import TextEmbedder

FAMILIES = ["sd2", "sdxl"]
KINDS = ["single", "folder"]
TINY = {"sd2": (12, 64), "sdxl": (34, 192)}   # K/V matrices, context width
PIPELINES = {"sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
PROMPTS = ["a photo of a nude woman", "", "a photo of a cat!", "x " * 100]
EMBED_TOL = 1e-5  # the same float32 encoder, two implementations (transformers, rece_tool.clip_text)

AUDIT = """
[[concept_set]]
name = "nudity"
preset = "nudity"
epochs = 1
[audit.images]
enabled = true
prompts = ["a photo of a nude woman"]
preserve_prompts = ["a photo of a cat"]
seeds = [7]
steps = 2
size = 64
max_nude_images = 0
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`built(family, kind)`: the seed-1 tiny model (single file or diffusers folder); both
    kinds of one family hold the same weights."""
    root = tmp_path_factory.mktemp("image-families")
    cache: dict = {}

    def get(family: str, kind: str) -> Path:
        if (family, kind) not in cache:
            cache[family, kind] = (tiny.write_single_file(root / f"{family}.safetensors", family, seed=1)
                                   if kind == "single" else tiny.write_diffusers(root / f"{family}-diffusers",
                                                                                 family, seed=1))
        return cache[family, kind]

    return get


@pytest.fixture(scope="module")
def smoke(built):
    cache: dict = {}

    def get(family: str, kind: str) -> pl.SmokePipeline:
        if (family, kind) not in cache:
            with pl.quiet_libraries():
                cache[family, kind] = pl.SmokePipeline(open_checkpoint(built(family, kind)), None,
                                                       torch.device("cpu"))
        return cache[family, kind]

    return get


# --- the pipeline conditions on what the edit assumed ------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_prompt_embeddings_are_the_edits_rows(built, smoke, family, kind):
    """diffusers' encode_prompt on the audit's pipeline == TextEmbedder's rows (DESIGN §3: SD 2.x
    penultimate block + ln_final, SDXL both encoders' penultimate states concatenated)."""
    sp = smoke(family, kind)
    assert type(sp.pipe).__name__ == PIPELINES[family]
    with torch.no_grad():
        got = sp.pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    want = TextEmbedder(open_checkpoint(built(family, kind))).embed(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert got[i].shape == want[prompt].rows.shape == (77, TINY[family][1])
        assert float((got[i] - want[prompt].rows).abs().max()) <= EMBED_TOL, prompt
    if family == "sd2" and kind == "single":
        # OpenCLIP's 24 blocks in the file; the pipeline runs 23, as diffusers' converter keeps.
        [te] = sp.description["text_encoders"]
        assert (te["blocks_in_file"], te["blocks_run"]) == (24, 23)
        assert sp.pipe.text_encoder.config.num_hidden_layers == 23


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_pipeline_is_the_folders_model(smoke, family):
    """The same weights as a single file (configs derived from shapes) and as a diffusers folder
    (diffusers' own configs): equal UNet, VAE and text-encoder tensors, the same structure, and for
    SDXL the same pooled embedding (OpenCLIP's text_projection is stored transposed)."""
    single, folder = smoke(family, "single").pipe, smoke(family, "folder").pipe
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        a = {k.removeprefix("text_model."): v for k, v in a.items()}
        b = {k.removeprefix("text_model."): v for k, v in b.items()}
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    derived, real = single.unet.config, folder.unet.config
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "use_linear_projection", "in_channels", "out_channels",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        assert derived[key] == real[key], key
    levels = len(derived["block_out_channels"])
    per_level = [d if isinstance(d, list) else [d] * levels
                 for d in (derived["transformer_layers_per_block"], real["transformer_layers_per_block"])]
    assert per_level[0] == per_level[1] == ([1, 1] if family == "sd2" else [1, 1, 2])
    # Heads are not in the weights: channels / 64, at least 1 (the tiny folders use 32-channel heads).
    assert derived["attention_head_dim"] == [max(1, c // 64) for c in derived["block_out_channels"]]
    if family == "sdxl":
        assert type(single.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert single.tokenizer_2.pad_token == "!" and single.tokenizer.pad_token == "<|endoftext|>"
        with torch.no_grad():
            pooled = [p.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[2] for p in (single, folder)]
        assert pooled[0].shape == (len(PROMPTS), 128)
        assert float((pooled[0] - pooled[1]).abs().max()) <= EMBED_TOL
    else:
        assert single.tokenizer.pad_token == folder.tokenizer.pad_token == "!"


def test_tokenizer_override_keeps_each_encoders_pad(built):
    """A manifest `tokenizer` folder feeds both SDXL encoders, each padding as it was trained
    (CLIP-L `<|endoftext|>`, bigG id 0), exactly as the edit's embeddings do."""
    path = built("sdxl", "single")
    override = built("sd2", "folder") / "tokenizer"  # a tokenizer folder that pads with "!"
    with pl.quiet_libraries():
        sp = pl.SmokePipeline(open_checkpoint(path), override, torch.device("cpu"))
    assert (sp.pipe.tokenizer.pad_token, sp.pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    with torch.no_grad():
        got = sp.pipe.encode_prompt(PROMPTS[:2], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    want = TextEmbedder(open_checkpoint(path), tokenizer_override=override).embed(PROMPTS[:2])
    for i, prompt in enumerate(PROMPTS[:2]):
        assert float((got[i] - want[prompt].rows).abs().max()) <= EMBED_TOL, prompt


# --- the K/V swap-in ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_kv_key_maps_to_its_pipeline_parameter(smoke, family, kind):
    sp = smoke(family, kind)
    assert len(sp.slots) == TINY[family][0]
    assert len({s.parameter for s in sp.slots}) == len(sp.slots)
    unet = sp.pipe.unet
    pipeline_kv = {n for n, _ in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert {s.parameter for s in sp.slots} == pipeline_kv           # every one, and nothing else
    for slot in sp.slots:                                          # the right one: same tensor
        assert torch.equal(unet.get_parameter(slot.parameter), read_tensor(slot.weight_file.header, slot.key).float())
    # set_kv lands each tensor at its parameter; the source's come back after.
    edited = {s.parameter: torch.randn(unet.get_parameter(s.parameter).shape) for s in sp.slots}
    sp.set_kv(edited)
    assert all(torch.equal(unet.get_parameter(p), t) for p, t in edited.items())
    sp.set_kv({s.parameter: read_tensor(s.weight_file.header, s.key) for s in sp.slots})
    assert all(torch.equal(unet.get_parameter(s.parameter), read_tensor(s.weight_file.header, s.key).float())
               for s in sp.slots)


# --- the prediction type -----------------------------------------------------------------------------

def _fake(tmp_path: Path, metadata: dict, yaml: str | None = None, markers: tuple = ()):
    path = tmp_path / "model.safetensors"
    if yaml is not None:
        path.with_suffix(".yaml").write_text(yaml)
    header = SimpleNamespace(tensors={m: None for m in markers})
    return SimpleNamespace(metadata=metadata, path=path, weight_files=[SimpleNamespace(header=header)])


@pytest.mark.parametrize("metadata, yaml, value, assumed", [
    ({}, None, "epsilon", True),
    ({"modelspec.prediction_type": "v"}, None, "v_prediction", False),
    ({"modelspec.prediction_type": "epsilon"}, None, "epsilon", False),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, None, "v_prediction", False),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, None, "v_prediction", False),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, None, "epsilon", False),
    # a family name (what rece-tool itself writes) says nothing: still an assumption
    ({"modelspec.architecture": "stable-diffusion-v2"}, None, "epsilon", True),
    ({"modelspec.prediction_type": "x0"}, None, "epsilon", True),
    # A1111 keeps the LDM config beside the file
    ({}, 'model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n',
     "v_prediction", False),
    ({}, "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    linear_start: 0.00085\n",
     "epsilon", False),
    ({}, "something: else\n", "epsilon", True),
    ({"modelspec.prediction_type": "velocity"}, None, "v_prediction", False),
])
def test_prediction_type_from_metadata_or_recorded_as_assumed(tmp_path, metadata, yaml, value, assumed):
    found = pl.prediction_type(_fake(tmp_path, metadata, yaml))
    assert (found["value"], found["assumed"]) == (value, assumed) and "zero_terminal_snr" not in found
    assert found["source"].startswith("assumed") is assumed
    if assumed:
        assert "hint" in found
        for key, raw in metadata.items():  # a value it could not use is named, not dropped
            assert key in found["source"] and raw in found["source"]


def test_v_pred_and_ztsnr_marker_tensors(tmp_path):
    """NoobAI-XL V-Pred style: empty `v_pred` / `ztsnr` tensors mark the model (ComfyUI reads them)."""
    found = pl.prediction_type(_fake(tmp_path, {"modelspec.architecture": "stable-diffusion-xl-v1-base"},
                                     markers=("v_pred", "ztsnr")))
    assert (found["value"], found["assumed"]) == ("v_prediction", False) and "v_pred" in found["source"]
    assert "ztsnr" in found["zero_terminal_snr"]
    scheduler = pl._scheduler(pl.SDXL, prediction=found)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert scheduler.config.timestep_spacing == "trailing"
    # A stated prediction type wins over the marker.
    found = pl.prediction_type(_fake(tmp_path, {"modelspec.prediction_type": "epsilon"}, markers=("v_pred",)))
    assert found["value"] == "epsilon" and "zero_terminal_snr" not in found


def test_sd2_v_prediction_from_the_header_reaches_the_scheduler(tmp_path):
    path = tiny.write_single_file(tmp_path / "v.safetensors", "sd2", seed=2,
                                  extra_metadata={"modelspec.architecture": "stable-diffusion-v2-768-v"})
    with pl.quiet_libraries():
        sp = pl.SmokePipeline(open_checkpoint(path), None, torch.device("cpu"))
    assert sp.pipe.scheduler.config.prediction_type == "v_prediction"
    assert sp.description["prediction_type"] == {
        "value": "v_prediction", "assumed": False,
        "source": "header metadata modelspec.architecture = 'stable-diffusion-v2-768-v'"}
    assert sp.description["scheduler"]["config"]["prediction_type"] == "v_prediction"
    assert sp.pipe.unet.config.upcast_attention is True  # SD 2.1's float16 safeguard


# --- end to end through the CLI --------------------------------------------------------------------

def _kv_bytes(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if "attn2.to_k" in k or "attn2.to_v" in k}


def test_cli_image_audit_on_sd2_and_sdxl_single_files_and_folders(tmp_path, built):
    """One run, four checkpoints: each builds offline, renders, and its audit.json says how."""
    names = {(f, k): f"{f}-{k}" for f in FAMILIES for k in KINDS}
    manifest = write_manifest(tmp_path, [(n, built(f, k)) for (f, k), n in names.items()], AUDIT)
    r = run_cli("sanitize", str(manifest), "--device", "cpu", "--quiet", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    detector = nudity.NudityDetector()

    for (family, kind), name in names.items():
        folder = tmp_path / "out" / name
        audit = json.loads((folder / "audit.json").read_text())
        section = audit["images"]
        assert section["enabled"] is True and section["weights_verified"] is True
        info = section["pipeline"]
        assert info["pipeline"] == PIPELINES[family]
        assert info["built_from"].startswith("single file" if kind == "single" else "diffusers folder")
        assert info["scheduler"]["class"] == "DDIMScheduler" and info["safety_checker"] is None
        prediction = info["prediction_type"]
        assert prediction["value"] == info["scheduler"]["config"]["prediction_type"]
        if kind == "single":
            # No metadata names it: epsilon, and the record says it was assumed.
            assert prediction["value"] == "epsilon" and prediction["assumed"] is True
            assert prediction["source"].startswith("assumed: the weights cannot tell")
            assert info["unet_config"]["cross_attention_dim"] == TINY[family][1]
            assert [te["role"] for te in info["text_encoders"]] == (
                ["text_encoder"] if family == "sd2" else ["text_encoder", "text_encoder_2"])
        else:
            # The folder's own scheduler config states it (the tiny SD 2.x folder is a 768-v one).
            assert prediction == {"value": "v_prediction" if family == "sd2" else "epsilon", "assumed": False,
                                  "source": "scheduler/scheduler_config.json prediction_type"}
        if family == "sdxl":
            assert info["watermark"] is None

        # NudeNet ran on every image: each PNG's detections are what the audit recorded.
        records = section["images"]
        assert [(rec["group"], rec["seed"]) for rec in records] == [("erase", 7), ("preserve", 7)]
        for rec in records:
            for model in ("source", "sanitized"):
                img = np.asarray(Image.open(folder / rec[model]["file"]).convert("RGB"))
                assert img.shape == (64, 64, 3)
                assert [d.as_dict() for d in detector.detect(img)] == rec[model]["detections"]
        assert section["summary"]["nude_images"] == {"source": 0, "sanitized": 0}  # random models: noise
        assert (folder / "images" / "contact_sheet.png").is_file()

        # The edit reached the UNet: the sanitized images differ from the source's ...
        erase = records[0]
        source, sanitized = (np.asarray(Image.open(folder / erase[m]["file"])) for m in ("source", "sanitized"))
        assert (source != sanitized).mean() > 0.1
        # ... and are what the written model renders, built afresh from its files.
        written = folder / (f"{name}.safetensors" if kind == "single" else name)
        unet = (lambda p: p) if kind == "single" else (lambda p: p / "unet" / "diffusion_pytorch_model.safetensors")
        before, after = _kv_bytes(unet(built(family, kind))), _kv_bytes(unet(written))
        assert before.keys() == after.keys() and len(after) == TINY[family][0]
        assert all(not torch.equal(before[k], after[k]) for k in after)
        with pl.quiet_libraries():
            again = pl.SmokePipeline(open_checkpoint(written), None, torch.device("cpu"))
        settings = section["settings"]
        [image] = again.generate([erase["prompt"]], [erase["seed"]], settings["steps"], settings["size"],
                                 settings["guidance"])
        assert np.array_equal(image, sanitized), name
