"""End to end through the real CLI: numbers against the oracle, bytes against the source."""

from __future__ import annotations

import hashlib
import json
import struct
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import oracle
from conftest import run_cli, sha256, write_manifest
from rece_tool import tiny

E2E_TOL = 1e-4  # float32 text encoder in the loop (DESIGN §2.4)


def raw_entries(path: Path) -> tuple[dict, int, dict]:
    """An independent reading of a safetensors header: entries, data start, metadata."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
    return doc, 8 + n, doc.pop("__metadata__", {})


def raw_bytes(path: Path, entry: dict, start: int) -> bytes:
    b, e = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + b)
        return f.read(e - b)


def is_kv(key: str) -> bool:
    return (key.endswith("attn2.to_k.weight") or key.endswith("attn2.to_v.weight")
            or key.endswith("attn2to_kweight") or key.endswith("attn2to_vweight"))


@lru_cache(maxsize=None)
def _reference_pipeline(path: str):
    """diffusers' own pipeline from the single file (offline, local config folder)."""
    from diffusers import StableDiffusionPipeline

    config = tiny.write_sd1_diffusers(Path(path).with_suffix(".config"), seed=0)
    return StableDiffusionPipeline.from_single_file(path, config=str(config), local_files_only=True)


def reference_embeddings(path: Path, texts: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
    pipe = _reference_pipeline(str(path))
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(texts, "cpu", 1, False)
    mask = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True).attention_mask
    return {t: (embeds[i].double(), int(sum(mask[i]))) for i, t in enumerate(texts)}


def oracle_set(emb, erase, guides, preserve, epochs, reg, uce=(0.5, 1.0, None), rece=(0.1, 1.0, 0.1)):
    concepts = [oracle.OracleConcept(emb[e][0], emb[e][1], emb[g][0], emb[g][1]) for e, g in zip(erase, guides)]
    return oracle.OracleSet(concepts, [emb[p][0] for p in preserve], epochs, reg, uce, rece)


def source_layers(path: Path):
    with safe_open(str(path), "pt") as f:
        keys = sorted(k for k in f.keys() if k.startswith("model.diffusion_model.") and is_kv(k))
        twin_keys = [tiny.ema_key(k) for k in keys if tiny.ema_key(k) in f.keys()]
        return keys, [f.get_tensor(k) for k in keys], twin_keys, [f.get_tensor(k) for k in twin_keys]


def assert_matches(out: Path, keys, expected, tol):
    with safe_open(str(out), "pt") as f:
        for key, want in zip(keys, expected):
            got = f.get_tensor(key)
            assert oracle.rel_max_error(got, want) <= tol, key


def assert_untouched_bytes_identical(src: Path, out: Path) -> int:
    s_doc, s_start, _ = raw_entries(src)
    o_doc, o_start, _ = raw_entries(out)
    assert set(s_doc) == set(o_doc)
    changed = 0
    for key, entry in s_doc.items():
        assert o_doc[key]["dtype"] == entry["dtype"] and o_doc[key]["shape"] == entry["shape"]
        assert o_doc[key]["data_offsets"] == entry["data_offsets"]
        if is_kv(key):
            changed += raw_bytes(src, entry, s_start) != raw_bytes(out, o_doc[key], o_start)
        else:
            assert raw_bytes(src, entry, s_start) == raw_bytes(out, o_doc[key], o_start), key
    return changed


NUDITY = '[[concept_set]]\nname = "nudity"\npreset = "nudity"\n'


def test_nudity_preset_single_file_with_ema_matches_oracle(models, tmp_path):
    src = models("fp32", ema=True)
    before = sha256(src)
    manifest = write_manifest(tmp_path, [("tiny", src)], NUDITY)
    r = run_cli("sanitize", str(manifest), "--quiet")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "tiny" / "tiny.safetensors"

    emb = reference_embeddings(src, ["nudity", " ", ""])
    keys, layers, twin_keys, twins = source_layers(src)
    assert len(keys) == 12 and len(twin_keys) == 12
    want, want_twins = oracle.run(layers, twins, [oracle_set(emb, ["nudity"], [" "], [""], 3, 0.1)])
    assert_matches(out, keys, want, E2E_TOL)
    assert_matches(out, twin_keys, want_twins, E2E_TOL)
    assert assert_untouched_bytes_identical(src, out) == 24  # every K/V and every EMA twin edited
    assert sha256(src) == before

    audit = json.loads((tmp_path / "out" / "tiny" / "audit.json").read_text())
    assert audit["schema_version"] == 1 and audit["checkpoint"]["source"]["ema_twins"] == 12
    assert audit["signature"]["signed"] is False and "no signing key" in audit["signature"]["reason"]
    assert (tmp_path / "out" / "tiny" / "report.html").read_text().count("nudity") >= 2


def test_custom_set_then_preset_in_sequence_match_oracle(models, tmp_path):
    src = models("fp32")
    (tmp_path / "keep.txt").write_text("a castle\n\na person\n")
    body = ('[[concept_set]]\nname = "pets"\nerase = ["cat", "golden retriever"]\n'
            'guide = ["animal", "a dog"]\npreserve = ["a person", "a tree"]\n'
            'preserve_file = "keep.txt"\nepochs = 2\nreg = 0.01\n'
            '[concept_set.uce]\nlamb = 0.7\nerase_scale = 1.2\n'
            '[concept_set.rece]\nlamb = 0.2\npreserve_scale = 0.05\n' + NUDITY)
    manifest = write_manifest(tmp_path, [("tiny", src)], body)
    r = run_cli("sanitize", str(manifest), "--quiet")
    assert r.returncode == 0, r.stderr

    preserve = ["", "a person", "a tree", "a castle"]  # "" first, file after list, duplicate dropped
    emb = reference_embeddings(src, ["cat", "golden retriever", "animal", "a dog", "nudity", " "] + preserve)
    keys, layers, _, _ = source_layers(src)
    sets = [oracle_set(emb, ["cat", "golden retriever"], ["animal", "a dog"], preserve, 2, 0.01,
                       uce=(0.7, 1.2, None), rece=(0.2, 1.0, 0.05)),
            oracle_set(emb, ["nudity"], [" "], [""], 3, 0.1)]
    want, _ = oracle.run(layers, [], sets)
    assert_matches(tmp_path / "out" / "tiny" / "tiny.safetensors", keys, want, E2E_TOL)
    audit = json.loads((tmp_path / "out" / "tiny" / "audit.json").read_text())
    assert [s["name"] for s in audit["concept_sets"]] == ["pets", "nudity"]
    assert audit["concept_sets"][0]["preserve"] == preserve


@pytest.mark.parametrize("dtype,torch_dtype,tol", [("fp16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 1.6e-2)])
def test_half_precision_outputs_keep_dtype(models, tmp_path, dtype, torch_dtype, tol):
    src = models(dtype, ema=True)
    manifest = write_manifest(tmp_path, [("tiny", src)], NUDITY)
    r = run_cli("sanitize", str(manifest), "--quiet")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "tiny" / "tiny.safetensors"
    keys, layers, twin_keys, twins = source_layers(src)
    emb = reference_embeddings(models("fp32"), ["nudity", " ", ""])  # same seed, fp32 text encoder
    want, want_twins = oracle.run(layers, twins, [oracle_set(emb, ["nudity"], [" "], [""], 3, 0.1)])
    with safe_open(str(out), "pt") as f:
        for key in keys + twin_keys:
            assert f.get_tensor(key).dtype == torch_dtype
    # Half-precision text encoders and the final rounding: within the dtype's resolution.
    assert_matches(out, keys + twin_keys, want + want_twins, tol)
    assert assert_untouched_bytes_identical(src, out) == 24


def test_old_text_layout_gives_the_same_edit(models, tmp_path):
    new, old = models("fp32"), models("fp32", old_text=True)
    manifest = write_manifest(tmp_path, [("new", new), ("old", old)], NUDITY)
    r = run_cli("sanitize", str(manifest), "--quiet")
    assert r.returncode == 0, r.stderr
    keys, _, _, _ = source_layers(new)
    a, b = tmp_path / "out" / "new" / "new.safetensors", tmp_path / "out" / "old" / "old.safetensors"
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        for k in keys:
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k))


def test_diffusers_folder_copied_with_only_unet_kv_rewritten(models, tmp_path):
    src = models("fp32", diffusers=True)
    before = sha256(src)
    manifest = write_manifest(tmp_path, [("pipe", src)], NUDITY)
    r = run_cli("sanitize", str(manifest), "--quiet")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "pipe" / "pipe"
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    for f in src.rglob("*"):
        if f.is_file() and f.relative_to(src) != unet:
            assert (out / f.relative_to(src)).read_bytes() == f.read_bytes(), f
    assert assert_untouched_bytes_identical(src / unet, out / unet) == 12
    assert sha256(src) == before

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(src), local_files_only=True)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(["nudity", " ", ""], "cpu", 1, False)
    mask = pipe.tokenizer(["nudity", " "], padding="max_length", max_length=77).attention_mask
    emb = {"nudity": (embeds[0].double(), sum(mask[0])), " ": (embeds[1].double(), sum(mask[1])),
           "": (embeds[2].double(), 2)}
    sd = pipe.unet.state_dict()
    keys = sorted(k for k in sd if is_kv(k))
    want, _ = oracle.run([sd[k] for k in keys], [], [oracle_set(emb, ["nudity"], [" "], [""], 3, 0.1)])
    assert_matches(out / unet, keys, want, E2E_TOL)


def test_provenance_metadata_and_byte_identical_reruns(models, tmp_path):
    src = models("fp32")
    manifest = write_manifest(tmp_path, [("tiny", src)], NUDITY)
    outs = []
    for _ in range(2):
        r = run_cli("sanitize", str(manifest), "--quiet", "--overwrite", env={"SOURCE_DATE_EPOCH": "1700000000"})
        assert r.returncode == 0, r.stderr
        outs.append((tmp_path / "out" / "tiny" / "tiny.safetensors").read_bytes())
    assert outs[0] == outs[1]

    out = tmp_path / "out" / "tiny" / "tiny.safetensors"
    doc, start, meta = raw_entries(out)
    _, _, src_meta = raw_entries(src)
    for k, v in src_meta.items():
        assert meta[k] == v  # the source's metadata is kept
    data = out.read_bytes()[start:]
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()
    assert meta["rece.source_sha256"] == "0x" + sha256(src)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.date"] == "2023-11-14T22:13:20Z"
    sets = json.loads(meta["rece.concept_sets"])
    assert sets[0]["erase"] == ["nudity"] and sets[0]["epochs"] == 3 and sets[0]["reg"] == 0.1
    assert sets[0]["uce"] == {"lamb": 0.5, "erase_scale": 1.0, "preserve_scale": 1.0}

    r = run_cli("inspect", str(out), "--json")
    info = json.loads(r.stdout)
    assert info["family"] == "sd1" and info["kv_count"] == 12 and info["family_kv_count"] == 32
    assert info["provenance"]["rece.source_sha256"] == meta["rece.source_sha256"]


def test_failed_gate_exits_1_unsigned_with_junit(models, tmp_path):
    from rece_tool.signing import keygen
    private, _ = keygen(tmp_path / "keys")
    src = models("fp32")
    manifest = write_manifest(tmp_path, [("tiny", src)], NUDITY + "[audit]\nmax_erase_residual = 1e-9\nmax_preserve_drift = 1.0\n")
    junit = tmp_path / "gates.xml"
    r = run_cli("sanitize", str(manifest), "--quiet", "--junit", str(junit), env={"RECE_SIGNING_KEY": str(private)})
    assert r.returncode == 1, r.stderr
    assert "FAIL  nudity: erase_residual" in r.stderr and "PASS  nudity: preserve_drift" in r.stderr
    folder = tmp_path / "out" / "tiny"
    assert not list(folder.glob("*.sig"))
    audit = json.loads((folder / "audit.json").read_text())
    assert audit["passed"] is False and "gate failed" in audit["signature"]["reason"]
    xml = junit.read_text()
    assert xml.count("<testcase") == 2 and xml.count("<failure") == 1


def test_dry_run_prints_plan_and_writes_nothing(models, tmp_path):
    src = models("fp32")
    manifest = write_manifest(tmp_path, [("tiny", src)], NUDITY)
    r = run_cli("sanitize", str(manifest), "--dry-run")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    ck = plan["checkpoints"][0]
    assert ck["family"] == "Stable Diffusion 1.x" and ck["kv_count"] == 12
    assert ck["concept_sets"][0]["erase"] == ["nudity"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stated,kept", [("stable-diffusion-v1-custom-v", "stable-diffusion-v1-custom-v"),
                                         ("stable-diffusion-xl-v1-base", "stable-diffusion-v1")])
def test_modelspec_architecture_keeps_a_refinement_of_the_family(tmp_path, stated, kept):
    """A source's own, more specific architecture (e.g. `-768-v`: the only record of
    v-prediction) survives; one that contradicts the detected family does not."""
    src = tiny.write_sd1_single_file(tmp_path / "m.safetensors",
                                     extra_metadata={"modelspec.architecture": stated})
    manifest = write_manifest(tmp_path, [("m", src)], NUDITY)
    assert run_cli("sanitize", str(manifest), "--quiet").returncode == 0
    _, _, meta = raw_entries(tmp_path / "out" / "m" / "m.safetensors")
    assert meta["modelspec.architecture"] == kept
