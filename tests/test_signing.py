"""OpenSSF Model Signing of output folders: keygen, key validation, sign, verify, tampering."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from rece_tool import signing
from rece_tool.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, SigningError
from rece_tool.signing import SignatureInvalid

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIG = "tiny" + signing.SIGNATURE_SUFFIX
CLI = Path(sys.executable).parent / "model_signing"


# ----------------------------------------------------------------------------- helpers

def _pem_private(key, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _make_output(root: Path) -> Path:
    folder = root / "tiny"
    (folder / "images").mkdir(parents=True)
    (folder / "tiny.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "audit.json").write_text(json.dumps({"schema": 1, "passed": True}))
    (folder / "report.html").write_text("<html>ok</html>")
    (folder / "images" / "0.png").write_bytes(b"\x89PNG fake")
    return folder


def _cli_verify(folder: Path, pub: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "verify", "key", str(folder), "--signature",
                           str(folder / SIG), "--public_key", str(pub), *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    return signing.keygen(tmp_path_factory.mktemp("keys") / "k")


@pytest.fixture(scope="module")
def other_keypair(tmp_path_factory) -> tuple[Path, Path]:
    return signing.keygen(tmp_path_factory.mktemp("other"))


@pytest.fixture
def signed(tmp_path, keypair) -> Path:
    folder = _make_output(tmp_path)
    signing.sign_folder(folder, signing.load_private_key(keypair[0]), SIG)
    return folder


# ----------------------------------------------------------------------------- keygen

def test_keygen_writes_pair_with_private_mode_0600(tmp_path):
    priv, pub = signing.keygen(tmp_path / "new" / "dir")
    assert priv.name == "rece-signing-key.pem" and pub.name == "rece-signing-key.pub.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes()  # PKCS8, unencrypted
    key = signing.load_private_key(priv)
    assert key.curve == "P-256" and key.warning is None
    assert key.fingerprint == signing.fingerprint(signing.load_public_key(pub))
    assert key.fingerprint.startswith("sha256:") and len(key.fingerprint) == 7 + 64


def test_keygen_refuses_to_overwrite(tmp_path):
    priv, pub = signing.keygen(tmp_path)
    before = priv.read_bytes()
    with pytest.raises(SigningError, match="already exists") as exc:
        signing.keygen(tmp_path)
    assert str(priv) in str(exc.value) and exc.value.exit_code == EXIT_BAD_INPUT
    assert priv.read_bytes() == before
    pub.unlink()  # only the private key left: still refused, nothing written
    with pytest.raises(SigningError, match="already exists"):
        signing.keygen(tmp_path)
    assert not pub.exists()


def test_keygen_refuses_a_file_as_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SigningError, match="not a directory"):
        signing.keygen(tmp_path / "f")


# ----------------------------------------------------------------------------- sign/verify

def test_sign_then_both_verifiers_pass(signed, keypair):
    priv, pub = keypair
    fp = signing.verify_folder(signed, pub, SIG)
    assert fp == signing.load_private_key(priv).fingerprint
    r = _cli_verify(signed, pub)
    assert r.returncode == 0, r.stderr
    assert "Verification succeeded" in r.stdout
    r = _cli_verify(signed, pub, "--no-ignore-git-paths")
    assert r.returncode == 0, r.stderr


def test_known_digest_is_signed_as_given(tmp_path, keypair):
    """A digest the writer took as it finished the file is signed without a re-read: the right
    one verifies in both verifiers, a wrong one fails both (so it really is what gets signed)."""
    priv, pub = keypair
    folder = _make_output(tmp_path)
    model = folder / "tiny.safetensors"
    key = signing.load_private_key(priv)
    right = "0x" + hashlib.sha256(model.read_bytes()).hexdigest()
    signing.sign_folder(folder, key, SIG, known_sha256={model: right})
    assert signing.verify_folder(folder, pub, SIG) == key.fingerprint
    assert _cli_verify(folder, pub, "--no-ignore-git-paths").returncode == 0
    signing.sign_folder(folder, key, SIG, known_sha256={model: "0x" + "0" * 64})
    with pytest.raises(signing.SignatureInvalid, match="tiny.safetensors"):
        signing.verify_folder(folder, pub, SIG)
    r = _cli_verify(folder, pub, "--no-ignore-git-paths")
    assert r.returncode != 0 and "tiny.safetensors" in r.stderr


def test_signature_covers_every_file_and_nothing_left_behind(signed):
    bundle = json.loads((signed / SIG).read_text())
    import base64

    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    names = {r["name"] for r in statement["predicate"]["resources"]}
    assert names == {"tiny.safetensors", "audit.json", "report.html", "images/0.png"}
    assert statement["predicate"]["serialization"]["hash_type"] == "sha256"
    assert sorted(p.name for p in signed.iterdir()) == sorted(
        ["audit.json", "images", "report.html", "tiny.safetensors", SIG])  # no tmp file


def test_resigning_replaces_the_signature(signed, keypair):
    (signed / "audit.json").write_text("{}")
    signing.sign_folder(signed, signing.load_private_key(keypair[0]), SIG)
    signing.verify_folder(signed, keypair[1], SIG)


def _flip_byte(folder: Path) -> None:
    p = folder / "tiny.safetensors"
    data = bytearray(p.read_bytes())
    data[100] ^= 0x01
    p.write_bytes(bytes(data))


def _edit_audit(folder: Path) -> None:
    p = folder / "audit.json"
    p.write_text(p.read_text().replace("true", "false"))


def _add_file(folder: Path) -> None:
    (folder / "images" / "1.png").write_bytes(b"extra")


def _remove_file(folder: Path) -> None:
    (folder / "report.html").unlink()


@pytest.mark.parametrize("tamper,says", [
    (_flip_byte, "changed: tiny.safetensors"), (_edit_audit, "changed: audit.json"),
    (_add_file, "added: images/1.png"), (_remove_file, "missing: report.html"),
], ids=["flip-byte", "edit-audit", "add-file", "remove-file"])
def test_tampering_fails_both_verifiers(signed, keypair, tamper, says):
    tamper(signed)
    with pytest.raises(SignatureInvalid, match=says) as exc:
        signing.verify_folder(signed, keypair[1], SIG)
    assert exc.value.exit_code == EXIT_GATE_FAILED
    assert str(signed) in str(exc.value)
    r = _cli_verify(signed, keypair[1])
    assert r.returncode != 0
    assert "Verification failed" in r.stderr


def test_other_key_fails_both_verifiers(signed, other_keypair):
    with pytest.raises(SignatureInvalid, match="another key"):
        signing.verify_folder(signed, other_keypair[1], SIG)
    assert _cli_verify(signed, other_keypair[1]).returncode != 0


def test_added_git_file_fails_ours_and_strict_cli(signed, keypair):
    # model-signing's CLI ignores .git*/.github/ by default; verify_folder does not.
    (signed / ".gitattributes").write_text("* binary")
    with pytest.raises(SignatureInvalid, match=r"\.gitattributes"):
        signing.verify_folder(signed, keypair[1], SIG)
    assert _cli_verify(signed, keypair[1], "--no-ignore-git-paths").returncode != 0


def test_forged_signature_bytes_fail(signed, keypair):
    p = signed / SIG
    bundle = json.loads(p.read_text())
    sig = bundle["dsseEnvelope"]["signatures"][0]["sig"]
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]
    p.write_text(json.dumps(bundle))
    with pytest.raises(SignatureInvalid):
        signing.verify_folder(signed, keypair[1], SIG)


def test_unsigned_or_garbage_signature(tmp_path, keypair):
    folder = _make_output(tmp_path)
    with pytest.raises(SignatureInvalid, match="unsigned"):
        signing.verify_folder(folder, keypair[1], SIG)
    (folder / SIG).write_text("not json")
    with pytest.raises(SignatureInvalid, match="not a model-signing signature"):
        signing.verify_folder(folder, keypair[1], SIG)


def test_symlink_in_folder_refused(tmp_path, keypair):
    folder = _make_output(tmp_path)
    (folder / "link").symlink_to(folder / "audit.json")
    with pytest.raises(Exception, match="symlink"):
        signing.sign_folder(folder, signing.load_private_key(keypair[0]), SIG)
    assert not (folder / SIG).exists()


def test_verify_with_bad_public_key_is_exit_2(signed, keypair, tmp_path):
    with pytest.raises(SigningError, match="is a private key") as exc:
        signing.verify_folder(signed, keypair[0], SIG)
    assert exc.value.exit_code == EXIT_BAD_INPUT
    with pytest.raises(SigningError, match="does not exist"):
        signing.verify_folder(signed, tmp_path / "nope.pub.pem", SIG)


def test_p384_key_signs_and_verifies(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    priv = _write(tmp_path / "p384.pem", _pem_private(key))
    pub = _write(tmp_path / "p384.pub.pem", _pem_public(key), 0o644)
    folder = _make_output(tmp_path)
    sk = signing.load_private_key(priv)
    assert sk.curve == "P-384"
    signing.sign_folder(folder, sk, SIG)
    assert signing.verify_folder(folder, pub, SIG) == sk.fingerprint
    assert _cli_verify(folder, pub).returncode == 0


# ----------------------------------------------------------------------------- bad keys

def test_garbage_key(tmp_path):
    p = _write(tmp_path / "garbage.pem", b"-----BEGIN PRIVATE KEY-----\nnope\n")
    with pytest.raises(SigningError, match="not a readable PEM private key") as exc:
        signing.load_private_key(p)
    assert str(p) in str(exc.value) and "keygen" in str(exc.value)
    q = _write(tmp_path / "garbage.pub.pem", os.urandom(64))
    with pytest.raises(SigningError, match="not a readable PEM public key") as exc:
        signing.load_public_key(q)
    assert str(q) in str(exc.value)


@pytest.mark.parametrize("make,what", [
    (lambda: ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
], ids=["ed25519", "p521", "rsa"])
def test_wrong_key_type_refused(tmp_path, make, what):
    key = make()
    priv = _write(tmp_path / "k.pem", _pem_private(key))
    pub = _write(tmp_path / "k.pub.pem", _pem_public(key), 0o644)
    for load, path in ((signing.load_private_key, priv), (signing.load_public_key, pub)):
        with pytest.raises(SigningError, match=what) as exc:
            load(path)
        assert str(path) in str(exc.value) and "P-256" in str(exc.value)


def test_public_key_given_as_private(keypair):
    with pytest.raises(SigningError, match="public key") as exc:
        signing.load_private_key(keypair[1])
    assert str(keypair[1]) in str(exc.value)


def test_unreadable_key_paths(tmp_path):
    # Tests may run as root, where chmod 000 does not stop reads: use a directory / a gap.
    with pytest.raises(SigningError, match="not a regular file") as exc:
        signing.load_private_key(tmp_path)
    assert str(tmp_path) in str(exc.value)
    missing = tmp_path / "missing.pem"
    with pytest.raises(SigningError, match="does not exist") as exc:
        signing.load_private_key(missing)
    assert str(missing) in str(exc.value)


def test_encrypted_key(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    p = _write(tmp_path / "enc.pem", _pem_private(key, b"s3cret"))
    with pytest.raises(SigningError, match="RECE_SIGNING_KEY_PASSWORD") as exc:
        signing.load_private_key(p)
    assert str(p) in str(exc.value) and "encrypted" in str(exc.value)
    with pytest.raises(SigningError, match="wrong password") as exc:
        signing.load_private_key(p, b"wrong")
    assert str(p) in str(exc.value)
    sk = signing.load_private_key(p, b"s3cret")
    assert "s3cret" not in repr(sk)
    # ...and the password reaches model-signing as bytes: the folder really gets signed
    pub = _write(tmp_path / "enc.pub.pem", _pem_public(key), 0o644)
    folder = _make_output(tmp_path)
    signing.sign_folder(folder, sk, SIG)
    assert signing.verify_folder(folder, pub, SIG) == sk.fingerprint


def test_password_for_unencrypted_key_is_ignored(keypair):
    sk = signing.load_private_key(keypair[0], "unused")
    assert sk.password is None


def test_world_readable_private_key_warns(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    p = _write(tmp_path / "open.pem", _pem_private(key), 0o644)
    with pytest.warns(UserWarning, match="readable by other users"):
        sk = signing.load_private_key(p)
    assert sk.warning and str(p) in sk.warning and "chmod 600" in sk.warning
    p.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert signing.load_private_key(p).warning is None


def test_fingerprint_is_sha256_of_der_spki(keypair):
    import hashlib

    pub = signing.load_public_key(keypair[1])
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    assert signing.fingerprint(pub) == "sha256:" + hashlib.sha256(der).hexdigest()


def test_cli_is_there():
    assert CLI.exists(), f"model_signing CLI not found next to {sys.executable}"
