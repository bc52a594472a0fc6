"""Open a checkpoint: detect layout and family, find and check its K/V projections.

Nothing here loads the whole model: headers are parsed, and only the tensors asked for are read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from .families import (DIFFUSERS, EMA_PREFIX, FAMILIES, SINGLE_FILE, Family, Layout,
                       TextEncoderLayout, ema_twin)
from .safetensors_format import Header, read_header

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
DIFFUSERS_UNET_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
DIFFUSERS_TEXT_NAMES = ("model.safetensors", "model.fp16.safetensors")


@dataclass
class WeightFile:
    """One safetensors file of the checkpoint that holds K/V projections."""

    header: Header
    relpath: Path                         # inside the checkpoint (diffusers) or its own name
    kv_keys: list[str]
    ema_twins: dict[str, str] = field(default_factory=dict)  # kv key → twin key


@dataclass
class TextEncoderSource:
    layout: TextEncoderLayout
    header: Header
    prefix: str                           # key prefix of its tensors in `header` ("" in a folder)
    config_dir: Path | None = None        # diffusers: folder with config.json

    @property
    def weights_format(self) -> str:
        """diffusers folders hold every encoder in the transformers layout, OpenCLIP ones too."""
        return "hf_clip" if self.config_dir is not None else self.layout.weights_format

    @property
    def hidden_state(self) -> str:
        """Which rows to take: a folder's copy of the tower may be truncated (SD 2.x)."""
        return self.layout.folder_hidden_state if self.config_dir is not None else self.layout.hidden_state


@dataclass
class Checkpoint:
    path: Path
    layout: Layout
    family: Family
    weight_files: list[WeightFile]
    text_encoders: list[TextEncoderSource]
    tokenizer_dirs: list[Path | None]     # per text encoder: the folder's own tokenizer, if any
    unet_params: int
    kv_params: int
    kv_width: int
    kv_dtypes: tuple[str, ...]

    @property
    def kv_count(self) -> int:
        return sum(len(f.kv_keys) for f in self.weight_files)

    @property
    def ema_count(self) -> int:
        return sum(len(f.ema_twins) for f in self.weight_files)

    @property
    def is_folder(self) -> bool:
        return self.layout is DIFFUSERS

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.weight_files[0].header.metadata)

    def describe(self) -> dict:
        """What `inspect` prints and audit.json records about the source."""
        return {
            "path": str(self.path), "layout": self.layout.name, "family": self.family.name,
            "family_title": self.family.title, "architecture": self.family.modelspec_architecture,
            "kv_dtypes": list(self.kv_dtypes), "kv_count": self.kv_count,
            "family_kv_count": self.family.real_kv_count, "ema_twins": self.ema_count,
            "context_dim": self.kv_width, "unet_params": self.unet_params, "kv_params": self.kv_params,
            "share_of_unet_modified": self.kv_params / max(self.unet_params, 1),
        }


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError("does not exist", path=path)
    if path.is_dir():
        return _open_diffusers(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.suffix} is a pickle, which can run code when loaded; rece-tool reads only safetensors",
            path=path, hint="convert it in an isolated sandbox, e.g. with diffusers' "
                            "scripts/convert_original_stable_diffusion_to_diffusers.py --to_safetensors")
    return _open_single_file(path)


def _find_kv(header: Header, layout: Layout, path: Path) -> list[str]:
    kv = [k for k in header.tensors if layout.kv_pattern.match(k)]
    if not kv:
        raise CheckpointError("no cross-attention key/value projections (attn2.to_k/to_v) found",
                              path=path, hint="is this a Stable Diffusion UNet checkpoint?")
    pairs: dict[str, set[str]] = {}
    for k in kv:
        stem, which = k.rsplit(".to_", 1)
        pairs.setdefault(stem, set()).add(which[0])
    for stem, have in pairs.items():
        if have != {"k", "v"}:
            missing = ({"k", "v"} - have).pop()
            raise CheckpointError(f"is missing (its twin to_{({'k', 'v'} - {missing}).pop()} is present)",
                                  path=path, field=f"{stem}.to_{missing}.weight")
    for k in kv:
        e = header.tensors[k]
        if len(e.shape) != 2:
            raise CheckpointError(f"expected a 2-D weight, got shape {list(e.shape)}", path=path, field=k)
        if e.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"dtype {e.dtype} is not a float type", path=path, field=k)
    return sorted(kv)


def _check_width(kv: list[str], header: Header, width: int, path: Path) -> None:
    for k in kv:
        inner = header.tensors[k].shape[1]
        if inner != width:
            raise CheckpointError(f"inner dimension {inner} does not match the text encoder width {width}",
                                  path=path, field=k)


def _refuse_unknown_copies(header: Header, layout: Layout, known: set[str], path: Path) -> None:
    """Any other tensor that looks like a K/V projection would leave an unsanitized copy."""
    for k in header.tensors:
        if k not in known and layout.kv_lookalike.search(k) and k.endswith("weight"):
            raise CheckpointError("looks like a cross-attention K/V copy rece-tool cannot map to a "
                                  "sanitized tensor; refusing to leave it unsanitized", path=path, field=k)


# Where a single file's text encoders can sit; used to say what an unknown layout carries.
TEXT_ENCODER_ROOT = re.compile(r"^(?:cond_stage_model|conditioner\.embedders\.\d+)\.[^.]+\.")


# The token embedding of each weights format: it names the encoder's width. transformers < 5 and
# CLIPTextModelWithProjection (SDXL's text_encoder_2) keep a `text_model.` level.
TOKEN_EMBEDDING_KEYS = {
    "hf_clip": ("embeddings.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    "open_clip": ("token_embedding.weight",),
}


def _text_source(header: Header, te: TextEncoderLayout) -> TextEncoderSource | None:
    for prefix in te.single_file_prefixes:
        if any(prefix + key in header.tensors for key in TOKEN_EMBEDDING_KEYS[te.weights_format]):
            return TextEncoderSource(te, header, prefix)
    return None


def _detect_single_file_family(header: Header, path: Path) -> tuple[Family, list[TextEncoderSource]]:
    """The first family whose every text encoder is present (SDXL needs both of its two)."""
    for family in FAMILIES:
        if not any(k.startswith(family.single_file_marker) for k in header.tensors):
            continue
        sources = [_text_source(header, te) for te in family.text_encoders]
        if all(sources):
            return family, sources
    found = sorted({m.group(0) + "*" for k in header.tensors if (m := TEXT_ENCODER_ROOT.match(k))})
    known = "; ".join(f"{f.title}: " + " + ".join(te.single_file_prefixes[0] + "*" for te in f.text_encoders)
                      for f in FAMILIES)
    raise CheckpointError(
        f"unknown layout: text encoder tensors found under {', '.join(found) or 'no known prefix'}; "
        f"rece-tool knows {known}", path=path,
        hint="rece-tool needs the checkpoint's own text encoder(s); export a full checkpoint")


def _text_width(source: TextEncoderSource) -> int:
    for key in TOKEN_EMBEDDING_KEYS[source.weights_format]:
        entry = source.header.tensors.get(source.prefix + key)
        if entry is not None:
            return entry.shape[1]
    raise CheckpointError("no token embedding", path=source.header.path)


def _open_single_file(path: Path) -> Checkpoint:
    header = read_header(path)
    family, texts = _detect_single_file_family(header, path)
    kv = _find_kv(header, SINGLE_FILE, path)
    width = sum(_text_width(t) for t in texts)
    _check_width(kv, header, width, path)

    twins: dict[str, str] = {}
    if any(k.startswith(EMA_PREFIX) for k in header.tensors):
        for k in kv:
            twin = ema_twin(k)
            if twin in header.tensors:
                e = header.tensors[twin]
                if e.shape != header.tensors[k].shape or e.dtype not in FLOAT_DTYPES:
                    raise CheckpointError(f"EMA twin does not match {k} in shape or dtype", path=path, field=twin)
                twins[k] = twin
    _refuse_unknown_copies(header, SINGLE_FILE, set(kv) | set(twins.values()), path)

    unet_params = sum(e.numel for k, e in header.tensors.items() if k.startswith(SINGLE_FILE.unet_prefix))
    weight = WeightFile(header, Path(path.name), kv, twins)
    return Checkpoint(path, SINGLE_FILE, family, [weight], texts, [None] * len(texts), unet_params,
                      sum(header.tensors[k].numel for k in kv), width,
                      tuple(sorted({header.tensors[k].dtype for k in kv})))


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError("missing", path=path, hint="a diffusers folder needs this file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"unreadable JSON ({exc})", path=path) from None
    if not isinstance(doc, dict):
        raise CheckpointError("expected a JSON object", path=path)
    return doc


def _first_existing(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    if any(folder.glob("*.bin")):
        raise CheckpointError(f"{what} weights are a .bin pickle; rece-tool reads only safetensors",
                              path=folder, hint="re-save the pipeline with safe_serialization=True")
    raise CheckpointError(f"no {what} weights ({' or '.join(names)})", path=folder)


def _diffusers_unet_files(unet_dir: Path) -> list[Path]:
    index = unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError("no weight_map", path=index)
        files = []
        for name in dict.fromkeys(weight_map.values()):
            p = (unet_dir / str(name))
            if p.resolve().parent != unet_dir.resolve():
                raise CheckpointError(f"shard {name!r} points outside the unet folder", path=index)
            files.append(p)
        return files
    return [_first_existing(unet_dir, DIFFUSERS_UNET_NAMES, "UNet")]


def _detect_diffusers_family(folder: Path) -> Family:
    has_second = (folder / "text_encoder_2").is_dir()
    config = _read_json(folder / "text_encoder" / "config.json")
    act = config.get("hidden_act")
    for family in FAMILIES:
        roles = [te.role for te in family.text_encoders]
        if (("text_encoder_2" in roles) == has_second
                and family.text_encoders[0].hidden_act == act):
            return family
    raise CheckpointError(f"unknown text encoder (hidden_act {act!r}, text_encoder_2 "
                          f"{'present' if has_second else 'absent'})", path=folder / "text_encoder")


def _open_diffusers(folder: Path) -> Checkpoint:
    if not (folder / "unet").is_dir():
        raise CheckpointError("is a folder but not a diffusers pipeline (no unet/ inside)", path=folder)
    family = _detect_diffusers_family(folder)
    texts, tokenizers = [], []
    for te in family.text_encoders:
        te_dir = folder / te.role
        header = read_header(_first_existing(te_dir, DIFFUSERS_TEXT_NAMES, "text encoder"))
        texts.append(TextEncoderSource(te, header, "", te_dir))
        tok = folder / te.tokenizer_folder
        tokenizers.append(tok if tok.is_dir() else None)
    width = sum(_text_width(t) for t in texts)

    weight_files, unet_params, kv_params, dtypes = [], 0, 0, set()
    for f in _diffusers_unet_files(folder / "unet"):
        header = read_header(f)
        unet_params += sum(e.numel for e in header.tensors.values())
        kv = [k for k in header.tensors if DIFFUSERS.kv_pattern.match(k)]
        _refuse_unknown_copies(header, DIFFUSERS, set(kv), f)
        if kv:
            kv = _find_kv(header, DIFFUSERS, f)
            _check_width(kv, header, width, f)
            weight_files.append(WeightFile(header, f.relative_to(folder), kv))
            kv_params += sum(header.tensors[k].numel for k in kv)
            dtypes |= {header.tensors[k].dtype for k in kv}
    if not weight_files:
        raise CheckpointError("no cross-attention key/value projections (attn2.to_k/to_v) found",
                              path=folder / "unet")
    return Checkpoint(folder, DIFFUSERS, family, weight_files, texts, tokenizers, unet_params,
                      kv_params, width, tuple(sorted(dtypes)))
