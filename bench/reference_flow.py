"""`rece-tool sanitize` vs the research code's flow, end to end, on the same single file.

Reference flow (a separate Python process, as the research scripts run): load the whole
StableDiffusionPipeline from the single file in float32 (diffusers `from_single_file` with a
local config folder written here and `local_files_only=True`; no network), collect the 32
attn2 to_k/to_v projections, then the nudity preset as UCE/RECE's code does it: per layer,
re-encode the texts with the pipeline's text encoder ([old, new] batches of 2), build the
explicit outer-product sums and invert in float32 (bench/_reference.py), UCE pass + 3 RECE
rounds (the derivation summed over all layers each round); finally save the float32 UNet state
dict with safetensors. No audit, no signing, no provenance.

Product: `rece-tool sanitize` (nudity preset, weight audit, signing off) on the same file.
Target: the product ≥ 10× faster end to end.

    .venv/bin/python bench/reference_flow.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

TARGET = 10.0


def write_config_folder(folder: Path, quick: bool) -> Path:
    """A diffusers SD1.5 config folder (no weights): what from_single_file needs offline."""
    from transformers import CLIPTextConfig

    from rece_tool import tiny

    import diffusers

    unet_cfg, text_cfg, vae_cfg = tiny._configs(full_size=not quick)
    folder.mkdir(parents=True, exist_ok=True)
    version = diffusers.__version__
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": version,
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    for sub, cls, cfg in [("unet", "UNet2DConditionModel", unet_cfg), ("vae", "AutoencoderKL", vae_cfg),
                          ("scheduler", "PNDMScheduler", tiny.SD15_SCHEDULER_CONFIG)]:
        (folder / sub).mkdir(exist_ok=True)
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (folder / sub / name).write_text(json.dumps({"_class_name": cls, "_diffusers_version": version, **cfg}, indent=2))
    CLIPTextConfig(**text_cfg).save_pretrained(str(folder / "text_encoder"))
    tiny.clip_tokenizer().save_pretrained(str(folder / "tokenizer"))
    tiny._write_slow_tokenizer_files(folder / "tokenizer")
    return folder


def reference_worker(src: Path, config: Path, out: Path) -> None:
    """The research-code flow; prints a JSON line of stage timings."""
    import torch
    from diffusers import StableDiffusionPipeline

    import _reference as ref

    timings = {}
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        str(src), config=str(config), local_files_only=True, torch_dtype=torch.float32,
        safety_checker=None, requires_safety_checker=False)
    timings["load_pipeline_fp32"] = time.perf_counter() - t

    tok, enc, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    layers = [m for name, m in unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))]
    source = [layer.weight.detach().clone() for layer in layers]
    encode_time = [0.0]

    @torch.no_grad()
    def encode(texts):
        t0 = time.perf_counter()
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        e = enc(ids.input_ids)[0]
        encode_time[0] += time.perf_counter() - t0
        return e, ids.attention_mask.sum(dim=1).tolist()

    concept, guide, retain = "nudity", " ", [""]

    @torch.no_grad()
    def edit_all(lamb, es, ps, erase_rows=None):
        for li, layer in enumerate(layers):
            # re-encode inside the layer loop, as the research code does
            e, n = encode([concept, guide])
            if erase_rows is None:
                c_rows, g_rows = ref.uce_slices(e[0], n[0], e[1], n[1])
            else:
                c_rows, g_rows = erase_rows, e[1]
            preserve = [encode([r, r])[0][0] for r in retain]
            layer.weight = torch.nn.Parameter(ref.edit_layer(layer.weight.detach(), [(c_rows, g_rows)],
                                                             preserve, lamb, es, ps))

    t = time.perf_counter()
    edit_all(0.5, 1.0, max(0.1, 1 / len(retain)))
    for _ in range(3):
        e, _n = encode([concept, guide])
        attack = ref.derive([layer.weight.detach() for layer in layers], source, 0.1, e[0])
        edit_all(0.1, 1.0, 0.1, erase_rows=attack)
    timings["edit_incl_encode"] = time.perf_counter() - t
    timings["of_which_encode"] = encode_time[0]

    from safetensors.torch import save_file

    t = time.perf_counter()
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(out))
    timings["save_unet_fp32"] = time.perf_counter() - t
    print("TIMINGS " + json.dumps(timings))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny fixture (smoke run)")
    ap.add_argument("--runs", type=int, default=None, help="sanitize runs around the reference (median; default 2)")
    ap.add_argument("--json", help="write the RESULT figures here as JSON")
    ap.add_argument("--_worker", nargs=3, metavar=("SRC", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        reference_worker(*map(Path, args._worker))
        return 0

    src = c.sd15_fixture(quick=args.quick)
    runs = args.runs or (1 if args.quick else 2)
    c.header("reference_flow")
    c.say(f"fixture    {src} ({c.gib(src.stat().st_size)})")
    c.say("reference  from_single_file fp32 + per-layer re-encode + explicit float32 sums/inverse "
          "(UCE + 3 RECE rounds) + save fp32 UNet (safetensors)")
    c.say(f"product    rece-tool sanitize (nudity, weight audit, signing off); median of {runs}")
    c.require_disk(6 * 2**30, c.CACHE)
    with c.bench_tmpdir("reference-flow-") as tmp:
        folder = Path(tmp)
        config = write_config_folder(folder / "config", args.quick)
        manifest = c.nudity_manifest(folder, {"sd15": src}, folder / "out")
        prod = []

        def product_run():
            r = c.run_measured([str(c.RECE_TOOL), "sanitize", str(manifest), "-q"], env={"RECE_SIGNING_KEY": None})
            shutil.rmtree(folder / "out")
            c.say(f"  product   {r.seconds:7.2f} s  peak RSS {r.peak_rss / 2**20:.0f} MiB")
            prod.append(r)

        product_run()
        ref_out = folder / "unet-fp32.safetensors"
        r = c.run_measured([c.PYTHON, str(Path(__file__).resolve()), "--_worker", str(src), str(config), str(ref_out)])
        timings = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("TIMINGS ")][-1][8:])
        ref_out.unlink()
        c.say(f"  reference {r.seconds:7.2f} s  peak RSS {r.peak_rss / 2**20:.0f} MiB   stages: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        for _ in range(runs - 1):
            product_run()
        p = c.median([x.seconds for x in prod])
        ratio = r.seconds / p
        c.say(f"  ratio reference / product: {ratio:.1f}x")
    res = [{"name": "reference_flow speed-up", "measured": f"{ratio:.1f}x (reference {r.seconds:.1f} s, "
            f"product {p:.1f} s)", "target": f">= {TARGET:.0f}x", "pass": ratio >= TARGET}]
    c.report(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
