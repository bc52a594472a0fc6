"""Skip-if-done: rerunning a manifest does not redo a checkpoint whose result is already there.

An output folder counts as done for a run only if its audit.json records the same tool
version, the same settings (concept sets, gates, image audit) and the same source bytes
(sha256, recomputed), passed every gate, every recorded model file is present with the
recorded header, and it is signed whenever this run would sign.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from . import __version__
from .checkpoint.safetensors_format import file_sha256, header_sha256
from .manifest import CheckpointSpec, Manifest


def run_fingerprint(manifest: Manifest, spec: CheckpointSpec) -> str:
    """What, besides the source bytes, determines a checkpoint's output."""
    doc = {
        "tool": __version__,
        "concept_sets": [cs.settings() for cs in manifest.sets_for(spec)],
        "audit": dataclasses.asdict(manifest.audit),
        "tokenizer": str(spec.tokenizer) if spec.tokenizer else None,
    }
    text = json.dumps(doc, sort_keys=True, default=str, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def already_done(manifest: Manifest, spec: CheckpointSpec, will_sign: bool) -> str | None:
    """Why the existing output can be kept, or None if it must be (re)made."""
    folder = manifest.output_dir / spec.name
    try:
        audit = json.loads((folder / "audit.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if audit.get("inputs_fingerprint") != run_fingerprint(manifest, spec) or not audit.get("passed"):
        return None
    if will_sign and not audit.get("signature", {}).get("signed"):
        return None
    files = audit.get("output", {}).get("files", [])
    if not files:
        return None
    sources: dict[str, str] = {}
    for entry in files:
        out = folder / entry.get("path", "")
        if not out.is_file() or entry.get("bytes") != out.stat().st_size:
            return None
        if header_sha256(out) != entry.get("header_sha256"):
            return None
        src = Path(entry.get("source", ""))
        if not src.is_file():
            return None
        if str(src) not in sources:
            sources[str(src)] = file_sha256(src)
        if sources[str(src)] != entry.get("source_sha256"):
            return None
    return "same source bytes and settings already sanitized"
