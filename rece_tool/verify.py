"""`rece-tool verify`: is this folder exactly what passed the gate, with the audit log that says so?

Order matters: the signature is checked first, so nothing read afterwards (audit.json, the
model header) is trusted before it is known to be what the signer wrote. Then the model and
its audit log must agree with each other: recorded hashes = file bytes, header `rece.*`
provenance = audit log, every gate passed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint.safetensors_format import file_sha256, read_header
from .errors import BadInput, CheckpointError
from .signing import SIGNATURE_SUFFIX, SignatureInvalid, verify_folder


@dataclass
class VerifyOutcome:
    folder: str
    ok: bool = False
    signer_fingerprint: str | None = None
    checkpoint: str | None = None
    concept_sets: list[dict] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"schema": "rece-tool/verify", "schema_version": 1, **asdict(self)}

    def lines(self) -> list[str]:
        head = "OK" if self.ok else "FAILED"
        out = [f"{head}: {self.folder}"]
        if self.signer_fingerprint:
            out.append(f"  signed by   {self.signer_fingerprint}")
        if self.checkpoint:
            out.append(f"  model       {self.checkpoint} ({', '.join(self.files)})")
        for cs in self.concept_sets:
            out.append(f"  erased      {cs['name']}: {', '.join(cs['erase'])} (preset {cs['preset']}, "
                       f"epochs {cs['epochs']}, reg {cs['reg']}, {cs['preserve_count']} preserve texts)")
        for g in self.gates:
            out.append(f"  gate        {'PASS' if g['passed'] else 'FAIL'} {g['name']} = "
                       f"{g['value']:.4g} (threshold {g['threshold']:.4g})" if g['value'] is not None else
                       f"  gate        {'PASS' if g['passed'] else 'FAIL'} {g['name']}")
        for p in self.problems:
            out.append(f"  problem     {p}")
        return out


def _signature_name(folder: Path) -> str:
    sigs = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(SIGNATURE_SUFFIX))
    if len(sigs) != 1:
        raise SignatureInvalid(f"expected exactly one {SIGNATURE_SUFFIX} signature file, found "
                               f"{len(sigs)}", path=folder,
                               hint="an unsigned output never passed its gates, or was not signed")
    return sigs[0]


def _data_sha256(path: Path) -> tuple[str, str, dict]:
    header = read_header(path)
    return ("0x" + hashlib.sha256(header.raw).hexdigest(), file_sha256(path, header.data_start),
            header.metadata)


def verify_output(folder: Path, public_key: Path) -> VerifyOutcome:
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput("is not a folder", path=folder, hint="pass a sanitized output folder")
    outcome = VerifyOutcome(str(folder))
    try:
        outcome.signer_fingerprint = verify_folder(folder, public_key, _signature_name(folder))
    except SignatureInvalid as exc:
        outcome.problems.append(exc.diagnostics())
        return outcome

    try:
        audit = json.loads((folder / "audit.json").read_text("utf-8"))
    except (OSError, ValueError) as exc:
        outcome.problems.append(f"audit.json unreadable: {exc}")
        return outcome
    problems = outcome.problems
    outcome.checkpoint = audit.get("checkpoint", {}).get("name")
    outcome.concept_sets = audit.get("concept_sets", [])
    outcome.gates = audit.get("gates", [])

    recorded_fp = audit.get("signature", {}).get("fingerprint")
    if recorded_fp != outcome.signer_fingerprint:
        problems.append(f"audit.json names signer {recorded_fp}, but the folder is signed by "
                        f"{outcome.signer_fingerprint}")
    if not audit.get("passed") or not all(g.get("passed") for g in outcome.gates):
        problems.append("audit.json records a failed gate")

    for entry in audit.get("output", {}).get("files", []):
        rel = Path(entry["path"])
        path = folder / rel
        outcome.files.append(str(rel))
        if rel.is_absolute() or ".." in rel.parts or not path.is_file():
            problems.append(f"{rel}: recorded in audit.json but missing")
            continue
        try:
            header_hash, data_hash, meta = _data_sha256(path)
        except CheckpointError as exc:
            problems.append(exc.diagnostics())
            continue
        if header_hash != entry.get("header_sha256"):
            problems.append(f"{rel}: header does not match the hash in audit.json")
        if data_hash != entry.get("data_sha256") or data_hash != meta.get("modelspec.hash_sha256"):
            problems.append(f"{rel}: tensor data does not match its recorded sha256")
        if meta.get("rece.source_sha256") != entry.get("source_sha256"):
            problems.append(f"{rel}: header names another source file than audit.json")
        try:
            header_sets = json.loads(meta.get("rece.concept_sets", "null"))
            header_audit = json.loads(meta.get("rece.audit", "null"))
        except ValueError:
            header_sets = header_audit = None
        if header_sets != outcome.concept_sets:
            problems.append(f"{rel}: header provenance (rece.concept_sets) differs from audit.json")
        if not header_audit or header_audit.get("gates_passed") is not True:
            problems.append(f"{rel}: header audit summary does not record passed gates")
    if not outcome.files:
        problems.append("audit.json lists no model file")
    outcome.ok = not problems
    return outcome
