"""Checkpoints through the whole flow of DESIGN.md §1: open, embed, erase, audit, write, sign.

The CLI calls `sanitize_checkpoints` for a run and `plan` for `--dry-run`; everything the
user can get wrong surfaces as a `ReceError`.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import __version__, erase, provenance, report
from .audit import gates as gate_rules
from .audit.images import ImageAudit
from .audit.weights import SetMetrics, audit_set
from .checkpoint.layout import Checkpoint, WeightFile, open_checkpoint
from .checkpoint.edited_copy import EditedCopy, StreamResult
from .checkpoint.safetensors_format import file_sha256, header_sha256, read_tensor, tensor_bytes
from .erase import ConceptSetMath, EraseTarget
from .errors import BadInput, NumericError
from .manifest import CheckpointSpec, ConceptSet, Manifest
from .output import copy_file, staged_output
from .resume import run_fingerprint
from .text import Embedding, embedder_for

AUDIT_SCHEMA_VERSION = 1


@dataclass
class Options:
    device: str = "auto"
    overwrite: bool = False
    quiet: bool = False
    signing_key: Any = None           # a signing.SigningKey, already loaded and checked
    progress: Callable[..., Any] | None = None  # tqdm-like factory; None: no bars
    embedders: dict | None = field(default_factory=dict)  # shared across checkpoints; None: no sharing


@dataclass
class CheckpointResult:
    name: str
    folder: Path
    audit: dict
    gates: list[gate_rules.Gate]
    signed: bool

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise BadInput("CUDA is not available on this machine", field="--device", hint="use --device cpu")
    return torch.device(choice)


# --- the plan ----------------------------------------------------------------------------------

def plan(manifest: Manifest, checkpoints: list[CheckpointSpec]) -> list[dict]:
    """What a run would do: each checkpoint opened (headers only) and its resolved concept sets."""
    out = []
    for spec in checkpoints:
        ckpt = open_checkpoint(spec.path)
        out.append({
            "checkpoint": spec.name, "path": str(spec.path), "layout": ckpt.layout.name,
            "family": ckpt.family.title, "kv_count": ckpt.kv_count, "ema_twins": ckpt.ema_count,
            "dtypes": list(ckpt.kv_dtypes), "output": str(manifest.output_dir / spec.name),
            "concept_sets": [cs.settings() for cs in manifest.sets_for(spec)],
        })
    return out


# --- one checkpoint ----------------------------------------------------------------------------

def _texts_of(sets: list[ConceptSet]) -> list[str]:
    texts: list[str] = []
    for cs in sets:
        texts += [*cs.erase, *cs.guides, *cs.preserve, *cs.probes]
    return list(dict.fromkeys(texts))


def _math_spec(cs: ConceptSet, emb: dict[str, Embedding]) -> ConceptSetMath:
    targets = [EraseTarget(e, emb[e].rows, emb[e].tokens, g, emb[g].rows, emb[g].tokens)
               for e, g in zip(cs.erase, cs.guides)]
    return ConceptSetMath(cs.name, targets, [emb[p].rows for p in cs.preserve],
                          cs.uce, cs.rece, cs.epochs, cs.reg)


def _bar(options: Options, **kwargs):
    if options.progress is None or options.quiet:
        return None
    return options.progress(**kwargs)


def sanitize_checkpoint(manifest: Manifest, spec: CheckpointSpec, options: Options) -> CheckpointResult:
    with closing(sanitize_checkpoints(manifest, [spec], options)) as results:
        return next(results)


def sanitize_checkpoints(manifest: Manifest, specs: list[CheckpointSpec],
                         options: Options) -> Iterator[CheckpointResult]:
    """Each checkpoint's result, in order, from a two-stage pipeline: checkpoint k+1 is solved
    while k's bytes are still being hashed and flushed to disk in the background.

    At most two checkpoints are open at once, and only one when the image audit is on (its
    models stay loaded until a checkpoint completes). A failure while solving k+1 abandons k+1
    first, then lets k finish; an interrupt abandons both, leaving nothing behind of either
    (each run's staging folder and temporary files are removed).
    """
    overlap = not manifest.audit.images.enabled
    pending: _CheckpointRun | None = None

    def complete_pending() -> CheckpointResult:
        nonlocal pending
        done, pending = pending, None  # completed or failed, it is no longer ours to abandon
        return done.complete()

    try:
        for spec in specs:
            run = _CheckpointRun(manifest, spec, options)
            try:
                run.solve()
            except BaseException as exc:
                run.abandon()
                if pending is not None and not isinstance(exc, KeyboardInterrupt):
                    yield complete_pending()
                raise
            if pending is not None:
                yield complete_pending()
            pending = run
            if not overlap:
                yield complete_pending()
        if pending is not None:
            yield complete_pending()
    finally:
        if pending is not None:
            pending.abandon()


class _CheckpointRun:
    """One checkpoint through DESIGN.md §1: `solve` (open, embed, erase, audit, hand the new K/V
    bytes to the writer), then `complete` (final headers, audit log, signature, promotion)."""

    def __init__(self, manifest: Manifest, spec: CheckpointSpec, options: Options):
        self.manifest, self.spec, self.options = manifest, spec, options
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()
        self._stack = ExitStack()  # the staging folder and the writer, closed by complete/abandon

    def abandon(self) -> None:
        """Stop the background writing and remove everything this run created."""
        error = sys.exc_info()[1] or RuntimeError("abandoned")
        self._stack.__exit__(type(error), error, error.__traceback__)

    def _lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 4)
        self._clock = now

    def solve(self) -> None:
        manifest, spec, options = self.manifest, self.spec, self.options
        self.device = device = resolve_device(options.device)
        self.ckpt = ckpt = open_checkpoint(spec.path)
        sets = manifest.sets_for(spec)
        self.settings = [cs.settings() for cs in sets]
        # Moved to the device once: the Gram matrix and W·T are both computed where they lie.
        source_kv: dict[tuple[int, str], torch.Tensor] = {}
        for i, wf in enumerate(ckpt.weight_files):
            for key in wf.kv_keys:
                w = read_tensor(wf.header, key)
                erase.check_finite(w, f"{wf.header.path}: {key}")
                source_kv[(i, key)] = w.to(device)
        self.staging = self._stack.enter_context(staged_output(manifest.output_dir, spec.name, options.overwrite))
        # From here on the untouched bytes stream into place in the background.
        self._lap("read_kv")
        self.writer = self._stack.enter_context(_ModelWriter(ckpt, spec, self.staging, self.settings, options))
        self._lap("start_copy")
        source_gram = erase.gram(source_kv.values()).cpu()  # d×d: the rest of the math is small
        self._lap("gram")

        embedder = embedder_for(ckpt, spec.tokenizer, device, options.embedders)
        self._lap("load_text_encoder")
        texts = _texts_of(sets)
        bar = _bar(options, total=len(texts), desc=f"{spec.name}: embedding texts", unit="text")
        emb = embedder.embed(texts, progress=bar.update if bar else None)
        if bar:
            bar.close()
        self._lap("embed")

        # Image smoke audit: source images first, so that select = "best" can score each round.
        self.images = images = ImageAudit.begin(manifest.audit.images, ckpt, spec, device,
                                                lambda **kw: _bar(options, **kw))
        self._lap("images_source")

        transform = torch.eye(ckpt.kv_width, dtype=torch.float64)
        solved: list[tuple[ConceptSet, ConceptSetMath, erase.SetResult]] = []
        for cs in sets:
            math = _math_spec(cs, emb)
            try:
                result = erase.concept_set_transform(source_gram, transform, math)
            except NumericError as exc:
                raise NumericError(exc.message, path=manifest.path,
                                   field=f"concept_set {cs.name!r} {exc.field}", hint=exc.hint) from None
            images.select_round(cs, result)  # select = "best": the round with the fewest nude images
            transform = result.transform
            solved.append((cs, math, result))
        self._lap("erase")

        self.set_metrics = [audit_set(math, list(cs.preserve), {p: emb[p].rows for p in cs.probes},
                                      transform, result.rounds, source_gram)
                            for cs, math, result in solved]
        self.gates = _evaluate_gates(manifest, self.set_metrics)
        self._lap("audit")
        edit = erase.kv_edit(transform)  # one T (or its low-rank factors) for every K/V tensor
        self.gates += images.evaluate(edit)  # renders the final W·T; image gates join the others
        self._lap("images_sanitized")
        self.layer_change = self.writer.put_edits(edit, device, source_kv)
        self._lap("apply")

    def complete(self) -> CheckpointResult:
        manifest, spec, options = self.manifest, self.spec, self.options
        self._clock = time.perf_counter()  # not the next checkpoint's solve, which ran meanwhile
        with self._stack:  # on success promotes the staging folder into place, on failure removes it
            summary = report.header_summary(self.set_metrics, self.gates)
            sign_key = options.signing_key if all(g.passed for g in self.gates) else None
            files = self.writer.finish(summary, hash_files=sign_key is not None)
            self._lap("write")
            staging = self.staging
            audit = _audit_document(manifest, spec, self.ckpt, self.settings, self.set_metrics,
                                    self.layer_change, self.gates, files, self.timings, self.device,
                                    options.signing_key, sign_key)
            audit["images"] = self.images.write(staging, files)  # checks the written K/V, PNGs, contact sheet
            report.write_audit(staging / "audit.json", audit)
            report.write_html(staging / "report.html", audit)
            if sign_key is not None:
                from .signing import sign_folder
                sign_folder(staging, sign_key, f"{spec.name}.sig", known_sha256=self.writer.file_sha256)
                self._lap("sign")
        return CheckpointResult(spec.name, manifest.output_dir / spec.name, audit, self.gates,
                                sign_key is not None)


def _evaluate_gates(manifest: Manifest, metrics: list[SetMetrics]) -> list[gate_rules.Gate]:
    a = manifest.audit
    gates = []
    for m in metrics:
        if a.max_erase_residual is not None:
            worst = max(m.concepts, key=lambda c: c.erase_residual)
            gates.append(gate_rules.at_most(f"{m.name}: erase_residual", "max_erase_residual",
                                            worst.erase_residual, a.max_erase_residual,
                                            f"worst concept: {worst.concept!r}"))
        if a.max_attack_recovery is not None:
            worst = max(m.concepts, key=lambda c: c.attack_recovery)
            gates.append(gate_rules.at_most(f"{m.name}: attack_recovery", "max_attack_recovery",
                                            worst.attack_recovery, a.max_attack_recovery,
                                            f"worst concept: {worst.concept!r}"))
        if a.max_preserve_drift is not None:
            text, value = max(m.preserve_drift.items(), key=lambda kv: kv[1])
            gates.append(gate_rules.at_most(f"{m.name}: preserve_drift", "max_preserve_drift",
                                            value, a.max_preserve_drift, f"worst text: {text!r}"))
    return gates


def _edited_bytes(wf: WeightFile, key: str, edit: erase.KVEdit, device: torch.device,
                  source: torch.Tensor | None = None) -> tuple[bytes, float]:
    """The tensor's new bytes and its relative change; `source` if already read (and checked)."""
    w = source
    if w is None:
        w = read_tensor(wf.header, key)
        erase.check_finite(w, f"{wf.header.path}: {key}")
    w = w.to(device)
    new = edit.apply(w)
    w64 = w.to(torch.float64)
    change = float(torch.linalg.norm(new.to(torch.float64) - w64) / max(float(torch.linalg.norm(w64)), 1e-300))
    return tensor_bytes(new.cpu()), change


class _ModelWriter:
    """The output's model files, copied in the background from the moment a run starts; the
    edited K/V bytes and the final headers (provenance, audit summary, hashes) go in at `finish`."""

    def __init__(self, ckpt: Checkpoint, spec: CheckpointSpec, staging: Path, settings: list[dict],
                 options: Options):
        self.ckpt, self.spec, self.staging, self.settings = ckpt, spec, staging, settings
        self.date = provenance.release_date()
        self.file_sha256: dict[Path, str] = {}  # every file written whole-file hashed, for the signer
        self._stack = ExitStack()
        self._options = options
        self._bar = None
        self._copies: list[tuple[int, WeightFile, Path, EditedCopy]] = []

    def __enter__(self) -> "_ModelWriter":
        ckpt, staging = self.ckpt, self.staging
        with ExitStack() as stack:
            self._bar = _bar(self._options, total=sum(wf.header.file_size - wf.header.data_start
                                                      for wf in ckpt.weight_files),
                             desc=f"{self.spec.name}: writing", unit="B", unit_scale=True, unit_divisor=1024)
            if self._bar is not None:
                stack.callback(self._bar.close)
            model_root = staging / self.spec.name if ckpt.is_folder else staging
            if ckpt.is_folder:
                _copy_folder_rest(ckpt, model_root)
            placeholder = report.header_summary_placeholder([s["name"] for s in self.settings])
            for index, wf in enumerate(ckpt.weight_files):
                out_path = (model_root / wf.relpath) if ckpt.is_folder else staging / f"{self.spec.name}.safetensors"
                out_path.parent.mkdir(parents=True, exist_ok=True)
                copy = stack.enter_context(EditedCopy(
                    wf.header, [*wf.kv_keys, *wf.ema_twins.values()], out_path,
                    self._metadata(wf, placeholder), progress=self._bar.update if self._bar else None))
                self._copies.append((index, wf, out_path, copy))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _metadata(self, wf: WeightFile, summary: dict, result: StreamResult | None = None) -> dict[str, str]:
        hashes = {} if result is None else {"source_sha256": result.source_sha256,
                                            "data_sha256": result.data_sha256}
        return provenance.header_metadata(
            wf.header.metadata, architecture=_architecture(wf, self.ckpt),
            title=wf.header.metadata.get("modelspec.title", self.spec.name),
            concept_sets=self.settings, audit_summary=summary, date=self.date, **hashes)

    def put_edits(self, edit: erase.KVEdit, device: torch.device,
                  source_kv: dict[tuple[int, str], torch.Tensor]) -> dict[str, float]:
        """W·T into every K/V tensor (EMA twins included); their relative change by name."""
        layer_change = {}
        for index, wf, _, copy in self._copies:
            for key in wf.kv_keys:
                blob, change = _edited_bytes(wf, key, edit, device, source_kv.pop((index, key)))
                copy.put(key, blob)
                layer_change[str(wf.relpath) + ":" + key if self.ckpt.is_folder else key] = change
            for twin in wf.ema_twins.values():
                blob, layer_change[twin] = _edited_bytes(wf, twin, edit, device)
                copy.put(twin, blob)
        return layer_change

    def finish(self, summary: dict, hash_files: bool) -> list[dict]:
        """Final headers in place, files flushed and renamed; what audit.json records of each."""
        files = []
        for _, wf, out_path, copy in self._copies:
            result = copy.finish(lambda r, _wf=wf: self._metadata(_wf, summary, r), hash_file=hash_files)
            if result.file_sha256:
                self.file_sha256[out_path] = result.file_sha256
            files.append({
                "path": str(out_path.relative_to(self.staging)),
                "source": str(wf.header.path),
                "source_sha256": result.source_sha256,
                "data_sha256": result.data_sha256,
                "header_sha256": header_sha256(out_path),
                "bytes": result.bytes_written,
            })
        self._stack.close()
        return files


def _copy_folder_rest(ckpt: Checkpoint, model_root: Path) -> None:
    """A diffusers folder's files other than the UNet weights, copied as they are."""
    rewritten = {wf.relpath for wf in ckpt.weight_files}
    for src in sorted(ckpt.path.rglob("*")):
        rel = src.relative_to(ckpt.path)
        dst = model_root / rel
        if src.is_dir() and not src.is_symlink():
            dst.mkdir(parents=True, exist_ok=True)
        elif rel not in rewritten:
            dst.parent.mkdir(parents=True, exist_ok=True)
            copy_file(src, dst)


def _architecture(wf: WeightFile, ckpt: Checkpoint) -> str:
    """The source's own ModelSpec architecture when it refines the family's (e.g.
    `stable-diffusion-v2-768-v`: the only record of v-prediction), else the family's."""
    stated = wf.header.metadata.get("modelspec.architecture", "")
    family = ckpt.family.modelspec_architecture
    return stated if stated.startswith(family) else family


def _audit_document(manifest, spec, ckpt: Checkpoint, settings, set_metrics, layer_change, gates,
                    files, timings, device, configured_key, sign_key) -> dict:
    if configured_key is None:
        signature = {"signed": False, "reason": "no signing key configured (output.signing_key or RECE_SIGNING_KEY)"}
    elif sign_key is None:
        signature = {"signed": False, "reason": "a gate failed: failed outputs are never signed",
                     "fingerprint": configured_key.fingerprint}
    else:
        signature = {"signed": True, "file": f"{spec.name}.sig", "fingerprint": sign_key.fingerprint,
                     "format": "OpenSSF Model Signing v1.0 (sigstore bundle, EC key)"}
    return {
        "schema": "rece-tool/audit",
        "schema_version": AUDIT_SCHEMA_VERSION,
        "inputs_fingerprint": run_fingerprint(manifest, spec),
        "tool": {"name": "rece-tool", "version": __version__},
        "checkpoint": {
            "name": spec.name,
            "source": {**ckpt.describe(),
                       "tokenizer": str(spec.tokenizer) if spec.tokenizer else None},
        },
        "manifest": {"path": str(manifest.path), "sha256": file_sha256(manifest.path)},
        "output": {"files": files},
        "concept_sets": settings,
        "metrics": {
            "sets": [report.set_metrics_dict(m) for m in set_metrics],
            "changed_tensors": len(layer_change),
            "layer_relative_change": layer_change,
        },
        "gates": [g.as_dict() for g in gates],
        "passed": all(g.passed for g in gates),
        "signature": signature,
        "timings_s": timings,
        "environment": {
            "python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
            "platform": platform.platform(), "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
        },
    }
