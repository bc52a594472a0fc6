"""SD 2.x and SDXL: detection, embeddings, K/V sets and the edit, as for SD 1.x (DESIGN §3, §4).

Each family's embedding oracle is diffusers' own `encode_prompt` on a pipeline of that family
built from the same weights; the edit's oracle is the independent float64 implementation.
Single-file references come from diffusers' single-file loader given the config folder of a
*different* seed, so only the weights read from the file can make them agree.
"""

from __future__ import annotations

import json
import struct
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import oracle
from conftest import assert_same_state, run_cli, write_manifest
from rece_tool import erase, tiny
from rece_tool._cli import main as cli_main
from rece_tool.checkpoint.families import FAMILY_BY_NAME
from rece_tool.checkpoint.layout import open_checkpoint
from rece_tool.checkpoint.safetensors_format import read_tensor
from rece_tool.errors import CheckpointError
from rece_tool.text import TextEmbedder

EMBED_TOL = 1e-5    # two float32 runs of the same encoder
ORACLE_TOL = 1e-6   # DESIGN §2.4, fed the same embeddings
E2E_TOL = 1e-4      # DESIGN §2.4, end to end through a float32 text encoder

FAMILIES = ["sd2", "sdxl"]
PIPELINES = {"sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
TINY = {  # family: (K/V matrices, context width, EMA twins in the single file)
    "sd2": (12, 64, 12),
    "sdxl": (34, 192, 0),
}
TEXTS = ["nudity", " ", "", "a photo of a cat!", "golden retriever", "x " * 100]
NUDITY = '[[concept_set]]\nname = "nudity"\npreset = "nudity"\n'


# ---- models, built once per module ---------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`built(family, "single"|"folder", seed)`: the SD 2.x single file is a full-EMA one."""
    root = tmp_path_factory.mktemp("families")
    cache: dict = {}

    def get(family: str, kind: str, seed: int = 0) -> Path:
        key = (family, kind, seed)
        if key not in cache:
            if kind == "single":
                cache[key] = tiny.write_single_file(root / f"{family}-{seed}.safetensors", family, seed=seed,
                                                    ema=TINY[family][2] > 0)
            else:
                cache[key] = tiny.write_diffusers(root / f"{family}-{seed}", family, seed=seed)
        return cache[key]

    return get


@lru_cache(maxsize=None)
def _pipeline(family: str, path: str, config: str | None):
    import diffusers

    cls = getattr(diffusers, PIPELINES[family])
    if config is None:
        return cls.from_pretrained(path, local_files_only=True)
    return cls.from_single_file(path, config=config, local_files_only=True)


def reference_pipeline(built, family: str, kind: str):
    """diffusers' pipeline of the seed-1 input (single file: read with the seed-0 config folder)."""
    if kind == "single":
        return _pipeline(family, str(built(family, "single", 1)), str(built(family, "folder", 0)))
    return _pipeline(family, str(built(family, "folder", 1)), None)


def diffusers_embeddings(pipe, texts):
    with torch.no_grad():
        embeds = pipe.encode_prompt(texts, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if hasattr(pipe, "tokenizer_2") else [])
    masks = [t(texts, padding="max_length", max_length=77, truncation=True).attention_mask for t in tokenizers]
    tokens = [sum(m) for m in masks[0]]
    assert all([sum(m) for m in mask] == tokens for mask in masks)  # every encoder counts alike
    return {t: (embeds[i], tokens[i]) for i, t in enumerate(texts)}


def tool_embeddings(path, texts):
    emb = TextEmbedder(open_checkpoint(path)).embed(texts)
    return {t: (emb[t].rows, emb[t].tokens) for t in texts}


def input_path(built, family, kind):
    return built(family, kind, 1)


# ---- embeddings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["single", "folder"])
@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_match_diffusers_encode_prompt(built, family, kind):
    path = input_path(built, family, kind)
    want = diffusers_embeddings(reference_pipeline(built, family, kind), TEXTS)
    got = tool_embeddings(path, TEXTS)
    width = TINY[family][1]
    for text in TEXTS:
        assert got[text][0].shape == want[text][0].shape == (77, width)
        assert float((got[text][0] - want[text][0]).abs().max()) <= EMBED_TOL, text
        assert got[text][1] == want[text][1], text
    assert [got[t][1] for t in ("nudity", " ", "", "x " * 100)] == [4, 2, 2, 77]
    if kind == "single":  # the reference really read the file, not the config folder's weights
        other = diffusers_embeddings(_pipeline(family, str(built(family, "folder", 0)), None), ["nudity"])
        assert float((other["nudity"][0] - want["nudity"][0]).abs().max()) > 1e-2


def test_sd2_single_file_penultimate_norm_equals_folder_last_layer(built):
    """OpenCLIP's 24 blocks → penultimate + ln_final == diffusers' 23-block last_hidden_state."""
    a = tool_embeddings(built("sd2", "single", 1), TEXTS)
    b = tool_embeddings(built("sd2", "folder", 1), TEXTS)
    ck = open_checkpoint(built("sd2", "single", 1))
    assert [s.hidden_state for s in ck.text_encoders] == ["penultimate_norm"]
    assert [s.hidden_state for s in open_checkpoint(built("sd2", "folder", 1)).text_encoders] == ["last"]
    for text in TEXTS:
        assert float((a[text][0] - b[text][0]).abs().max()) <= EMBED_TOL and a[text][1] == b[text][1]


@pytest.mark.parametrize("family, pads", [("sd2", [0]), ("sdxl", [49407, 0])])
@pytest.mark.parametrize("kind", ["single", "folder"])
def test_pads_follow_the_text_encoders(built, family, pads, kind):
    embedder = TextEmbedder(open_checkpoint(input_path(built, family, kind)))
    assert [t.pad_id for t in embedder.tokenizers] == pads
    ids, mask = embedder.tokenizers[-1](["nudity"])
    assert ids[0, 3:5].tolist() == [49407, pads[-1]] and int(mask.sum()) == 4


# ---- K/V sets, inspect, refusals -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["single", "folder"])
@pytest.mark.parametrize("family", FAMILIES)
def test_open_checkpoint_finds_the_kv_set(built, family, kind):
    kv_count, width, twins = TINY[family]
    path = input_path(built, family, kind)
    ck = open_checkpoint(path)
    assert ck.family is FAMILY_BY_NAME[family] and ck.kv_count == kv_count and ck.kv_width == width
    assert ck.ema_count == (twins if kind == "single" else 0)
    assert [s.layout.role for s in ck.text_encoders] == [te.role for te in tiny.TINY_FAMILIES[family].text_encoders]

    result = CliRunner().invoke(cli_main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["family"], info["kv_count"], info["context_dim"]) == (family, kv_count, width)
    assert info["family_kv_count"] == FAMILY_BY_NAME[family].real_kv_count
    assert info["layout"] == ("single-file" if kind == "single" else "diffusers")


def _unknown_file(tmp_path: Path, text_keys: list[str]) -> Path:
    tensors = {k: torch.zeros(4, 64) for k in text_keys}
    tensors["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(8, 64)
    tensors["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"] = torch.zeros(8, 64)
    path = tmp_path / "unknown.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("text_keys, found", [
    # SDXL refiner: only an OpenCLIP bigG, at position 0
    (["conditioner.embedders.0.model.token_embedding.weight"], "conditioner.embedders.0.model.*"),
    # SDXL with its second encoder missing
    (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"],
     "conditioner.embedders.0.transformer.*"),
    ([], "no known prefix"),  # a UNet-only export
])
def test_unknown_layouts_are_refused_naming_what_was_found(tmp_path, text_keys, found):
    path = _unknown_file(tmp_path, text_keys)
    with pytest.raises(CheckpointError, match="unknown layout") as info:
        open_checkpoint(path)
    assert found in str(info.value) and "conditioner.embedders.1.model.*" in str(info.value)
    result = CliRunner().invoke(cli_main, ["inspect", str(path), "--json"])
    assert result.exit_code == 2 and found in result.stderr


# ---- the edit --------------------------------------------------------------------------------------

def _kv_layers(ck):
    keys, layers, twins = [], [], []
    for wf in ck.weight_files:
        for key in wf.kv_keys:
            keys.append((wf, key))
            layers.append(read_tensor(wf.header, key))
            if key in wf.ema_twins:
                twins.append(read_tensor(wf.header, wf.ema_twins[key]))
    return keys, layers, twins


@pytest.mark.parametrize("kind", ["single", "folder"])
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_matches_oracle_fed_the_same_embeddings(built, family, kind):
    ck = open_checkpoint(input_path(built, family, kind))
    _, layers, twins = _kv_layers(ck)
    emb = TextEmbedder(ck).embed(["cat", "an animal", "nudity", " ", "", "a person"])
    targets = [erase.EraseTarget(c, emb[c].rows, emb[c].tokens, g, emb[g].rows, emb[g].tokens)
               for c, g in (("cat", "an animal"), ("nudity", " "))]
    preserve = [emb[""].rows, emb["a person"].rows]
    spec = erase.ConceptSetMath("set", targets, preserve, erase.EditScales(0.5, 1.0, None),
                                erase.EditScales(0.1, 1.0, 0.1), epochs=2, reg=0.1)
    t = erase.concept_set_transform(erase.gram(layers), torch.eye(ck.kv_width, dtype=torch.float64), spec).transform
    want, want_twins = oracle.run(layers, twins, [oracle.OracleSet(
        [oracle.OracleConcept(x.embedding, x.tokens, x.guide_embedding, x.guide_tokens) for x in targets],
        preserve, epochs=2, reg=0.1)])
    assert len(want_twins) == (TINY[family][2] if kind == "single" else 0)
    for w, expected in zip(layers + twins, want + want_twins):
        assert oracle.rel_max_error(erase.apply_transform(w, t), expected) <= ORACLE_TOL


def _raw(path: Path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
        doc.pop("__metadata__", None)
        data = f.read()
    return {k: (e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]]) for k, e in doc.items()}


def test_cli_end_to_end_on_sd2_and_sdxl_single_files(built, tmp_path):
    sources = {family: built(family, "single", 1) for family in FAMILIES}
    manifest = write_manifest(tmp_path, list(sources.items()), NUDITY)
    # One thread, as in this module: tiny models, and a busy test machine.
    r = run_cli("sanitize", str(manifest), "--quiet", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr

    for family, src in sources.items():
        out = tmp_path / "out" / family / f"{family}.safetensors"
        emb = diffusers_embeddings(reference_pipeline(built, family, "single"), ["nudity", " ", ""])
        ck = open_checkpoint(src)
        keys, layers, twins = _kv_layers(ck)
        concept = oracle.OracleConcept(emb["nudity"][0], emb["nudity"][1], emb[" "][0], emb[" "][1])
        want, want_twins = oracle.run(layers, twins, [oracle.OracleSet([concept], [emb[""][0]], 3, 0.1)])
        twin_keys = [wf.ema_twins[k] for wf, k in keys if k in wf.ema_twins]
        edited = dict(zip([k for _, k in keys] + twin_keys, want + want_twins))
        assert len(edited) == sum(TINY[family][::2])

        before, after = _raw(src), _raw(out)
        assert before.keys() == after.keys()
        with safe_open(str(out), "pt") as f:
            for key, (dtype, shape, data) in before.items():
                assert after[key][:2] == (dtype, shape), key
                if key in edited:
                    assert after[key][2] != data, key
                    assert oracle.rel_max_error(f.get_tensor(key), edited[key]) <= E2E_TOL, key
                else:
                    assert after[key][2] == data, key  # byte-identical
        audit = json.loads((tmp_path / "out" / family / "audit.json").read_text())
        assert audit["checkpoint"]["source"]["family"] == family


# ---- real configurations (meta device: shapes only, no memory) -------------------------------------

REAL = {  # family: (UNet config, text configs, share of UNet parameters in K/V, in %)
    "sd1": (tiny.SD15_UNET_CONFIG, [tiny.SD15_TEXT_CONFIG], "2.23"),
    "sd2": (tiny.SD21_UNET_CONFIG, [tiny.SD21_TEXT_CONFIG], "2.95"),
    "sdxl": (tiny.SDXL_UNET_CONFIG, [tiny.SDXL_TEXT_CONFIG, tiny.SDXL_TEXT_2_CONFIG], "13.27"),
}


def _meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize("family", list(REAL))
def test_real_configs_share_of_unet_modified(family):
    unet_config, text_configs, share = REAL[family]
    sd = _meta_unet(unet_config).state_dict()
    kv = [k for k in sd if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    total, kv_params = sum(v.numel() for v in sd.values()), sum(sd[k].numel() for k in kv)
    record = FAMILY_BY_NAME[family]
    assert (total, len(kv)) == (record.real_unet_params, record.real_kv_count)
    assert f"{100 * kv_params / total:.2f}" == share
    assert {sd[k].shape[1] for k in kv} == {record.context_dim} == {sum(c["hidden_size"] for c in text_configs)}
    assert all(c["hidden_size"] // 64 == c["num_attention_heads"] for c in text_configs)


# ---- the tiny builders' key mappings, checked against diffusers' own converters --------------------

@pytest.mark.parametrize("family, full_size, n_keys", [
    ("sd2", False, None), ("sdxl", False, None), ("sd2", True, 686), ("sdxl", True, 1680)])
def test_unet_ldm_mapping_round_trips_through_diffusers(family, full_size, n_keys):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    spec = tiny.TINY_FAMILIES[family]
    config = spec.full_unet_config if full_size else spec.unet_config
    sd = _meta_unet(config).state_dict() if full_size else tiny.build_components(family)["unet"].state_dict()
    ldm = tiny.unet_to_ldm(sd, config)
    assert_same_state(convert_ldm_unet_checkpoint(ldm, config), sd)
    assert n_keys is None or len(ldm) == n_keys  # the UNet tensors of the real releases
    if family == "sdxl":
        assert "model.diffusion_model.label_emb.0.0.weight" in ldm and "model.diffusion_model.label_emb.0.2.bias" in ldm
        assert "model.diffusion_model.output_blocks.2.2.conv.weight" in ldm
        assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    else:
        assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # Linear in SD 2.x


@pytest.mark.parametrize("family", FAMILIES)
def test_open_clip_mapping_round_trips_through_diffusers(family):
    """HF → OpenCLIP (tiny writer) → diffusers' convert_open_clip_checkpoint = diffusers' model."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    spec = tiny.TINY_FAMILIES[family]
    te = spec.text_encoders[-1]
    model = tiny.build_components(family)[te.role]
    ldm = tiny._text_encoder_to_ldm(te, model, old_layout=False)
    assert all(k.startswith(te.ldm_root) for k in ldm)
    back = convert_open_clip_checkpoint(model, ldm, prefix=te.ldm_root)
    expected = tiny._folder_text_encoder(te, model, full_size=False, dtype=torch.float32).state_dict()
    if family == "sd2":  # diffusers keeps 23 of 24 blocks, no projection, in a CLIPTextModel
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
        assert len({k.split(".")[2] for k in back if k.startswith("encoder.layers.")}) == 23
    assert_same_state(back, expected)


@pytest.mark.parametrize("config, root, n_keys", [
    (tiny.SD21_TEXT_CONFIG, "cond_stage_model.model.", 294),
    (tiny.SDXL_TEXT_2_CONFIG, "conditioner.embedders.1.model.", 390),
])
def test_full_size_open_clip_names_on_meta_device(config, root, n_keys):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    ldm = tiny.open_clip_from_hf(model.state_dict(), root)
    width = config["hidden_size"]
    assert len(ldm) == n_keys  # 12 per block + token, positional, ln_final x2, projection, logit scale
    assert ldm[root + "transformer.resblocks.9.attn.in_proj_weight"].shape == (3 * width, width)
    assert ldm[root + "text_projection"].shape == (width, config["projection_dim"])
    assert root + "transformer.resblocks.9.mlp.c_proj.bias" in ldm  # diffusers' SDXL marker key


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_files_are_deterministic_and_folders_carry_their_pads(built, family, tmp_path):
    again = tiny.write_single_file(tmp_path / "again.safetensors", family, seed=1, ema=TINY[family][2] > 0)
    assert again.read_bytes() == built(family, "single", 1).read_bytes()
    with safe_open(str(again), "pt") as f:
        assert "RANDOM" in f.metadata()["rece_tool.tiny"]
        assert ("alphas_cumprod" in f.keys()) == (family == "sd2")  # LatentDiffusion buffers, not sgm's

    from transformers import CLIPTokenizer

    folder = built(family, "folder", 1)
    for te in tiny.TINY_FAMILIES[family].text_encoders:
        tok = CLIPTokenizer.from_pretrained(folder / te.tokenizer_role)
        assert tok.pad_token == {"eos": "<|endoftext|>", "zero": "!"}[te.pad]
        assert (folder / te.tokenizer_role / "vocab.json").is_file()
        assert json.loads((folder / te.role / "config.json").read_text())["architectures"] == [
            "CLIPTextModel" if te.folder_drops_last_block else te.model_class]


def test_tiny_cli_writes_each_family(tmp_path, capsys):
    out = tmp_path / "cli-sdxl.safetensors"
    assert tiny.main([str(out), "--family", "sdxl", "--dtype", "fp16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ck = open_checkpoint(out)
    assert ck.family.name == "sdxl" and ck.kv_dtypes == ("F16",)
