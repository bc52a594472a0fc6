"""The image smoke audit (DESIGN.md §5): same prompts and seeds through the source and the
sanitized model, NudeNet on every image, CLIP scores, a contact sheet, and the image gates.

Order of work, driven by `sanitize.py`:

1. `ImageAudit.begin` builds the source pipeline once and renders every (prompt, seed) pair.
2. `select_round` (concept sets with `select = "best"`) renders the erase prompts after every
   RECE round, each as `W·T_round` in memory, and keeps the round with the fewest nude images.
   This must happen before the model is written: it decides which `T` ships.
3. `evaluate` renders the final model (`W·T`, the K/V tensors computed exactly as the writer
   computes them) and returns the gates, so they join the header summary and the signature
   decision like every other gate.
4. `write`, once the model is on disk, checks that the K/V tensors it rendered are
   byte-identical to the ones in the written file (so the audit describes the shipped bytes),
   then writes the PNGs and the contact sheet, and returns the `images` section of audit.json.

A configured image gate that could not be measured fails with `not run: <why>`; it never passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .. import erase
from ..checkpoint.layout import Checkpoint
from ..checkpoint.safetensors_format import read_header, read_tensor, tensor_bytes
from ..errors import BadInput, ReceError
from ..manifest import CheckpointSpec, ConceptSet, ImageAuditSpec
from . import contact_sheet
from .gates import Gate, at_least, at_most
from .nudity import COUNTED_CLASSES, Detection, NudityDetector, class_counts, counted, nude_count

IMAGES_DIR = "images"
SHEET_STEM = "contact_sheet"
BATCH = {"cuda": 8, "cpu": 4}          # images per pipeline call
NUDE_GATE, CLIP_GATE = "images: nude_images", "images: clip_score_ratio"
MODELS = ("source", "sanitized")


@dataclass(frozen=True)
class Job:
    """One (prompt, seed) pair; erase probes first, then preserve prompts."""

    group: str          # "erase" or "preserve"
    index: int          # the prompt's position in its list
    prompt: str
    seed: int

    def file(self, model: str) -> str:
        return f"{IMAGES_DIR}/{self.group}-{self.index:03d}-seed{self.seed}-{model}.png"


@dataclass
class Render:
    image: np.ndarray                       # RGB uint8
    detections: list[Detection]
    clip_score: float | None = None


@dataclass
class _Evaluated:
    transform: torch.Tensor
    renders: list[Render]                   # one per erase job


def best_round(nude_counts: Sequence[int]) -> int:
    """The round with the fewest nude images; ties go to the earlier round, as in RECE's code
    (it keeps a round only when it strictly improves on the best so far)."""
    if not nude_counts:
        raise ValueError("no rounds to choose from")
    return min(range(len(nude_counts)), key=lambda k: nude_counts[k])


class ImageAudit:
    """One checkpoint's image smoke audit. Disabled audits keep the same interface."""

    def __init__(self, spec: ImageAuditSpec, checkpoint: Checkpoint, name: str,
                 progress: Callable[..., object] | None):
        self.spec, self.ckpt, self.name = spec, checkpoint, name
        self.progress = progress
        self.jobs = ([Job("erase", i, p, s) for i, p in enumerate(spec.prompts) for s in spec.seeds]
                     + [Job("preserve", i, p, s) for i, p in enumerate(spec.preserve_prompts) for s in spec.seeds])
        self.erase_jobs = [j for j in self.jobs if j.group == "erase"]
        self.source: list[Render] = []
        self.sanitized: list[Render] = []
        self.selections: list[dict] = []
        self.timings: dict[str, float] = {}
        self._evaluated: list[_Evaluated] = []
        self._sanitized_kv: dict[tuple[int, str], torch.Tensor] = {}
        self.pipeline = self.detector = self.clip = None

    # --- 1. the source model -------------------------------------------------------------------

    @classmethod
    def begin(cls, spec: ImageAuditSpec, checkpoint: Checkpoint, ckpt_spec: CheckpointSpec,
              device: torch.device, progress: Callable[..., object] | None = None) -> "ImageAudit":
        audit = cls(spec, checkpoint, ckpt_spec.name, progress)
        if not spec.enabled:
            return audit
        from .pipeline import SmokePipeline, quiet_libraries

        started = time.perf_counter()
        audit.device = device
        with quiet_libraries():
            audit.pipeline = SmokePipeline(checkpoint, ckpt_spec.tokenizer, device)
            audit.detector = NudityDetector(spec.nudenet_threshold)
            if spec.clip_model is not None:
                from .clipscore import ClipScorer
                audit.clip = ClipScorer(spec.clip_model, device)
        # Source K/V in the file's own dtype: every edited variant is computed from these
        # exactly as the writer computes the shipped tensors.
        audit._source_kv = {s: read_tensor(s.weight_file.header, s.key) for s in audit.pipeline.slots}
        audit._index = {id(wf): i for i, wf in enumerate(checkpoint.weight_files)}
        audit.timings["build"] = _since(started)
        started = time.perf_counter()
        audit.source = audit._render(audit.jobs, "source")
        audit.timings["source"] = _since(started)
        return audit

    @property
    def enabled(self) -> bool:
        return self.spec.enabled

    # --- 2. select = "best" --------------------------------------------------------------------

    def select_round(self, concept_set: ConceptSet, result: erase.SetResult) -> None:
        """Point `result.transform` at the round with the fewest nude erase-prompt images."""
        if concept_set.select != "best":
            return
        if not self.enabled or not self.erase_jobs:  # the manifest refuses this; never guess
            raise BadInput("select = \"best\" needs the image audit with erase prompts",
                           field=f"concept_set {concept_set.name!r}.select")
        started = time.perf_counter()
        counts = []
        for k, t in enumerate(result.rounds):
            renders = self._render(self.erase_jobs, f"{concept_set.name} round {k}", self._kv(erase.kv_edit(t))[0])
            self._evaluated.append(_Evaluated(t, renders))
            counts.append(nude_count((r.detections for r in renders), self.spec.nudenet_threshold))
        chosen = best_round(counts)
        result.transform = result.rounds[chosen]
        self.selections.append({
            "concept_set": concept_set.name,
            "criterion": "fewest nude erase-prompt images; ties go to the earlier round",
            "rounds": [{"round": k, "after": "UCE pass" if k == 0 else f"RECE round {k}",
                        "nude_images": n, "images": len(self.erase_jobs)} for k, n in enumerate(counts)],
            "chosen_round": chosen,
        })
        self.timings["select_rounds"] = self.timings.get("select_rounds", 0.0) + _since(started)

    # --- 3. the sanitized model and the gates ----------------------------------------------------

    def evaluate(self, edit: erase.KVEdit) -> list[Gate]:
        """Render with the final K/V, computed by the very `edit` the writer applies."""
        if self.enabled:
            started = time.perf_counter()
            kv, self._sanitized_kv = self._kv(edit)
            # A round scored for select = "best" that is the final T already has its erase images.
            reuse = next((e.renders for e in self._evaluated if torch.equal(e.transform, edit.transform)), None)
            todo = self.jobs[len(reuse):] if reuse is not None else self.jobs
            self.sanitized = (reuse or []) + self._render(todo, "sanitized", kv)
            self._evaluated.clear()
            self.timings["sanitized"] = _since(started)
        return self.gates()

    def gates(self) -> list[Gate]:
        s, gates = self.spec, []
        if s.max_nude_images is not None:
            why = self._not_run(needs_prompts="erase")
            if why:
                gates.append(at_most(NUDE_GATE, "max_nude_images", None, s.max_nude_images, why))
            else:
                n, src = self._nude("erase", "sanitized"), self._nude("erase", "source")
                gates.append(at_most(NUDE_GATE, "max_nude_images", n, s.max_nude_images,
                                     f"{n} of {len(self.erase_jobs)} erase-prompt images nude "
                                     f"(source model: {src})"))
        if s.min_clip_score_ratio is not None:
            why = self._not_run(needs_prompts="preserve", needs_clip=True)
            clip = None if why else self._clip_summary("preserve")
            if clip is not None and clip["ratio"] is None:
                why = "not run: the source model's CLIP score is 0, so the ratio is undefined"
            if why:
                gates.append(at_least(CLIP_GATE, "min_clip_score_ratio", None, s.min_clip_score_ratio, why))
            else:
                gates.append(at_least(CLIP_GATE, "min_clip_score_ratio", clip["ratio"], s.min_clip_score_ratio,
                                      f"mean CLIP score sanitized {clip['sanitized']:.2f} / source "
                                      f"{clip['source']:.2f} over {clip['images']} preserve-prompt images"))
        return gates

    def _not_run(self, needs_prompts: str, needs_clip: bool = False) -> str | None:
        if not self.enabled:
            return "not run: [audit.images] enabled = false"
        if not any(j.group == needs_prompts for j in self.jobs):
            key = "prompts" if needs_prompts == "erase" else "preserve_prompts"
            return f"not run: no {needs_prompts} prompts (audit.images.{key})"
        if needs_clip and self.clip is None:
            return "not run: no clip_model"
        return None

    # --- 4. outputs ------------------------------------------------------------------------------

    def write(self, staging: Path, files: list[dict]) -> dict:
        """Verify the shipped K/V, write images/ and the contact sheet; the audit.json section."""
        if not self.enabled:
            return {"enabled": False}
        started = time.perf_counter()
        self._verify_written(staging, files)
        folder = staging / IMAGES_DIR
        folder.mkdir()
        for job, src, san in zip(self.jobs, self.source, self.sanitized):
            for model, render in zip(MODELS, (src, san)):
                Image.fromarray(render.image).save(staging / job.file(model), format="PNG")
        sheets = self._contact_sheets(folder)
        self.timings["write"] = _since(started)
        section = self._section(sheets)
        self.pipeline = self.clip = None  # release the models before signing
        return section

    def _verify_written(self, staging: Path, files: list[dict]) -> None:
        written = {}
        for i, f in enumerate(files):
            written[i] = read_header(staging / f["path"])
        for (i, key), tensor in self._sanitized_kv.items():
            if tensor_bytes(read_tensor(written[i], key)) != tensor_bytes(tensor):
                raise ReceError("the image audit rendered K/V weights that differ from the written "
                                "model; the audit would not describe the shipped file",
                                path=staging / files[i]["path"], field=key)

    def _contact_sheets(self, folder: Path) -> dict[tuple[str, int], tuple[str, int]]:
        """Rows = prompts, columns = source | sanitized per seed. Returns (group, index) → (sheet, row)."""
        seeds = list(self.spec.seeds)
        titles = [f"seed {s} · {m}" for s in seeds for m in MODELS]
        rows, keys = [], []
        by_job = {(j.group, j.index, j.seed): (src, san) for j, src, san in zip(self.jobs, self.source, self.sanitized)}
        for group, prompts in (("erase", self.spec.prompts), ("preserve", self.spec.preserve_prompts)):
            for index, prompt in enumerate(prompts):
                cells = []
                for seed in seeds:
                    for render in by_job[(group, index, seed)]:
                        cells.append(self._cell(render, group))
                rows.append(contact_sheet.Row(f"[{group}] {prompt}", cells))
                keys.append((group, index))
        placed = {}
        for path, page in contact_sheet.write_sheets(rows, titles, folder, SHEET_STEM):
            for row, r in enumerate(page):
                placed[keys[r]] = (f"{IMAGES_DIR}/{path.name}", row)
        return placed

    def _cell(self, render: Render, group: str) -> contact_sheet.Cell:
        threshold = self.spec.nudenet_threshold
        hits = counted(render.detections, threshold)
        caption = ("NUDE: " + ", ".join(sorted({d.label.removesuffix('_EXPOSED').lower() for d in hits}))
                   if hits else "no counted class")
        if render.clip_score is not None:
            caption += f" · CLIP {render.clip_score:.1f}"
        return contact_sheet.Cell(render.image, render.detections,
                                  {i for i, d in enumerate(render.detections) if d in hits}, caption, bool(hits))

    def _section(self, sheets: dict) -> dict:
        s, threshold = self.spec, self.spec.nudenet_threshold
        records = []
        for job, src, san in zip(self.jobs, self.source, self.sanitized):
            sheet, row = sheets[(job.group, job.index)]
            column = 2 * list(s.seeds).index(job.seed)
            records.append({
                "group": job.group, "prompt_index": job.index, "prompt": job.prompt, "seed": job.seed,
                **{m: _render_record(r, job.file(m), threshold) for m, r in zip(MODELS, (src, san))},
                "contact_sheet": {"file": sheet, "row": row, "columns": [column, column + 1],
                                  "origin": [list(contact_sheet.cell_origin(row, c)) for c in (column, column + 1)],
                                  "cell_size": contact_sheet.CELL},
            })
        summary = {
            "erase_images": len(self.erase_jobs), "preserve_images": len(self.jobs) - len(self.erase_jobs),
            "nude_images": {m: self._nude("erase", m) for m in MODELS},
            "preserve_nude_images": {m: self._nude("preserve", m) for m in MODELS},
            "nude_classes": {m: class_counts((r.detections for j, r in zip(self.jobs, rs) if j.group == "erase"),
                                             threshold) for m, rs in zip(MODELS, (self.source, self.sanitized))},
            "clip_score": None if self.clip is None else
                {g: self._clip_summary(g) for g in ("erase", "preserve")},
        }
        return {
            "enabled": True,
            "settings": {"prompts": list(s.prompts), "preserve_prompts": list(s.preserve_prompts),
                         "seeds": list(s.seeds), "steps": s.steps, "size": s.size, "guidance": s.guidance,
                         "nudenet_threshold": threshold, "max_nude_images": s.max_nude_images,
                         "clip_model": str(s.clip_model) if s.clip_model else None,
                         "min_clip_score_ratio": s.min_clip_score_ratio,
                         "batch_size": self._batch},
            "pipeline": self.pipeline.description,
            "detector": self.detector.metadata,
            "clip": self.clip.metadata if self.clip else {"run": False, "reason": "no clip_model in [audit.images]"},
            # write() raises before this section exists if the check fails.
            "weights_verified": True,
            "weights_verified_how": "every K/V tensor the sanitized images were rendered with is "
                                    "byte-identical to the written model's",
            "summary": summary,
            "selection": self.selections,
            "contact_sheets": sorted({v[0] for v in sheets.values()}),
            "images": records,
            "timings_s": self.timings,
        }

    # --- rendering -------------------------------------------------------------------------------

    @property
    def _batch(self) -> int:
        return BATCH.get(self.device.type, 4)

    def _kv(self, edit: erase.KVEdit) -> tuple[dict[str, torch.Tensor], dict[tuple[int, str], torch.Tensor]]:
        """W·T for every K/V slot, computed as the writer computes it (same device, same dtype):
        by pipeline parameter, and by (weight file, checkpoint key) for the post-write check."""
        by_param, by_key = {}, {}
        for slot, w in self._source_kv.items():
            new = edit.apply(w.to(self.device)).cpu()
            by_param[slot.parameter] = new
            by_key[(self._index[id(slot.weight_file)], slot.key)] = new
        return by_param, by_key

    def _render(self, jobs: list[Job], label: str, kv: dict[str, torch.Tensor] | None = None) -> list[Render]:
        """Render `jobs` with the K/V tensors `kv` (by parameter name; None: the source's)."""
        if not jobs:
            return []
        self.pipeline.set_kv(kv if kv is not None else {s.parameter: w for s, w in self._source_kv.items()})
        bar = self.progress(total=len(jobs), desc=f"{self.name}: images ({label})", unit="img") \
            if self.progress else None
        renders: list[Render] = []
        s = self.spec
        # Batches never straddle the erase/preserve boundary, so the erase images of a round
        # and of the final model are computed in identical batches.
        for group in ("erase", "preserve"):
            mine = [j for j in jobs if j.group == group]
            for start in range(0, len(mine), self._batch):
                batch = mine[start:start + self._batch]
                images = self.pipeline.generate([j.prompt for j in batch], [j.seed for j in batch],
                                                s.steps, s.size, s.guidance)
                scores = self.clip.scores(images, [j.prompt for j in batch]) if self.clip else [None] * len(batch)
                renders += [Render(img, self.detector.detect(img), score) for img, score in zip(images, scores)]
                if bar:
                    bar.update(len(batch))
        if bar:
            bar.close()
        return renders

    def _nude(self, group: str, model: str) -> int:
        renders = self.source if model == "source" else self.sanitized
        return nude_count((r.detections for j, r in zip(self.jobs, renders) if j.group == group),
                          self.spec.nudenet_threshold)

    def _clip_summary(self, group: str) -> dict | None:
        pairs = [(a.clip_score, b.clip_score) for j, a, b in zip(self.jobs, self.source, self.sanitized)
                 if j.group == group]
        if not pairs or self.clip is None:
            return None
        src, san = fmean(p[0] for p in pairs), fmean(p[1] for p in pairs)
        return {"source": src, "sanitized": san, "ratio": san / src if src > 0 else None, "images": len(pairs)}


def _render_record(render: Render, file: str, threshold: float) -> dict:
    hits = counted(render.detections, threshold)
    return {"file": file, "nude": bool(hits), "counted_classes": sorted({d.label for d in hits}),
            "detections": [d.as_dict() for d in render.detections], "clip_score": render.clip_score}


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 4)


__all__ = ["ImageAudit", "best_round", "Job", "Render", "COUNTED_CLASSES"]
