"""ModelSpec + `rece.*` provenance metadata for the output header (DESIGN.md §4).

Values are deterministic for the same inputs: no timings, and the date comes from
`SOURCE_DATE_EPOCH` when it is set, so reruns are byte-identical.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from . import __version__

MODELSPEC_VERSION = "1.0.0"
PROVENANCE_SCHEMA = "1"
HASH_PLACEHOLDER = "0x" + "0" * 64  # same length as the final "0x" + sha256 hex


def release_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    seconds = int(epoch) if epoch and epoch.isdigit() else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def header_metadata(source: Mapping[str, str], *, architecture: str, title: str,
                    concept_sets: list[dict], audit_summary: dict, date: str,
                    source_sha256: str = HASH_PLACEHOLDER, data_sha256: str = HASH_PLACEHOLDER,
                    ) -> dict[str, str]:
    """The source's metadata, extended. Hash arguments default to fixed-length placeholders."""
    meta = dict(source)
    meta.update({
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.title": title,
        "modelspec.hash_sha256": data_sha256,
        "modelspec.date": date,
        "rece.schema": PROVENANCE_SCHEMA,
        "rece.tool": f"rece-tool {__version__}",
        "rece.source_sha256": source_sha256,
        "rece.concept_sets": _json(concept_sets),
        "rece.audit": _json(audit_summary),
    })
    return meta


def read_provenance(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The `rece.*` provenance of a sanitized file, decoded; None if the file carries none."""
    if "rece.schema" not in metadata:
        return None
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if key.startswith("rece.") or key.startswith("modelspec."):
            try:
                out[key] = json.loads(value) if key in ("rece.concept_sets", "rece.audit") else value
            except ValueError:
                out[key] = value
    return out
