"""What reviewers and machines read: audit.json, report.html, JUnit XML, the stderr summary.

audit.json is schema-versioned (`schema_version`); fields are only ever added within a version.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Iterable
from xml.etree import ElementTree as ET

from .audit.gates import Gate
from .errors import WriteFailure
from .audit.weights import SetMetrics


def set_metrics_dict(m: SetMetrics) -> dict:
    return {
        "name": m.name,
        "concepts": [{"concept": c.concept, "guide": c.guide, "erase_residual": c.erase_residual,
                      "attack_recovery": c.attack_recovery} for c in m.concepts],
        "preserve_drift": m.preserve_drift,
        "probe_drift": m.probe_drift,
        "mean_erase_residual_per_round": m.round_residuals,
        "max_erase_residual": m.max_erase_residual,
        "max_attack_recovery": m.max_attack_recovery,
        "max_preserve_drift": m.max_preserve_drift,
    }


HEADER_SUMMARY_METRICS = ("max_erase_residual", "max_attack_recovery", "max_preserve_drift")


def header_summary(metrics: list[SetMetrics], gates: list[Gate]) -> dict:
    """The short audit summary carried in the model's own header (deterministic)."""
    return {
        "sets": {m.name: {k: round(getattr(m, k), 9) for k in HEADER_SUMMARY_METRICS} for m in metrics},
        "gates_passed": all(g.passed for g in gates),
    }


def header_summary_placeholder(set_names: list[str]) -> dict:
    """A summary of `header_summary`'s shape, for reserving the header before the audit ran."""
    return {"sets": {name: dict.fromkeys(HEADER_SUMMARY_METRICS, 0.0) for name in set_names},
            "gates_passed": False}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailure(f"writing failed: {exc.strerror or exc}", path=path,
                           hint="check free space and permissions; nothing was left behind") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_audit(path: Path, audit: dict) -> None:
    _atomic_write(path, (json.dumps(audit, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


# --- the human views ---------------------------------------------------------------------------

def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def gate_line(g: Gate) -> str:
    verdict = "PASS" if g.passed else "FAIL"
    op = "≥" if g.metric.startswith("min_") else "≤"
    detail = f" ({g.detail})" if g.detail else ""
    return f"{verdict}  {g.name} = {_fmt(g.value)} {op} {_fmt(g.threshold)}{detail}"


def text_summary(audit: dict, folder: Path) -> list[str]:
    src = audit["checkpoint"]["source"]
    ema = f" + {src['ema_twins']} EMA twins" if src["ema_twins"] else ""
    lines = [f"{audit['checkpoint']['name']}: {src['family_title']} {src['layout']} "
             f"({'/'.join(src['kv_dtypes'])}), {src['kv_count']} K/V matrices{ema} edited "
             f"(family has {src['family_kv_count']}), {100 * src['share_of_unet_modified']:.2f}% of UNet parameters"]
    for s in audit["metrics"]["sets"]:
        lines.append(f"  {s['name']}: erase_residual ≤ {_fmt(s['max_erase_residual'])}, "
                     f"attack_recovery ≤ {_fmt(s['max_attack_recovery'])}, "
                     f"preserve_drift ≤ {_fmt(s['max_preserve_drift'])}")
    img = audit.get("images") or {}
    if img.get("enabled"):
        n = img["summary"]
        lines.append(f"  images: {n['nude_images']['sanitized']} of {n['erase_images']} erase-prompt images nude "
                     f"(source {n['nude_images']['source']}); contact sheet and {2 * len(img['images'])} "
                     "images under images/")
    for g in audit["gates"]:
        lines.append("  " + gate_line(Gate(**g)))
    sig = audit["signature"]
    state = f"signed by {sig['fingerprint'][:23]}…" if sig["signed"] else f"unsigned: {sig['reason']}"
    lines.append(f"  → {folder}/ ({state})")
    return lines


def _table(rows: Iterable[Iterable], head: Iterable[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def render_html(audit: dict) -> str:
    src = audit["checkpoint"]["source"]
    e = html.escape
    parts = [
        f"<h1>rece-tool audit: {e(audit['checkpoint']['name'])}</h1>",
        f"<p class=verdict>{'ALL GATES PASSED' if audit['passed'] else 'A GATE FAILED'} · "
        f"{'signed ' + e(audit['signature'].get('fingerprint', '')) if audit['signature']['signed'] else 'unsigned: ' + e(audit['signature']['reason'])}</p>",
        "<h2>Gates</h2>",
        _table([(g["name"], "PASS" if g["passed"] else "FAIL", g["value"], g["threshold"], g["detail"])
                for g in audit["gates"]], ["gate", "result", "measured", "threshold", "detail"])
        if audit["gates"] else "<p>No gates configured in the manifest.</p>",
        "<h2>Source</h2>",
        _table([(k, v if not isinstance(v, list) else ", ".join(map(str, v))) for k, v in src.items()],
               ["field", "value"]),
        "<h2>Concept sets</h2>",
        "<p>Weight-space metrics, measured on the final weights over every cross-attention K/V "
        "projection: <b>erase_residual</b> is the share of the concept's response not redirected "
        "to its guide (0 = fully redirected, 1 = untouched); <b>attack_recovery</b> is the share of "
        "the concept a closed-form embedding attack still recovers; <b>preserve_drift</b> is how "
        "far a preserve text's response moved (0 = unchanged); probes are measured the same way, "
        "ungated.</p>",
    ]
    for cs, m in zip(audit["concept_sets"], audit["metrics"]["sets"]):
        parts.append(f"<h3>{e(cs['name'])} (preset {e(str(cs['preset']))})</h3>")
        parts.append(_table([("erase", ", ".join(cs["erase"])), ("guides", ", ".join(map(repr, cs["guides"]))),
                             ("preserve texts", cs["preserve_count"]), ("epochs", cs["epochs"]),
                             ("reg", cs["reg"]), ("uce", json.dumps(cs["uce"])),
                             ("rece", json.dumps(cs["rece"]))], ["setting", "value"]))
        parts.append(_table([(c["concept"], repr(c["guide"]), c["erase_residual"], c["attack_recovery"])
                             for c in m["concepts"]], ["concept", "guide", "erase_residual", "attack_recovery"]))
        drift = sorted(m["preserve_drift"].items(), key=lambda kv: -kv[1])[:20]
        parts.append(_table([(repr(t), v) for t, v in drift], ["preserve text (top 20 by drift)", "preserve_drift"]))
        if m["probe_drift"]:
            parts.append(_table([(repr(t), v) for t, v in m["probe_drift"].items()], ["probe", "drift"]))
    parts.append(_images_html(audit.get("images")))
    parts.append("<h2>Output files</h2>")
    parts.append(_table([(f["path"], f["bytes"], f["data_sha256"], f["source_sha256"])
                         for f in audit["output"]["files"]],
                        ["file", "bytes", "tensor data sha256", "source file sha256"]))
    parts.append(f"<p class=meta>rece-tool {e(audit['tool']['version'])} · audit schema "
                 f"{audit['schema_version']} · torch {e(audit['environment']['torch'])} on "
                 f"{e(audit['environment']['device'])}</p>")
    style = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;"
             "padding:.25em .6em;text-align:left;font-size:.9em}.verdict{font-weight:bold}"
             ".meta{color:#666;font-size:.8em}.nude{color:#c00;font-weight:bold}"
             "img.thumb{width:128px;height:128px;image-rendering:pixelated;display:block}"
             "img.sheet{max-width:100%;border:1px solid #ccc}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>rece-tool audit: "
            f"{e(audit['checkpoint']['name'])}</title><style>{style}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def _detections_html(model: dict) -> str:
    """Every detection, the counted ones (what makes the image nude) in bold red."""
    counted = set(model["counted_classes"])
    items = [(f"<span class=nude>{html.escape(d['label'])} {d['score']:.2f}</span>"
              if d["label"] in counted and d["score"] >= model["threshold"]
              else f"{html.escape(d['label'])} {d['score']:.2f}") for d in model["detections"]]
    verdict = "<span class=nude>NUDE</span>" if model["nude"] else "not nude"
    return verdict + ("<br>" + "<br>".join(items) if items else "")


def _prediction_row(pipe: dict) -> list[tuple[str, str]]:
    """What the sampler assumed about the model's training target, flagged when it was a guess."""
    pred = pipe.get("prediction_type")
    if not isinstance(pred, dict):
        return []
    flag = "ASSUMED — " if pred.get("assumed") else ""
    return [("prediction type", f"{flag}{pred.get('value')} ({pred.get('source', '')})")]


def _images_html(section: dict | None) -> str:
    """The image smoke audit for a reviewer: settings, detector, numbers, the contact sheet, and
    every image linked (relative paths inside this signed folder; no tooling needed)."""
    e = html.escape
    if not section or not section.get("enabled"):
        return ("<h2>Image smoke audit</h2><p>Not run: <code>[audit.images]</code> is not enabled "
                "in the manifest. Image gates, if configured, are reported as failed.</p>")
    st, det, summ, pipe = section["settings"], section["detector"], section["summary"], section["pipeline"]
    parts = ["<h2>Image smoke audit</h2>",
             "<p>The same prompts and seeds through the source and the sanitized model. An image is "
             f"<b>nude</b> when NudeNet scores one of the {len(det['counted_classes'])} counted classes at "
             f"≥ {det['threshold']:g}. The sanitized images were rendered from the exact K/V bytes of the "
             "written model.</p>",
             "<h3>Settings</h3>",
             _table([("erase prompts", len(st["prompts"])), ("preserve prompts", len(st["preserve_prompts"])),
                     ("seeds", ", ".join(map(str, st["seeds"]))), ("steps", st["steps"]),
                     ("size", f"{st['size']}×{st['size']}"), ("guidance", st["guidance"]),
                     ("scheduler", f"{pipe['scheduler']['class']} (eta {pipe['scheduler']['eta']})"),
                     ("pipeline", f"{pipe['pipeline']}, {pipe['built_from']}"),
                     ("precision / device", f"{pipe['dtype']} on {pipe['device']}"),
                     ("initial noise", pipe["initial_noise"]), ("safety checker", "none")]
                    + _prediction_row(pipe),
                    ["setting", "value"]),
             "<h3>Detector</h3>",
             _table([("detector", f"{det['name']} {det['version']} ({det['model_file']}, "
                                  f"{det['resolution']} px)"),
                     ("model sha256", det["model_sha256"]), ("threshold", det["threshold"]),
                     ("counted classes", ", ".join(det["counted_classes"]))], ["field", "value"]),
             "<h3>Results</h3>"]
    rows = [("nude images, erase prompts", summ["nude_images"]["source"], summ["nude_images"]["sanitized"],
             summ["erase_images"]),
            ("nude images, preserve prompts", summ["preserve_nude_images"]["source"],
             summ["preserve_nude_images"]["sanitized"], summ["preserve_images"])]
    rows += [(f"  erase images with {c}", summ["nude_classes"]["source"][c], summ["nude_classes"]["sanitized"][c],
              summ["erase_images"]) for c in det["counted_classes"]]
    for group, clip in (summ["clip_score"] or {}).items():
        if clip:
            rows.append((f"mean CLIP score, {group} prompts (ratio {_fmt(clip['ratio'])})", clip["source"],
                         clip["sanitized"], clip["images"]))
    parts.append(_table(rows, ["measure", "source", "sanitized", "images"]))
    if summ["clip_score"] is None:
        parts.append(f"<p>CLIP score: not run ({e(section['clip'].get('reason', ''))}).</p>")
    else:
        parts.append(f"<p class=meta>CLIP: {e(section['clip']['model'])} · weights "
                     f"{e(str(section['clip']['weights_sha256']))} · {e(section['clip']['score'])}</p>")
    for sel in section["selection"]:
        parts.append(f"<h3>Round selection: {e(sel['concept_set'])} (select = \"best\")</h3>"
                     f"<p>{e(sel['criterion'])}. Kept: round {sel['chosen_round']}.</p>")
        parts.append(_table([(r["round"], r["after"], r["nude_images"], r["images"],
                              "kept" if r["round"] == sel["chosen_round"] else "")
                             for r in sel["rounds"]], ["round", "after", "nude images", "images", ""]))
    parts.append("<h3>Contact sheet</h3><p>Rows: prompts. Columns: source | sanitized per seed. Red boxes: "
                 "counted classes at or above the threshold; grey: other detections.</p>")
    for sheet in section["contact_sheets"]:
        parts.append(f"<p><a href=\"{e(sheet)}\"><img class=sheet src=\"{e(sheet)}\" "
                     f"alt=\"contact sheet {e(sheet)}\"></a></p>")
    parts.append("<h3>Every image</h3>")
    body = []
    for rec in section["images"]:
        cells = [e(rec["group"]), e(rec["prompt"]), str(rec["seed"])]
        for model in ("source", "sanitized"):
            m = {**rec[model], "threshold": det["threshold"]}
            cells.append(f"<a href=\"{e(m['file'])}\"><img class=thumb src=\"{e(m['file'])}\" "
                         f"alt=\"{model} image\"></a>{e(m['file'])}")
            cells.append(_detections_html(m))
            cells.append(_fmt(m["clip_score"]))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["group", "prompt", "seed", "source", "source detections", "source CLIP", "sanitized",
            "sanitized detections", "sanitized CLIP"]
    parts.append("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
                 + "".join(body) + "</tbody></table>")
    return "\n".join(parts)


def write_html(path: Path, audit: dict) -> None:
    _atomic_write(path, render_html(audit).encode("utf-8"))


def write_junit(path: Path, results: list[tuple[str, list[Gate]]]) -> None:
    """Each gate a test case, one suite per checkpoint."""
    root = ET.Element("testsuites", name="rece-tool")
    for name, gates in results:
        suite = ET.SubElement(root, "testsuite", name=name, tests=str(len(gates)),
                              failures=str(sum(not g.passed for g in gates)))
        for g in gates:
            case = ET.SubElement(suite, "testcase", classname=name, name=g.name)
            if not g.passed:
                ET.SubElement(case, "failure", message=gate_line(g))
    _atomic_write(Path(path), ET.tostring(root, encoding="utf-8", xml_declaration=True))
