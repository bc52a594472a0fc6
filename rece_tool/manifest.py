"""Manifest schema version 1 → typed, validated specs (DESIGN.md §6), and the presets (§2.3).

A manifest error names the manifest file and the key path (`concept_set[2].epochs`) and says
what was expected. Unknown keys are errors: a typo must never pass silently. Paths are
resolved against the manifest's folder.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .erase import EditScales
from .errors import ManifestError

SCHEMA_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_TEXT_FILE_BYTES = 64 * 1024 * 1024

UNSAFE_CONCEPTS = ["hate", "harassment", "violence", "suffering", "humiliation", "harm",
                   "suicide", "sexual", "nudity", "bodily fluids", "blood"]


@dataclass(frozen=True)
class Preset:
    erase: tuple[str, ...] | None  # None: the user names them (artist, object)
    guide: str
    epochs: int
    reg: float


PRESETS: dict[str, Preset] = {
    "nudity": Preset(("nudity",), " ", epochs=3, reg=0.1),
    "unsafe": Preset(tuple(UNSAFE_CONCEPTS), " ", epochs=2, reg=0.1),
    "artist": Preset(None, "art", epochs=1, reg=1e-3),
    "object": Preset(None, " ", epochs=1, reg=1e-3),
}
DEFAULT_PRESET = PRESETS["object"]  # without a preset every key defaults as in `object`
UCE_DEFAULTS = EditScales(lamb=0.5, erase_scale=1.0, preserve_scale=None)
RECE_DEFAULTS = EditScales(lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
SELECT_CHOICES = ("last", "best")


# --- resolved specs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ConceptSet:
    name: str
    preset: str | None
    erase: tuple[str, ...]
    guides: tuple[str, ...]     # one per erase concept
    preserve: tuple[str, ...]   # always starts with the empty prompt
    epochs: int
    reg: float
    uce: EditScales
    rece: EditScales
    probes: tuple[str, ...] = ()
    select: str = "last"

    def settings(self) -> dict[str, Any]:
        """Every hyperparameter, as recorded in provenance and audit.json."""
        return {
            "name": self.name, "preset": self.preset, "erase": list(self.erase),
            "guides": list(self.guides), "preserve_count": len(self.preserve),
            "preserve": list(self.preserve), "epochs": self.epochs, "reg": self.reg,
            "uce": _scales(self.uce, len(self.preserve)), "rece": _scales(self.rece, len(self.preserve)),
            "probes": list(self.probes), "select": self.select,
        }


def _scales(s: EditScales, preserve_count: int) -> dict[str, float]:
    ps = s.preserve_scale if s.preserve_scale is not None else max(0.1, 1.0 / max(preserve_count, 1))
    return {"lamb": s.lamb, "erase_scale": s.erase_scale, "preserve_scale": ps}


@dataclass(frozen=True)
class CheckpointSpec:
    name: str
    path: Path
    tokenizer: Path | None
    concept_sets: tuple[str, ...]


@dataclass(frozen=True)
class ImageAuditSpec:
    enabled: bool = False
    prompts: tuple[str, ...] = ()
    preserve_prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    steps: int = 25
    size: int = 512
    guidance: float = 7.5
    nudenet_threshold: float = 0.6
    max_nude_images: int | None = None
    clip_model: Path | None = None
    min_clip_score_ratio: float | None = None


@dataclass(frozen=True)
class AuditSpec:
    max_erase_residual: float | None = None
    max_attack_recovery: float | None = None
    max_preserve_drift: float | None = None
    images: ImageAuditSpec = field(default_factory=ImageAuditSpec)


@dataclass(frozen=True)
class Manifest:
    path: Path
    output_dir: Path
    signing_key: Path | None
    checkpoints: tuple[CheckpointSpec, ...]
    concept_sets: dict[str, ConceptSet]  # manifest order
    audit: AuditSpec

    def sets_for(self, checkpoint: CheckpointSpec) -> list[ConceptSet]:
        return [self.concept_sets[n] for n in checkpoint.concept_sets]


# --- typed field readers -----------------------------------------------------------------------

class _Reader:
    """Reads one TOML table, recording which keys were consumed so leftovers are reported."""

    def __init__(self, manifest: Path, table: Any, where: str):
        self.manifest, self.where = manifest, where
        if not isinstance(table, dict):
            raise self.error(None, f"must be a table, got {_type_name(table)}")
        self.table = table
        self.used: set[str] = set()

    def key(self, name: str | None) -> str:
        if name is None:
            return self.where
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str | None, message: str, hint: str | None = None) -> ManifestError:
        return ManifestError(message, path=self.manifest, field=self.key(name) or None, hint=hint)

    def get(self, name: str, check: Callable[[Any], Any], expected: str, default: Any = None,
            required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.table:
            if required:
                raise self.error(name, "is required")
            return default
        value = self.table[name]
        try:
            return check(value)
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise self.error(name, f"expected {expected}, got {_repr(value)}{detail}") from None

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.error(unknown[0], "unknown key", hint=f"known keys here: {known}")


def _type_name(v: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError()
    return v


def _nonempty_str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise TypeError()
    return v


def _str_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError()
    return tuple(v)


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or v < lo or (hi is not None and v > hi):
            raise ValueError(f"an integer in [{lo}, {hi if hi is not None else '∞'})")
        return v
    return check


def _float(lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise TypeError()
        v = float(v)
        if v < lo or (lo_open and v == lo) or v > hi:
            raise ValueError(f"must be {'>' if lo_open else '≥'} {lo:g}" + (f" and ≤ {hi:g}" if hi != math.inf else ""))
        return v
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError()
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str) or not NAME_PATTERN.match(v):
        raise ValueError("letters, digits, '.', '_' and '-' only, starting with a letter or digit")
    return v


# --- loading -----------------------------------------------------------------------------------

def load(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        with open(path, "rb") as f:  # bounded: a huge file (or /dev/zero) is never read whole
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError("manifest not found", path=path) from None
    except IsADirectoryError:
        raise ManifestError("is a folder, expected a manifest .toml file", path=path) from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {exc.strerror}", path=path) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes", path=path)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError("manifest is not UTF-8 text", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"invalid TOML: {exc}", path=path) from None
    return parse(doc, path)


def parse(doc: dict, path: Path) -> Manifest:
    base = path.resolve().parent
    top = _Reader(path, doc, "")
    version = top.get("version", _int(0), "an integer", required=True)
    if version != SCHEMA_VERSION:
        raise top.error("version", f"unsupported schema version {version}",
                        hint=f"this rece-tool reads version {SCHEMA_VERSION}")

    output = _Reader(path, top.get("output", lambda v: v, "a table", default={}), "output")
    out_dir = Path(os.path.normpath(base / output.get("dir", _nonempty_str, "a path string", default="sanitized")))
    key = output.get("signing_key", _nonempty_str, "a path string")
    output.done()
    signing_key = _existing(path, base / key, "output.signing_key", want_dir=False) if key else None

    sets_raw = top.get("concept_set", _table_list, "an array of tables [[concept_set]]", required=True)
    concept_sets: dict[str, ConceptSet] = {}
    for i, raw_set in enumerate(sets_raw):
        cs = _concept_set(path, base, raw_set, f"concept_set[{i}]")
        if cs.name in concept_sets:
            raise ManifestError(f"duplicate concept set name {cs.name!r}", path=path,
                                field=f"concept_set[{i}].name")
        concept_sets[cs.name] = cs
    if not concept_sets:
        raise top.error("concept_set", "at least one [[concept_set]] is required")

    ckpts_raw = top.get("checkpoint", _table_list, "an array of tables [[checkpoint]]", required=True)
    checkpoints: list[CheckpointSpec] = []
    for i, raw_ck in enumerate(ckpts_raw):
        ck = _checkpoint(path, base, raw_ck, f"checkpoint[{i}]", concept_sets)
        if any(c.name == ck.name for c in checkpoints):
            raise ManifestError(f"duplicate checkpoint name {ck.name!r}", path=path,
                                field=f"checkpoint[{i}].name", hint="names must be unique: they name the output folders")
        checkpoints.append(ck)
    if not checkpoints:
        raise top.error("checkpoint", "at least one [[checkpoint]] is required")

    audit = _audit(path, base, top.get("audit", lambda v: v, "a table", default={}))
    top.done()
    _check_select(path, concept_sets, audit.images)
    _check_inputs_outside_outputs(path, out_dir, signing_key, checkpoints)
    return Manifest(path, out_dir, signing_key, tuple(checkpoints), concept_sets, audit)


def _table_list(v: Any) -> list:
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise TypeError()
    return v


def _existing(manifest: Path, p: Path, key: str, want_dir: bool | None) -> Path:
    if not p.exists():
        raise ManifestError(f"{p} does not exist", path=manifest, field=key,
                            hint="paths are relative to the manifest's folder")
    if want_dir is True and not p.is_dir():
        raise ManifestError(f"{p} is not a folder", path=manifest, field=key)
    if want_dir is False and not p.is_file():
        raise ManifestError(f"{p} is not a file", path=manifest, field=key)
    return p


def _read_lines(manifest: Path, p: Path, key: str) -> tuple[str, ...]:
    _existing(manifest, p, key, want_dir=False)
    if p.stat().st_size > MAX_TEXT_FILE_BYTES:
        raise ManifestError(f"{p} is larger than {MAX_TEXT_FILE_BYTES} bytes", path=manifest, field=key)
    try:
        text = p.read_text("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{p} is not UTF-8 text", path=manifest, field=key) from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _scales_table(manifest: Path, raw: Any, where: str, defaults: EditScales) -> EditScales:
    r = _Reader(manifest, raw, where)
    scales = EditScales(
        lamb=r.get("lamb", _float(0.0, lo_open=True), "a number > 0", defaults.lamb),
        erase_scale=r.get("erase_scale", _float(0.0), "a number ≥ 0", defaults.erase_scale),
        preserve_scale=r.get("preserve_scale", _float(0.0), "a number ≥ 0", defaults.preserve_scale),
    )
    r.done()
    return scales


def _concept_set(manifest: Path, base: Path, raw: Any, where: str) -> ConceptSet:
    r = _Reader(manifest, raw, where)
    name = r.get("name", _name, "a name", required=True)
    preset_name = r.get("preset", _str, "a preset name")
    if preset_name is not None and preset_name not in PRESETS:
        raise r.error("preset", f"unknown preset {preset_name!r}",
                      hint=f"choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name] if preset_name else DEFAULT_PRESET

    erase = r.get("erase", _str_list, "a list of strings")
    if erase is None:
        if preset.erase is None:
            why = f"preset {preset_name!r} needs the concepts to erase" if preset_name else "required without a preset"
            raise r.error("erase", why)
        erase = preset.erase
    erase = tuple(dict.fromkeys(e.strip() for e in erase))
    if not erase or any(not e for e in erase):
        raise r.error("erase", "must list at least one non-empty concept")

    guide_raw = r.get("guide", lambda v: (v,) if isinstance(v, str) else _str_list(v),
                      "a string or a list of strings", (preset.guide,))
    if len(guide_raw) == 1:
        guides = guide_raw * len(erase)
    elif len(guide_raw) == len(erase):
        guides = guide_raw
    else:
        raise r.error("guide", f"lists {len(guide_raw)} guides for {len(erase)} erase concepts",
                      hint="give one string, or a list as long as erase")

    preserve = [""]
    preserve += r.get("preserve", _str_list, "a list of strings", ())
    preserve_file = r.get("preserve_file", _nonempty_str, "a path string")
    if preserve_file:
        preserve += _read_lines(manifest, base / preserve_file, f"{where}.preserve_file")
    # "" and " " tokenize identically: keep one empty prompt, first.
    preserve = [""] + [p for p in dict.fromkeys(preserve) if p.strip()]

    epochs = r.get("epochs", _int(0, 100), "an integer 0..100", preset.epochs)
    reg = r.get("reg", _float(0.0, lo_open=True), "a number > 0", preset.reg)
    uce = _scales_table(manifest, r.get("uce", lambda v: v, "a table", {}), f"{where}.uce", UCE_DEFAULTS)
    rece = _scales_table(manifest, r.get("rece", lambda v: v, "a table", {}), f"{where}.rece", RECE_DEFAULTS)
    probes = r.get("probes", _str_list, "a list of strings", ())
    select = r.get("select", _str, "a string", "last")
    if select not in SELECT_CHOICES:
        raise r.error("select", f"unknown value {select!r}", hint="choose 'last' or 'best'")
    r.done()
    return ConceptSet(name, preset_name, erase, tuple(guides), tuple(preserve), epochs, reg,
                      uce, rece, tuple(dict.fromkeys(probes)), select)


def _checkpoint(manifest: Path, base: Path, raw: Any, where: str,
                concept_sets: dict[str, ConceptSet]) -> CheckpointSpec:
    r = _Reader(manifest, raw, where)
    name = r.get("name", _name, "a name", required=True)
    ck_path = _existing(manifest, Path(os.path.normpath(base / r.get("path", _nonempty_str, "a path string",
                                                                  required=True))),
                        f"{where}.path", want_dir=None)
    tok = r.get("tokenizer", _nonempty_str, "a path string")
    tokenizer = _existing(manifest, base / tok, f"{where}.tokenizer", want_dir=True) if tok else None
    wanted = r.get("concept_sets", _str_list, "a list of concept set names")
    if wanted is None:
        wanted = tuple(concept_sets)
    else:
        for n in wanted:
            if n not in concept_sets:
                raise r.error("concept_sets", f"no concept set named {n!r}",
                              hint=f"defined: {', '.join(concept_sets)}")
        if not wanted:
            raise r.error("concept_sets", "must name at least one concept set")
        wanted = tuple(n for n in concept_sets if n in wanted)  # applied in manifest order
    r.done()
    return CheckpointSpec(name, ck_path, tokenizer, wanted)


def _audit(manifest: Path, base: Path, raw: Any) -> AuditSpec:
    r = _Reader(manifest, raw, "audit")
    ratio = _float(0.0)
    gates = {k: r.get(k, ratio, "a number ≥ 0") for k in
             ("max_erase_residual", "max_attack_recovery", "max_preserve_drift")}
    images = _images(manifest, base, r.get("images", lambda v: v, "a table", {}))
    r.done()
    return AuditSpec(images=images, **gates)


def _images(manifest: Path, base: Path, raw: Any) -> ImageAuditSpec:
    r = _Reader(manifest, raw, "audit.images")
    d = ImageAuditSpec()
    prompts = r.get("prompts", _str_list, "a list of strings", ())
    prompts_file = r.get("prompts_file", _nonempty_str, "a path string")
    if prompts_file:
        prompts += _read_lines(manifest, base / prompts_file, "audit.images.prompts_file")
    clip = r.get("clip_model", _nonempty_str, "a path string")
    seeds = r.get("seeds", lambda v: tuple(_int(0, 2**63 - 1)(x) for x in _list(v)),
                  "a list of non-negative integers", d.seeds)
    spec = ImageAuditSpec(
        enabled=r.get("enabled", _bool, "true or false", d.enabled),
        prompts=tuple(dict.fromkeys(prompts)),
        preserve_prompts=r.get("preserve_prompts", _str_list, "a list of strings", ()),
        seeds=tuple(dict.fromkeys(seeds)),  # a repeated seed would render (and name) the same image twice
        steps=r.get("steps", _int(1, 1000), "an integer 1..1000", d.steps),
        size=r.get("size", _size, "a multiple of 8 in 64..2048", d.size),
        guidance=r.get("guidance", _float(0.0, 100.0), "a number 0..100", d.guidance),
        nudenet_threshold=r.get("nudenet_threshold", _float(0.0, 1.0), "a number 0..1", d.nudenet_threshold),
        max_nude_images=r.get("max_nude_images", _int(0), "an integer ≥ 0"),
        clip_model=_existing(manifest, base / clip, "audit.images.clip_model", want_dir=True) if clip else None,
        min_clip_score_ratio=r.get("min_clip_score_ratio", _float(0.0), "a number ≥ 0"),
    )
    r.done()
    if spec.enabled and not spec.seeds:
        raise r.error("seeds", "must list at least one seed")
    if spec.enabled and not (spec.prompts or spec.preserve_prompts):
        raise r.error("prompts", "the image audit needs prompts or preserve_prompts")
    return spec


def _check_select(manifest: Path, concept_sets: dict[str, ConceptSet], images: ImageAuditSpec) -> None:
    """`select = "best"` scores each RECE round by the image audit's nude count: without that
    audit there is nothing to choose by, and silently shipping the last round would be a lie."""
    for i, cs in enumerate(concept_sets.values()):
        if cs.select == "best" and not (images.enabled and images.prompts):
            raise ManifestError('select = "best" keeps the round with the fewest nude images, which '
                                "needs the image audit", path=manifest, field=f"concept_set[{i}].select",
                                hint="set [audit.images] enabled = true with erase prompts, or select = \"last\"")


def _list(v: Any) -> list:
    if not isinstance(v, list):
        raise TypeError()
    return v


def _size(v: Any) -> int:
    if type(v) is not int or v % 8 or not 64 <= v <= 2048:
        raise ValueError()
    return v


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_inputs_outside_outputs(manifest: Path, out_dir: Path, signing_key: Path | None,
                                  checkpoints: list[CheckpointSpec]) -> None:
    """No input may live where a run writes: `<output.dir>/<name>` is replaced as a whole
    (with --overwrite), which would delete a source inside it, and a diffusers folder that
    holds the output folder would be copied into itself."""
    out = out_dir.resolve()
    targets = [out / ck.name for ck in checkpoints]
    inputs = [(f"checkpoint[{i}].path", ck.path) for i, ck in enumerate(checkpoints)]
    inputs += [(f"checkpoint[{i}].tokenizer", ck.tokenizer) for i, ck in enumerate(checkpoints)
               if ck.tokenizer is not None]
    if signing_key is not None:
        inputs.append(("output.signing_key", signing_key))
    for key, p in inputs:
        resolved = p.resolve()
        for target in targets:
            if _inside(resolved, target):
                raise ManifestError(f"{p} lies inside the output folder {target}, which a run replaces",
                                    path=manifest, field=key,
                                    hint="move the input elsewhere or choose another output.dir")
    for i, ck in enumerate(checkpoints):
        if ck.path.is_dir() and _inside(out, ck.path.resolve()):
            raise ManifestError(f"{out_dir} lies inside the checkpoint folder {ck.path}", path=manifest,
                                field="output.dir", hint=f"write outside checkpoint[{i}].path")
