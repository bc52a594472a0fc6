"""Key-based OpenSSF Model Signing (OMS v1.0) of a whole output folder, offline.

Signing goes through the `model-signing` package's Python API with an elliptic-curve key
(P-256, or P-384). The signature is a Sigstore bundle (DSSE envelope around an in-toto
statement listing every file of the folder with its SHA-256) written *inside* the folder it
signs, as `<folder>/<signature_name>`; that one file is left out of the signed set.

A consumer verifies without rece-tool, with the package's own CLI:

    model_signing verify key FOLDER --signature FOLDER/NAME.sig \\
        --public_key rece-signing-key.pub.pem --no-ignore-git-paths

(`--no-ignore-git-paths` is optional on a clean folder; without it the CLI silently ignores
`.git*`/`.github/` files added after signing.) The CLI always re-hashes with SHA-256 at file
granularity, whatever the signature says, so that is the only hashing a CLI-verifiable
signature can use; `verify_folder` additionally refuses any file on disk that the signature
does not list.

Traps in model-signing 1.1.1 this module works around:
* the private-key password must be `bytes` (its CLI `--password` passes a `str` and fails);
* verification failures surface as `ValueError` or cryptography's `InvalidSignature`;
* verification ignores `.git*` / `.github/` by default and files the signer chose to ignore.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cryptography import exceptions as crypto_exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import EXIT_GATE_FAILED, BadInput, ReceError, SigningError, WriteFailure

SIGNATURE_SUFFIX = ".sig"
PRIVATE_KEY_NAME = "rece-signing-key.pem"
PUBLIC_KEY_NAME = "rece-signing-key.pub.pem"
PASSWORD_ENV = "RECE_SIGNING_KEY_PASSWORD"
# model-signing 1.1.1 would also take secp521r1; rece-tool's policy is P-256 (what keygen
# makes) and P-384.
SUPPORTED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
HASH_ALGORITHM = "sha256"  # the only one `model_signing verify key` re-hashes with

_KEYGEN_HINT = "make a P-256 key pair with `rece-tool keygen DIR`"


class SignatureInvalid(ReceError):
    """The folder does not match its signature (or is not signed): a failed check, exit 1."""

    exit_code = EXIT_GATE_FAILED


@dataclass(frozen=True)
class SigningKey:
    """A validated private key: where it is, how to open it, and who it makes us."""

    path: Path
    password: bytes | None = field(repr=False, default=None)
    fingerprint: str = ""
    curve: str = ""
    warning: str | None = None  # e.g. "readable by other users"; the CLI prints it


# ----------------------------------------------------------------------------- keys

def fingerprint(public_key) -> str:
    """`sha256:` + hex SHA-256 of the DER SubjectPublicKeyInfo of `public_key`."""
    if isinstance(public_key, SigningKey):
        return public_key.fingerprint
    if hasattr(public_key, "public_key"):
        public_key = public_key.public_key()  # a private key: use its public half
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def keygen(directory: Path) -> tuple[Path, Path]:
    """Writes a fresh EC P-256 pair as PEM into `directory`; returns (private, public).

    The private key is unencrypted PKCS8, created with mode 0600 from the start. Existing
    key files are never overwritten.
    """
    directory = Path(directory)
    private_path = directory / PRIVATE_KEY_NAME
    public_path = directory / PUBLIC_KEY_NAME
    if directory.exists() and not directory.is_dir():
        raise SigningError("is not a directory", path=directory,
                           hint="give keygen a directory to write the key pair into")
    for existing in (private_path, public_path):
        if existing.exists() or existing.is_symlink():
            raise SigningError("already exists; refusing to overwrite a key", path=existing,
                               hint="move it away or choose another directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SigningError(f"cannot create the key directory: {err.strerror or err}",
                           path=directory) from err

    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_exclusive(private_path, private_pem, 0o600)
    try:
        _write_exclusive(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as err:
        raise SigningError("already exists; refusing to overwrite a key", path=path,
                           hint="move it away or choose another directory") from err
    except OSError as err:
        raise SigningError(f"cannot create the key file: {err.strerror or err}",
                           path=path) from err
    try:
        os.fchmod(fd, mode)  # the umask may only have removed bits; make it exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise SigningError(f"cannot write the key file: {err.strerror or err}",
                           path=path) from err
    os.close(fd)


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.exists():
        raise SigningError(f"{what} file does not exist", path=path, hint=_KEYGEN_HINT)
    if not path.is_file():
        raise SigningError(f"{what} is not a regular file", path=path,
                           hint=f"give the path of a PEM {what} file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise SigningError(f"cannot read the {what}: {err.strerror or err}", path=path,
                           hint="check the file's permissions") from err


def _key_kind(public) -> str:
    from cryptography.hazmat.primitives.asymmetric import dsa, ed448, ed25519, rsa

    for cls, name in ((ed25519.Ed25519PublicKey, "Ed25519"), (ed448.Ed448PublicKey, "Ed448"),
                      (rsa.RSAPublicKey, "RSA"), (dsa.DSAPublicKey, "DSA")):
        if isinstance(public, cls):
            return name
    return type(public).__name__


def _check_curve(key, path: Path, what: str) -> str:
    public = key.public_key() if hasattr(key, "public_key") else key
    if not isinstance(public, ec.EllipticCurvePublicKey):
        kind = _key_kind(public)
        raise SigningError(f"{what} is of type {kind}; only EC P-256/P-384 keys are supported",
                           path=path, hint=_KEYGEN_HINT)
    curve = public.curve.name
    if curve not in SUPPORTED_CURVES:
        raise SigningError(f"{what} uses curve {curve}; only EC P-256 (secp256r1) and P-384 "
                           "(secp384r1) are supported", path=path, hint=_KEYGEN_HINT)
    return SUPPORTED_CURVES[curve]


def _looks_public(data: bytes) -> bool:
    try:
        serialization.load_pem_public_key(data)
        return True
    except (ValueError, TypeError, crypto_exceptions.UnsupportedAlgorithm):
        return b"-----BEGIN PUBLIC KEY-----" in data or b"BEGIN CERTIFICATE" in data


def _looks_private(data: bytes) -> bool:
    return b"PRIVATE KEY-----" in data


def load_private_key(path: Path, password: bytes | str | None = None) -> SigningKey:
    """Validates the PEM private key at `path` and returns a `SigningKey`.

    Refuses (SigningError, exit 2) anything that cannot sign: a missing or unreadable file,
    non-PEM data, a public key, a key that is not EC P-256/P-384, an encrypted key without
    or with the wrong password. A private key readable by group or others is accepted with a
    warning (`warnings.warn` and `SigningKey.warning`).
    """
    path = Path(path)
    data = _read_key_file(path, "private key")
    if isinstance(password, str):
        password = password.encode("utf-8")
    if password == b"":
        password = None
    if not _looks_private(data) and _looks_public(data):
        raise SigningError("is a public key or certificate, but a private key is needed here",
                           path=path, hint="give the private key (e.g. rece-signing-key.pem); "
                                           "the .pub.pem file is for verifying")
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as err:
        if password is None:  # "Password was not given but private key is encrypted"
            raise SigningError("private key is encrypted and no password was given", path=path,
                               hint=f"set {PASSWORD_ENV} to its password") from err
        # "Password was given but private key is not encrypted": use it without one
        password = None
        key = serialization.load_pem_private_key(data, None)
    except ValueError as err:
        if password is not None and b"ENCRYPTED" in data:
            raise SigningError("wrong password for the encrypted private key", path=path,
                               hint=f"check {PASSWORD_ENV}") from err
        raise SigningError("is not a readable PEM private key", path=path,
                           hint=_KEYGEN_HINT) from err
    except crypto_exceptions.UnsupportedAlgorithm as err:
        raise SigningError(f"private key of an unsupported type ({err})", path=path,
                           hint=_KEYGEN_HINT) from err
    curve = _check_curve(key, path, "private key")

    warning = None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0
    if mode & 0o044:
        warning = (f"{path}: private key is readable by other users (mode {mode:04o}); "
                   f"run `chmod 600 {path}`")
        warnings.warn(warning, stacklevel=2)
    return SigningKey(path=path, password=password, fingerprint=fingerprint(key.public_key()),
                      curve=curve, warning=warning)


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Validates the PEM public key at `path` (EC P-256/P-384) and returns it."""
    path = Path(path)
    data = _read_key_file(path, "public key")
    if _looks_private(data):
        raise SigningError("is a private key; verifying needs the public key", path=path,
                           hint="give the .pub.pem file and keep the private key secret")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise SigningError("is not a readable PEM public key", path=path,
                           hint="give the signer's .pub.pem file") from err
    except crypto_exceptions.UnsupportedAlgorithm as err:
        raise SigningError(f"public key of an unsupported type ({err})", path=path,
                           hint="give the signer's EC P-256/P-384 .pub.pem file") from err
    _check_curve(key, path, "public key")
    return key


# ----------------------------------------------------------------------------- folders

def _hashing_config(signature_name: str, known_sha256: Mapping[Path, str] | None = None):
    import model_signing

    # Whole folder: file-level SHA-256 (what the CLI verifier re-hashes with), git-looking
    # files included, symlinks refused, only the signature itself left out.
    config = model_signing.hashing.Config()
    if known_sha256:
        try:
            config = _known_digests_config_class()(known_sha256)
        except (ImportError, AttributeError, TypeError):  # a model-signing without the hook
            pass
    return (config.use_file_serialization(hashing_algorithm=HASH_ALGORITHM, allow_symlinks=False)
            .set_ignored_paths(paths=[signature_name], ignore_git_paths=False))


def _known_digests_config_class():
    """model-signing's hashing config, told the SHA-256 of files rece-tool has just written.

    The model file was hashed whole as it was finished (`EditedCopy.finish`, reading the file
    back while the kernel flushed it); hashing it again here would be the slowest step of
    signing. Every other file is hashed by model-signing as usual. This hooks model-signing's
    file-hasher factory (`_build_file_hasher_factory`, stable through 1.x); if a release
    changes it, `_hashing_config` falls back to letting model-signing hash everything.
    """
    from model_signing import hashing
    from model_signing._hashing import hashing as engines
    from model_signing._hashing import io as file_io

    class KnownDigest(file_io.FileHasher):
        def __init__(self, inner, digest: bytes):
            self._inner, self._digest = inner, digest

        @property
        def digest_name(self) -> str:
            return self._inner.digest_name

        @property
        def digest_size(self) -> int:
            return self._inner.digest_size

        def compute(self):
            return engines.Digest(self._inner.digest_name, self._digest)

    class KnownDigestsConfig(hashing.Config):
        def __init__(self, known: Mapping[Path, str]):
            self._known = {os.path.abspath(p): bytes.fromhex(d.removeprefix("0x")) for p, d in known.items()}
            super().__init__()

        def _build_file_hasher_factory(self, hashing_algorithm, *args, **kwargs):
            inner = super()._build_file_hasher_factory(hashing_algorithm, *args, **kwargs)
            known = self._known if hashing_algorithm == HASH_ALGORITHM else {}

            def factory(path):
                hasher = inner(path)
                digest = known.get(os.path.abspath(path))
                if digest is None:
                    return hasher
                try:
                    return KnownDigest(hasher, digest)
                except TypeError:  # a model-signing whose hasher interface grew: hash it as usual
                    return hasher
            return factory

    return KnownDigestsConfig


def _check_signature_name(signature_name: str) -> None:
    if (not signature_name or "/" in signature_name or "\\" in signature_name
            or signature_name in (".", "..") or not signature_name.endswith(SIGNATURE_SUFFIX)):
        raise BadInput(f"signature name {signature_name!r} must be a plain file name ending in "
                       f"{SIGNATURE_SUFFIX}")


def _check_folder(folder: Path) -> None:
    if not folder.is_dir() or folder.is_symlink():
        raise BadInput("is not a directory", path=folder, hint="give the signed output folder")


def _walk(folder: Path) -> tuple[set[str], list[str]]:
    """Relative POSIX paths of regular files under `folder`, and of anything else odd."""
    files: set[str] = set()
    odd: list[str] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in list(dirs):
            full = Path(root, name)
            if full.is_symlink():
                odd.append(full.relative_to(folder).as_posix())
        for name in names:
            full = Path(root, name)
            rel = full.relative_to(folder).as_posix()
            if full.is_symlink() or not full.is_file():
                odd.append(rel)
            else:
                files.add(rel)
    return files, odd


def sign_folder(folder: Path, key: SigningKey, signature_name: str,
                known_sha256: Mapping[Path, str] | None = None) -> Path:
    """Signs every file under `folder` (recursively) except `<folder>/<signature_name>`.

    `known_sha256` ("0x" + hex by path) are digests of files the caller has just written and
    hashed; they are signed as given instead of being read again.

    The signature is written atomically (a temporary file in the folder, then `os.replace`),
    so a crash leaves either the old signature or the new one, never half of one.
    """
    import model_signing

    folder = Path(folder)
    _check_signature_name(signature_name)
    _check_folder(folder)
    _, odd = _walk(folder)
    if odd:
        raise BadInput(f"cannot sign a folder holding symlinks or special files: "
                       f"{', '.join(sorted(odd))}", path=folder)
    target = folder / signature_name
    tmp = folder / f".{signature_name}.{uuid.uuid4().hex}.tmp"  # created only after hashing
    try:
        config = (model_signing.signing.Config()
                  .use_elliptic_key_signer(private_key=key.path, password=key.password)
                  .set_hashing_config(_hashing_config(signature_name, known_sha256)))
    except (ValueError, TypeError, OSError, crypto_exceptions.UnsupportedAlgorithm) as err:
        raise SigningError(f"cannot load the private key: {err}", path=key.path) from err
    try:
        config.sign(folder, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except ReceError:
        raise
    except (ValueError, TypeError, crypto_exceptions.UnsupportedAlgorithm) as err:
        raise BadInput(f"cannot sign the folder: {err}", path=folder) from err
    except OSError as err:
        raise WriteFailure(f"cannot write the signature: {err.strerror or err}",
                           path=target) from err
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _signed_statement(raw: bytes, sig_path: Path) -> dict:
    try:
        bundle = json.loads(raw)
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        statement["predicate"]["resources"]  # noqa: B018 - presence check
        statement["predicate"]["serialization"]  # noqa: B018
        return statement
    except (ValueError, KeyError, TypeError) as err:
        raise SignatureInvalid("is not a model-signing signature bundle", path=sig_path,
                               hint="re-sign the folder") from err


def _summarise_failure(err: Exception) -> str:
    """model-signing's failure text (digest reprs and all) cut down to what changed."""
    text = str(err) or type(err).__name__
    if isinstance(err, crypto_exceptions.InvalidSignature) or "Key mismatch" in text:
        return "signed by another key, or the signature was tampered with"
    if not text.startswith("Signature mismatch"):
        return text
    parts = []
    changed = re.findall(r"Hash mismatch for '([^']+)'", text)
    if changed:
        parts.append("changed: " + ", ".join(changed))
    for label, pattern in (("added", r"Extra files found in model '[^']*': ([^\"\]]+)"),
                           ("missing", r"Missing files in model '[^']*': ([^\"\]]+)")):
        found = re.search(pattern, text)
        if found:
            parts.append(f"{label}: {found.group(1).strip()}")
    return "; ".join(parts) if parts else text


def verify_folder(folder: Path, public_key_path: Path, signature_name: str) -> str:
    """Checks `<folder>/<signature_name>` against the folder and the public key.

    Returns the signer's fingerprint. Raises `SignatureInvalid` (exit 1) when the folder is
    unsigned or does not match (a byte changed, a file added or removed, another key) and
    `SigningError` (exit 2) when the public key itself is unusable.
    """
    import model_signing

    folder = Path(folder)
    _check_signature_name(signature_name)
    _check_folder(folder)
    public_key = load_public_key(public_key_path)
    sig_path = folder / signature_name
    if not sig_path.is_file() or sig_path.is_symlink():
        raise SignatureInvalid("no signature: the folder is unsigned", path=sig_path,
                               hint="outputs are signed only when every gate passed and a "
                                    "signing key is configured")
    try:
        raw = sig_path.read_bytes()
    except OSError as err:
        raise SignatureInvalid(f"cannot read the signature: {err.strerror or err}",
                               path=sig_path) from err
    statement = _signed_statement(raw, sig_path)

    # Verify the very bytes we parse (a private copy), so the signature cannot change
    # between the cryptographic check and our own checks below.
    tmpdir = tempfile.mkdtemp(prefix="rece-verify-")
    try:
        copy = Path(tmpdir) / signature_name
        copy.write_bytes(raw)
        try:
            (model_signing.verifying.Config()
             .use_elliptic_key_verifier(public_key=public_key_path)
             .set_hashing_config(_hashing_config(signature_name))
             .verify(folder, copy))
        except (ValueError, KeyError, TypeError, crypto_exceptions.InvalidSignature) as err:
            reason = _summarise_failure(err)
            raise SignatureInvalid(f"does not match its signature: {reason}", path=folder,
                                   hint=f"signature {sig_path}") from err
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    # Stricter than model-signing: the signature must be one the CLI can check, and every
    # file on disk (git-looking ones included) must be listed in it.
    ser = statement["predicate"]["serialization"]
    ignored = set(ser.get("ignore_paths") or [])
    if ser.get("method") != "files" or ser.get("hash_type") != HASH_ALGORITHM \
            or not ignored <= {signature_name}:
        raise SignatureInvalid(f"signature uses settings rece-tool does not accept: {ser}",
                               path=sig_path, hint="re-sign the folder with rece-tool")
    signed = {r["name"] for r in statement["predicate"]["resources"]}
    on_disk, odd = _walk(folder)
    on_disk.discard(signature_name)
    unsigned = sorted((on_disk - signed) | set(odd))
    if unsigned:
        raise SignatureInvalid(f"files not covered by the signature: {', '.join(unsigned)}",
                               path=folder, hint=f"signature {sig_path}")
    missing = sorted(signed - on_disk)
    if missing:  # model-signing already catches this; kept as a belt-and-braces check
        raise SignatureInvalid(f"signed files are missing: {', '.join(missing)}", path=folder)
    return fingerprint(public_key)
