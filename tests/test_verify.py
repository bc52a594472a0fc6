"""Signed outputs: sign → verify with rece-tool and with model_signing's own CLI; tampering fails both."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, write_manifest
from rece_tool.signing import keygen

MODEL_SIGNING = Path(sys.executable).with_name("model_signing")


@pytest.fixture(scope="module")
def signed(models, tmp_path_factory):
    """One sanitized, signed output folder (copied per test before tampering)."""
    root = tmp_path_factory.mktemp("signed")
    private, public = keygen(root / "keys")
    manifest = write_manifest(root, [("tiny", models("fp32"))],
                              '[[concept_set]]\nname = "nudity"\npreset = "nudity"\n'
                              '[audit]\nmax_preserve_drift = 0.5\n')
    r = run_cli("sanitize", str(manifest), "--quiet", "--require-signature",
                env={"RECE_SIGNING_KEY": str(private)})
    assert r.returncode == 0, r.stderr
    return root / "out" / "tiny", public, private


def model_signing_cli(folder: Path, public: Path) -> int:
    return subprocess.run([str(MODEL_SIGNING), "verify", "key", str(folder), "--signature",
                           str(folder / "tiny.sig"), "--public_key", str(public),
                           "--no-ignore-git-paths"], capture_output=True, timeout=120).returncode


def rece_verify(folder: Path, public: Path, *extra: str):
    return run_cli("verify", str(folder), "--public-key", str(public), *extra)


def test_signed_output_verifies_with_both_verifiers(signed):
    folder, public, _ = signed
    audit = json.loads((folder / "audit.json").read_text())
    assert audit["signature"]["signed"] and audit["signature"]["fingerprint"].startswith("sha256:")
    r = rece_verify(folder, public, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["ok"] and result["signer_fingerprint"] == audit["signature"]["fingerprint"]
    assert result["concept_sets"][0]["erase"] == ["nudity"]
    human = rece_verify(folder, public)
    assert human.returncode == 0 and "PASS nudity: preserve_drift" in human.stdout
    assert model_signing_cli(folder, public) == 0


def _flip_model_byte(folder: Path) -> None:
    model = folder / "tiny.safetensors"
    data = bytearray(model.read_bytes())
    data[-100] ^= 1
    model.write_bytes(bytes(data))


def _edit_audit(folder: Path) -> None:
    audit = json.loads((folder / "audit.json").read_text())
    audit["gates"][0]["value"] = 0.0
    (folder / "audit.json").write_text(json.dumps(audit))


TAMPERING = {
    "flip a model byte": _flip_model_byte,
    "edit audit.json": _edit_audit,
    "add a file": lambda f: (f / "extra.txt").write_text("hello"),
    "remove a file": lambda f: (f / "report.html").unlink(),
}


@pytest.mark.parametrize("tamper", list(TAMPERING), ids=list(TAMPERING))
def test_tampering_fails_both_verifiers(signed, tmp_path, tamper):
    folder, public, _ = signed
    copy = tmp_path / "tiny"
    shutil.copytree(folder, copy)
    TAMPERING[tamper](copy)
    r = rece_verify(copy, public)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "Traceback" not in r.stderr
    assert model_signing_cli(copy, public) != 0


def test_another_key_fails_both_verifiers(signed, tmp_path):
    folder, _, _ = signed
    _, other = keygen(tmp_path / "other")
    r = rece_verify(folder, other)
    assert r.returncode == 1 and "FAILED" in r.stdout
    assert model_signing_cli(folder, other) != 0


def test_unsigned_output_does_not_verify(models, tmp_path, signed):
    _, public, _ = signed
    manifest = write_manifest(tmp_path, [("tiny", models("fp32"))],
                              '[[concept_set]]\nname = "nudity"\npreset = "nudity"\n')
    assert run_cli("sanitize", str(manifest), "--quiet").returncode == 0
    r = rece_verify(tmp_path / "out" / "tiny", public)
    assert r.returncode == 1 and "signature" in r.stdout


def test_require_signature_without_key_is_bad_input(models, tmp_path):
    manifest = write_manifest(tmp_path, [("tiny", models("fp32"))],
                              '[[concept_set]]\nname = "nudity"\npreset = "nudity"\n')
    r = run_cli("sanitize", str(manifest), "--require-signature", env={"RECE_SIGNING_KEY": ""})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "output.signing_key" in r.stderr
    assert not (tmp_path / "out").exists()
