"""Bad inputs through the real CLI: refused with exit 2 and one line, nothing touched, nothing left.

One table, one parametrized test. Every case builds its own workspace (a manifest, patched
copies of a tiny valid checkpoint, keys, folders) and runs `rece-tool sanitize` in a
subprocess, exactly as a release pipeline would. For every case:

* the exit code is the documented one (2: bad input);
* stderr is exactly one line, no traceback, and it names the file at fault and the field or
  key (or the specific defect, for whole-file problems);
* every file of the workspace (sources, keys, an output folder that already existed) is
  byte-identical afterwards, and no file appeared under the output folder;
* the shared source checkpoints are byte-identical afterwards.

The CLI costs ~1-4 s a case (torch import), so the selected cases run on a small thread pool
of subprocesses once per module; each parametrized test then checks its own outcome. To keep
the module fast, manifest cases that fail inside `manifest.load` (marked `M`) and the few cases
that fail only after the text encoder ran (marked `P`) call the same click entry point
(`rece_tool._cli.main`, error mapping included) in-process; every other case — well over 30 —
is a real `python -m rece_tool._cli` subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import sha256

WORKERS = max(1, min(4, os.cpu_count() or 1))
KV = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
KV_V = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
TEXT_TENSOR = "cond_stage_model.transformer.text_model.final_layer_norm.weight"


# --- the workspace of one case -----------------------------------------------------------------

@dataclass
class Ctx:
    root: Path                       # the case's own folder (manifest, patched files, out/)
    models: Callable[..., Path]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    manifest_path: Path | None = None
    at_fault: Path | None = None     # the file the error line must name (default: the manifest)
    shared: list[Path] = field(default_factory=list)  # sources outside root, hashed too

    @property
    def model(self) -> Path:
        p = self.models("fp32")
        if p not in self.shared:
            self.shared.append(p)
        return p

    def manifest(self, *, version: str | None = "version = 1", head: str = "",
                 output: str = 'dir = "out"', ck: str | None = None, ck_extra: str = "",
                 cs: str | None = 'name = "nudity"\npreset = "nudity"', cs_extra: str = "",
                 tail: str = "", model: Path | str | None = None) -> Path:
        if ck is None:
            ck = f'name = "m"\npath = "{model if model is not None else self.model}"'
        parts = [version or "", head, "[output]", output, "[[checkpoint]]", ck, ck_extra]
        if cs is not None:
            parts += ["[[concept_set]]", cs, cs_extra]
        parts.append(tail)
        return self.write_manifest("\n".join(parts) + "\n")

    def write_manifest(self, text: str | bytes) -> Path:
        self.manifest_path = self.root / "manifest.toml"
        if isinstance(text, str):
            text = text.encode("utf-8")
        self.manifest_path.write_bytes(text)
        return self.manifest_path

    def bad_checkpoint(self, name: str = "bad.safetensors", **kw) -> Path:
        """The manifest names `name` (made by the caller); the error must name it."""
        path = self.root / name
        self.manifest(model=path, **kw)
        self.at_fault = path
        return path


# --- patching a tiny valid checkpoint ----------------------------------------------------------

def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(doc: dict | None, data: bytes, body: bytes | None = None) -> bytes:
    if body is None:
        body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def patched(ctx: Ctx, mutate: Callable[[dict, bytes], tuple[dict | None, bytes] | bytes],
            **kw) -> Path:
    """A copy of the tiny model with its header (and/or data) changed by `mutate`."""
    doc, data = split(ctx.model)
    out = mutate(doc, data)
    path = ctx.bad_checkpoint(**kw)
    path.write_bytes(out if isinstance(out, bytes) else join(*out))
    return path


def set_entry(name: str, key: str, value):
    def mutate(doc, data):
        doc[name][key] = value
        return doc, data
    return mutate


def shift(name: str, delta: int):
    def mutate(doc, data):
        b, e = doc[name]["data_offsets"]
        doc[name]["data_offsets"] = [b + delta, e + delta]
        return doc, data
    return mutate


def rename_keys(old: str, new: str):
    def mutate(doc, data):
        return {k.replace(old, new): v for k, v in doc.items()}, data
    return mutate


def poke_float(name: str, value: float):
    def mutate(doc, data):
        b = doc[name]["data_offsets"][0]
        buf = bytearray(data)
        buf[b:b + 4] = struct.pack("<f", value)
        return doc, bytes(buf)
    return mutate


def _key_pem(kind: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = ec.generate_private_key(ec.SECP521R1() if kind == "p521" else ec.SECP256R1())
    if kind == "public":
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def key_file(ctx: Ctx, kind: str, via_env: bool = True) -> Path:
    path = ctx.root / f"{kind}.pem"
    path.write_bytes(b"this is not a PEM key\n\x00\xff" if kind == "garbage" else _key_pem(kind))
    path.chmod(0o600)
    if via_env:
        ctx.env["RECE_SIGNING_KEY"] = str(path)
    ctx.at_fault = path
    return path


def diffusers_copy(ctx: Ctx) -> Path:
    folder = ctx.root / "pipe"
    shutil.copytree(ctx.models("fp32", diffusers=True), folder)
    return folder


# --- the cases ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Ctx], None]
    names: tuple[str, ...]           # substrings the one stderr line must hold (field / key / defect)
    code: int = 2
    xfail: str | None = None         # a known bug in a file this test does not own
    inproc: bool = False             # the same CLI entry point, in this process (see below)


def _ill_conditioned(ctx):
    ctx.manifest(cs_extra="[concept_set.uce]\nerase_scale = 1e300")


def _dup_tensor(ctx):
    doc, data = split(ctx.model)
    body = json.dumps(doc, separators=(",", ":"))
    body = body.replace(json.dumps(KV_V), json.dumps(KV))  # the same name twice
    path = ctx.bad_checkpoint()
    path.write_bytes(join(None, data, body.encode()))


def _not_json(ctx):
    doc, data = split(ctx.model)
    path = ctx.bad_checkpoint()
    path.write_bytes(join(None, data, b"{this is not json" + b" " * 64))


def _deep_json(ctx):
    path = ctx.bad_checkpoint()
    path.write_bytes(join(None, b"", b'{"a":' + b"[" * 900 + b"]" * 900 + b"}"))


def _surrogate_name(ctx):
    doc, data = split(ctx.model)
    body = json.dumps(doc, separators=(",", ":")).replace(json.dumps(TEXT_TENSOR),
                                                          json.dumps(TEXT_TENSOR + "\ud800"))
    path = ctx.bad_checkpoint()
    path.write_bytes(join(None, data, body.encode("utf-8", "surrogatepass").replace(
        "\ud800".encode("utf-8", "surrogatepass"), b"\\ud800")))


def _header_len(value: Callable[[int], int]):
    def build(ctx):
        raw = bytearray(ctx.model.read_bytes())
        raw[:8] = struct.pack("<Q", value(len(raw)))
        ctx.bad_checkpoint().write_bytes(bytes(raw))
    return build


def _truncated(ctx):
    raw = ctx.model.read_bytes()
    ctx.bad_checkpoint().write_bytes(raw[: len(raw) * 6 // 10])


def _empty(ctx):
    ctx.bad_checkpoint().write_bytes(b"")


def _fifo(ctx):
    path = ctx.bad_checkpoint()
    os.mkfifo(path)


def _pickle(ctx):
    path = ctx.bad_checkpoint("m.ckpt")
    path.write_bytes(b"\x80\x04\x95 pickled data: never unpickled\n.")


def _past_end(ctx):
    def mutate(doc, data):
        b, e = doc[KV]["data_offsets"]
        doc[KV]["data_offsets"] = [b + len(data), e + len(data)]
        return doc, data
    patched(ctx, mutate)


def _no_text_encoder(ctx):
    patched(ctx, rename_keys("cond_stage_model.", "cond_stage_modl."))


def _diffusers_bin(ctx):
    folder = diffusers_copy(ctx)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_suffix(".bin"))
    ctx.manifest(model=folder)
    ctx.at_fault = folder / "unet"


def _shard_outside(ctx):
    folder = diffusers_copy(ctx)
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {KV: "../../../../escape.safetensors"}}))
    ctx.manifest(model=folder)
    ctx.at_fault = index


def _tokenizer_without_vocab(ctx):
    (ctx.root / "tok").mkdir()
    (ctx.root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    ctx.manifest(ck_extra='tokenizer = "tok"')
    ctx.at_fault = ctx.root / "tok"


def _key(kind: str):
    def build(ctx):
        key_file(ctx, kind)
        ctx.manifest()
    return build


def _require_signature(ctx):
    ctx.manifest()
    ctx.args.append("--require-signature")


def _out_is_file(ctx):
    (ctx.root / "out").write_text("I am a file, not a folder\n")
    ctx.manifest()
    ctx.at_fault = ctx.root / "out"


def _out_exists(ctx):
    (ctx.root / "out" / "m").mkdir(parents=True)
    (ctx.root / "out" / "m" / "m.safetensors").write_bytes(b"a previous release")
    (ctx.root / "out" / "m" / "audit.json").write_text("{}")
    ctx.manifest()
    ctx.at_fault = ctx.root / "out" / "m"


def _out_symlink(ctx):
    (ctx.root / "elsewhere").mkdir()
    (ctx.root / "elsewhere" / "keep.txt").write_text("keep")
    (ctx.root / "out").symlink_to(ctx.root / "elsewhere")
    ctx.manifest()
    ctx.at_fault = ctx.root / "out"


def _target_symlink(ctx):
    (ctx.root / "elsewhere").mkdir()
    (ctx.root / "out").mkdir()
    (ctx.root / "out" / "m").symlink_to(ctx.root / "elsewhere")
    ctx.manifest()
    ctx.args.append("--overwrite")
    ctx.at_fault = ctx.root / "out" / "m"


def _source_inside_output(ctx):
    (ctx.root / "out" / "m").mkdir(parents=True)
    shutil.copyfile(ctx.model, ctx.root / "out" / "m" / "src.safetensors")
    ctx.manifest(ck='name = "m"\npath = "out/m/src.safetensors"')
    ctx.args.append("--overwrite")  # would replace out/m, the source with it


def _output_inside_diffusers(ctx):
    folder = diffusers_copy(ctx)
    ctx.manifest(model=folder, output='dir = "pipe/out"')


def _m(**kw):
    return lambda ctx: ctx.manifest(**kw)


def M(*args, **kwargs) -> Case:
    """A manifest case that fails inside `manifest.load`: run in-process (same entry point)."""
    return Case(*args, **kwargs, inproc=True)


def P(*args, **kwargs) -> Case:
    """A case that fails only after the text encoder ran (seconds of work per fresh process):
    run in-process, where transformers is imported once."""
    return Case(*args, **kwargs, inproc=True)


CS_OBJECTS = 'name = "objs"\nerase = ["cat", "dog", "car"]'

CASES = [
    # -- manifest: unknown keys at every level
    Case("m-unknown-top", _m(head='colour = "red"'), ("colour", "unknown key")),
    M("m-unknown-output", _m(output='dir = "out"\ndri = "x"'), ("output.dri",)),
    M("m-unknown-checkpoint", _m(ck_extra='tokeniser = "x"'), ("checkpoint[0].tokeniser",)),
    M("m-unknown-concept-set", _m(cs_extra="epoch = 3"), ("concept_set[0].epoch",)),
    M("m-unknown-uce", _m(cs_extra="[concept_set.uce]\nlambda = 1.0"), ("concept_set[0].uce.lambda",)),
    M("m-unknown-rece", _m(cs_extra="[concept_set.rece]\nerase_scal = 1.0"), ("concept_set[0].rece.erase_scal",)),
    M("m-unknown-audit", _m(tail="[audit]\nmax_residual = 0.1"), ("audit.max_residual",)),
    M("m-unknown-images", _m(tail="[audit.images]\nenable = true"), ("audit.images.enable",)),
    # -- manifest: wrong types, missing keys, bad values
    M("m-type-version", _m(version='version = "1"'), ("version",)),
    M("m-type-epochs", _m(cs_extra='epochs = "3"'), ("concept_set[0].epochs",)),
    M("m-type-erase", _m(cs='name = "x"\nerase = "nudity"'), ("concept_set[0].erase",)),
    M("m-type-gate", _m(tail='[audit]\nmax_erase_residual = "low"'), ("audit.max_erase_residual",)),
    M("m-type-reg-nan", _m(cs_extra="reg = nan"), ("concept_set[0].reg",)),
    M("m-missing-version", _m(version=None), ("version", "required")),
    M("m-missing-cs-name", _m(cs='preset = "nudity"'), ("concept_set[0].name", "required")),
    M("m-missing-ck-path", _m(ck='name = "m"'), ("checkpoint[0].path", "required")),
    M("m-missing-concept-set", _m(cs=None), ("concept_set", "required")),
    M("m-version-2", _m(version="version = 2"), ("version", "unsupported")),
    Case("m-dup-checkpoint", lambda c: c.manifest(tail=f'[[checkpoint]]\nname = "m"\npath = "{c.model}"'),
         ("checkpoint[1].name", "duplicate")),
    M("m-dup-concept-set", _m(tail='[[concept_set]]\nname = "nudity"\npreset = "unsafe"'),
         ("concept_set[1].name", "duplicate")),
    Case("m-name-dotdot", lambda c: c.manifest(ck=f'name = "../x"\npath = "{c.model}"'), ("checkpoint[0].name",)),
    M("m-name-hidden", lambda c: c.manifest(ck=f'name = ".hidden"\npath = "{c.model}"'), ("checkpoint[0].name",)),
    M("m-name-slash", lambda c: c.manifest(ck=f'name = "a/b"\npath = "{c.model}"'), ("checkpoint[0].name",)),
    M("m-cs-name-unsafe", _m(cs='name = "../nudity"\npreset = "nudity"'), ("concept_set[0].name",)),
    Case("m-missing-ck-file", _m(ck='name = "m"\npath = "models/missing.safetensors"'),
         ("checkpoint[0].path", "missing.safetensors")),
    M("m-unknown-preset", _m(cs='name = "x"\npreset = "nudes"'), ("concept_set[0].preset", "nudes")),
    M("m-guide-mismatch", _m(cs=CS_OBJECTS + '\nguide = ["a", "b"]'), ("concept_set[0].guide",)),
    M("m-empty-erase", _m(cs='name = "x"\nerase = []'), ("concept_set[0].erase",)),
    M("m-epochs-negative", _m(cs_extra="epochs = -1"), ("concept_set[0].epochs",)),
    M("m-reg-zero", _m(cs_extra="reg = 0"), ("concept_set[0].reg",)),
    M("m-lamb-zero", _m(cs_extra="[concept_set.rece]\nlamb = 0"), ("concept_set[0].rece.lamb",)),
    M("m-image-size", _m(tail="[audit.images]\nsize = 100"), ("audit.images.size",)),
    Case("m-bad-toml", lambda c: c.write_manifest('version = 1\n[output\ndir = "out"\n'), ("TOML", "line 2")),
    Case("m-not-utf8", lambda c: c.write_manifest(b"version = 1\n# caf\xe9\n"), ("UTF-8",)),
    Case("m-manifest-missing", lambda c: setattr(c, "manifest_path", c.root / "nope.toml"), ("not found",)),
    M("m-preserve-file-missing", _m(cs_extra='preserve_file = "artists.txt"'),
         ("concept_set[0].preserve_file", "artists.txt")),
    M("m-concept-sets-unknown", _m(ck_extra='concept_sets = ["nudty"]'),
         ("checkpoint[0].concept_sets", "nudty")),
    Case("m-only-unknown", lambda c: (c.manifest(), c.args.extend(["--only", "nope"])), ("--only", "nope")),
    # -- checkpoints: formats and headers
    Case("c-pickle", _pickle, ("pickle",)),
    Case("c-fifo", _fifo, ("not a regular file",)),
    Case("c-empty", _empty, ("too short",)),
    Case("c-truncated", _truncated, ("data_offsets",)),
    Case("c-header-past-eof", _header_len(lambda size: size), ("header length", "past the end")),
    Case("c-header-huge", _header_len(lambda size: 2**64 - 1), ("header length", "limit")),
    Case("c-header-not-json", _not_json, ("not valid JSON",)),
    Case("c-header-deep", _deep_json, ("nests deeper",)),
    Case("c-dup-tensor", _dup_tensor, ("duplicate", KV)),
    Case("c-surrogate-name", _surrogate_name, ("not valid Unicode",)),
    Case("c-overlap", lambda c: patched(c, shift(KV, -4)), (KV, "overlaps")),
    Case("c-gap", lambda c: patched(c, shift(KV, 4)), (KV, "gap")),
    Case("c-offsets-past-end", _past_end, (KV, "outside")),
    Case("c-bytecount", lambda c: patched(c, set_entry(KV, "shape", [32, 63])),
         (KV, "dtype × shape")),
    Case("c-unknown-dtype", lambda c: patched(c, set_entry(KV, "dtype", "F33")),
         (KV, "F33")),
    Case("c-metadata-nonstring", lambda c: patched(c, set_entry("__metadata__", "format", 1)),
         ("__metadata__", "format")),
    # -- checkpoints: layout and contents
    Case("c-no-kv", lambda c: patched(c, rename_keys("attn2.to_", "attn2.tox")), ("attn2.to_k/to_v",)),
    Case("c-k-without-v", lambda c: patched(c, rename_keys(KV_V, KV_V.replace("to_v.weight", "to_v_gone.weight"))),
         (KV_V, "missing")),
    Case("c-width-mismatch", lambda c: patched(c, set_entry(KV, "shape", [64, 32])),
         (KV, "width 64")),
    Case("c-nan-kv", lambda c: patched(c, poke_float(KV, float("nan"))), (KV, "non-finite")),
    P("c-inf-text-encoder", lambda c: patched(c, poke_float(TEXT_TENSOR, float("inf"))),
         ("final_layer_norm.weight", "non-finite")),
    Case("c-no-text-encoder", _no_text_encoder, ("unknown layout", "cond_stage_model.transformer.")),
    Case("c-diffusers-bin", _diffusers_bin, (".bin", "pickle")),
    Case("c-diffusers-shard-outside", _shard_outside, ("outside",)),
    P("c-ill-conditioned", _ill_conditioned, ("ill-conditioned", "nudity", "uce.lamb")),
    # -- tokenizer
    P("t-no-vocab", _tokenizer_without_vocab, ("vocab.json",)),
    # -- keys
    Case("k-garbage-env", _key("garbage"), ("PEM",)),
    Case("k-ed25519", _key("ed25519"), ("Ed25519",)),
    Case("k-p521", _key("p521"), ("secp521r1",)),
    Case("k-public-as-private", _key("public"), ("public key",)),
    Case("k-missing-in-manifest", _m(output='dir = "out"\nsigning_key = "keys/release.pem"'),
         ("output.signing_key", "release.pem")),
    Case("k-require-signature", _require_signature, ("output.signing_key",)),
    # -- filesystem
    P("f-out-is-file", _out_is_file, ("output.dir", "not a folder")),
    P("f-out-exists", _out_exists, ("already exists", "--overwrite")),
    P("f-out-symlink", _out_symlink, ("output.dir", "symbolic link")),
    P("f-target-symlink", _target_symlink, ("outside the output folder",)),
    M("f-source-inside-output", _source_inside_output, ("checkpoint[0].path", "inside the output folder")),
    M("f-output-inside-diffusers", _output_inside_diffusers, ("output.dir", "inside the checkpoint folder")),
]
assert len({c.id for c in CASES}) == len(CASES)


# --- running them ------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`, by kind and content (links by target, never followed)."""
    out = {}
    if not root.exists() and not root.is_symlink():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            out[rel] = "link:" + os.readlink(p)
        elif stat.S_ISDIR(mode):
            out[rel] = "dir"
        elif stat.S_ISREG(mode):
            out[rel] = "file:" + sha256(p)
        else:
            out[rel] = f"special:{stat.S_IFMT(mode):o}"
    return out


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    ctx: Ctx
    before: dict[str, str]
    after: dict[str, str]
    shared_before: dict[str, str]
    shared_after: dict[str, str]


def _argv(ctx: Ctx) -> list[str]:
    return ["sanitize", str(ctx.manifest_path), "--quiet", "--device", "cpu", *ctx.args]


def _env(ctx: Ctx) -> dict[str, str]:
    return {"RECE_SIGNING_KEY": "", "RECE_SIGNING_KEY_PASSWORD": "", **ctx.env}


def _run(ctx: Ctx) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter (as conftest.run_cli does)."""
    return subprocess.run([sys.executable, "-m", "rece_tool._cli", *_argv(ctx)], capture_output=True,
                          text=True, env={**os.environ, **_env(ctx)}, timeout=300, cwd=ctx.root)


def _run_inproc(ctx: Ctx) -> subprocess.CompletedProcess:
    """The same click entry point (`rece_tool._cli.main`, `_guarded` included) in this process.

    They differ from the subprocess cases only in skipping the interpreter + torch (+
    transformers) start-up. Must run in the main thread (`_guarded` installs a SIGTERM handler,
    restored afterwards).
    """
    from click.testing import CliRunner

    from rece_tool._cli import main

    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(main, _argv(ctx), env=_env(ctx), catch_exceptions=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))  # escaped _guarded
    return subprocess.CompletedProcess(["rece-tool", *_argv(ctx)], result.exit_code,
                                       result.stdout, stderr)


@pytest.fixture(scope="module")
def outcomes(request, models, tmp_path_factory) -> dict[str, Outcome]:
    """Build every selected case's workspace, run them all (a few at a time), snapshot around."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input"
                and hasattr(item, "callspec")}
    base = tmp_path_factory.mktemp("bad")
    ctxs: dict[str, Ctx] = {}
    for case in CASES:
        if case.id not in selected:
            continue
        ctx = Ctx(base / case.id, models)
        ctx.root.mkdir()
        case.build(ctx)
        assert ctx.manifest_path is not None, case.id
        ctxs[case.id] = ctx
    shared = {p for ctx in ctxs.values() for p in ctx.shared}
    before = {cid: snapshot(ctx.root) for cid, ctx in ctxs.items()}
    shared_before = {str(p): sha256(p) for p in shared}
    inproc = {c.id for c in CASES if c.inproc}
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {cid: pool.submit(_run, ctx) for cid, ctx in ctxs.items() if cid not in inproc}
        procs = {cid: _run_inproc(ctx) for cid, ctx in ctxs.items() if cid in inproc}
        procs.update({cid: f.result() for cid, f in futures.items()})
    shared_after = {str(p): sha256(p) for p in shared}
    return {cid: Outcome(procs[cid], ctx, before[cid], snapshot(ctx.root), shared_before, shared_after)
            for cid, ctx in ctxs.items()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input(case: Case, outcomes):
    o = outcomes[case.id]
    proc, ctx = o.proc, o.ctx
    detail = f"exit {proc.returncode}\nstderr:\n{proc.stderr}\nstdout:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr, detail
    assert proc.returncode == case.code, detail
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, detail
    line = lines[0]
    print(f"{case.id}: exit {proc.returncode}: {line}")
    assert line.startswith("rece-tool: error: "), detail
    # names the file at fault ...
    at_fault = ctx.at_fault or ctx.manifest_path
    assert str(at_fault) in line or str(at_fault.resolve()) in line, f"{at_fault} not named: {line}"
    # ... and the field, key or defect
    for needle in case.names:
        assert needle in line, f"{needle!r} not named: {line}"
    # nothing touched, nothing left behind (an output folder that existed is unchanged)
    assert o.after == o.before, f"workspace changed: {line}"
    assert o.shared_after == o.shared_before
    assert not proc.stdout.strip(), detail
