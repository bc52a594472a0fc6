"""Ten checkpoints sharing one text encoder (fine-tunes of one base) in one manifest.

Fixtures (cached, built once): 10 distinct SD1-layout fp16 single files. Each carries the
FULL-SIZE SD1.5 CLIP ViT-L text encoder, byte-identical across all 10 (copied from the 2 GB
fixture), and a scaled-down SD1 UNet (block_out_channels 128/256/512/512, cross_attention_dim
768, the SD1 topology: 32 K/V matrices), a different random seed per file (so the K/V weights,
the Gram matrix and the edit differ), plus a tiny VAE. (Ten full-size files would be 20 GB of
inputs and 20 GB of outputs per run; the text-encoder side, which is what a shared-encoder cache
saves, is full size.)

Measured, in one run: the I/O floor (copy + sha256 + fsync of the 10 files, and of one), one
`rece-tool sanitize` of a manifest with all 10 [[checkpoint]]s, and 10 separate runs with one
checkpoint each (`--only`). Signing off.

Target: ten checkpoints cost ≤ 1.5x one, beyond their I/O:
    (T_all10 - IO_10) / (T_one - IO_one) ≤ 1.5
(the fixed costs, text-encoder load and embedding, paid about once).

    .venv/bin/python bench/many_checkpoints.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

N = 10
TARGET = 1.5
UNET_CHANNELS = [128, 256, 512, 512]


def build_fixtures(quick: bool) -> list[Path]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rece_tool import tiny

    base = c.sd15_fixture(quick=quick)
    folder = c.CACHE / ("many-tiny" if quick else "many")
    paths = [folder / f"ft{i:02d}.safetensors" for i in range(N)]
    done = folder / "COMPLETE"
    if done.exists() and all(p.exists() for p in paths):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    c.say(f"building {N} fixtures in {folder} (once)")
    t0 = time.perf_counter()
    with safe_open(str(base), "pt") as f:
        text = {k: f.get_tensor(k) for k in f.keys() if k.startswith("cond_stage_model.")}
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_cfg = dict(tiny.TINY_UNET_CONFIG if quick else {**tiny.SD15_UNET_CONFIG, "block_out_channels": UNET_CHANNELS})
    if quick:
        unet_cfg["cross_attention_dim"] = text["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape[1]
    vae_cfg = dict(tiny.TINY_VAE_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        vae = tiny.vae_to_ldm(AutoencoderKL(**vae_cfg).state_dict(), vae_cfg)
        for i, path in enumerate(paths):
            torch.manual_seed(1000 + i)
            unet = tiny.unet_to_ldm(UNet2DConditionModel(**unet_cfg).state_dict(), unet_cfg)
            sd = {**unet, **vae, **text, **tiny._ldm_schedule_buffers()}
            sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
            save_file(sd, str(path), metadata={"format": "pt", "bench": f"fine-tune {i} of a shared base (random)"})
            del unet, sd
    done.write_text("ok\n")
    c.say(f"  built in {time.perf_counter() - t0:.1f} s")
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny fixtures (smoke run)")
    ap.add_argument("--singles", type=int, default=N, help="how many of the 10 single-checkpoint runs to time (default all 10)")
    ap.add_argument("--json", help="write the RESULT figures here as JSON")
    args = ap.parse_args()

    paths = build_fixtures(args.quick)
    sizes = [p.stat().st_size for p in paths]
    c.header("many_checkpoints")
    c.say(f"fixtures  {N} files, {c.gib(sum(sizes))} in all ({c.gib(sizes[0])} each): shared "
          f"{'TINY' if args.quick else 'full-size ViT-L'} text encoder, distinct scaled-down SD1 UNets")
    c.say("product   rece-tool sanitize -q, nudity preset, signing off")
    c.require_disk(2 * sum(sizes) + 2**30, c.CACHE)
    with c.bench_tmpdir("many-") as tmp:
        folder = Path(tmp)
        names = {f"ft{i:02d}": p for i, p in enumerate(paths)}
        out = folder / "out"
        manifest = c.nudity_manifest(folder, names, out)
        noenv = {"RECE_SIGNING_KEY": None}

        def io(ps):
            pairs = [(p, folder / f"copy-{p.name}") for p in ps]
            r = c.copy_and_hash(pairs)
            for _, d in pairs:
                d.unlink()
            return r

        # warm-up: page cache for all inputs, imports
        io(paths)
        c.run_measured([str(c.RECE_TOOL), "sanitize", str(manifest), "-q", "--only", "ft00"], env=noenv)
        shutil.rmtree(out)

        io10 = io(paths)
        io1 = c.median([io([paths[0]]).seconds for _ in range(3)])
        c.say(f"  I/O floor: 10 files {io10.seconds:.2f} s; one file {io1:.2f} s (median of 3)")

        all10 = c.run_measured([str(c.RECE_TOOL), "sanitize", str(manifest), "-q"], env=noenv)
        stage_sums: dict[str, float] = {}
        for n in names:
            for k, v in c.audit_of(out, n)["timings_s"].items():
                stage_sums[k] = stage_sums.get(k, 0.0) + v
        shutil.rmtree(out)
        c.say(f"  one process, 10 checkpoints: {all10.seconds:.2f} s (cpu {all10.cpu:.2f} s, peak RSS "
              f"{all10.peak_rss / 2**20:.0f} MiB); stage sums over the 10: "
              + ", ".join(f"{k} {v:.2f}" for k, v in stage_sums.items()))

        singles = []
        for n in list(names)[:args.singles]:
            r = c.run_measured([str(c.RECE_TOOL), "sanitize", str(manifest), "-q", "--only", n], env=noenv)
            shutil.rmtree(out)
            singles.append(r.seconds)
        one = c.median(singles)
        ten = sum(singles) * N / len(singles)
        c.say(f"  {len(singles)} separate single-checkpoint runs: one checkpoint median {one:.2f} s (min {min(singles):.2f}, "
              f"max {max(singles):.2f}); 10 separate runs {'' if len(singles) == N else 'EXTRAPOLATED '}{ten:.2f} s")

        over10 = all10.seconds - io10.seconds
        over1 = one - io1
        ratio = over10 / over1
        c.say(f"  beyond I/O: 10 in one run {over10:.2f} s vs one {over1:.2f} s -> {ratio:.2f}x "
              f"(10 separate runs beyond I/O: {ten - io10.seconds:.2f} s)")
        c.say(f"  one run of 10 vs 10 runs of one: {ten / all10.seconds:.2f}x faster")
        fixed = stage_sums.get("load_text_encoder", 0) + stage_sums.get("embed", 0)
        c.say(f"  text-encoder stages summed over the 10: {fixed:.2f} s (the encoder is loaded and the "
              f"texts embedded once; every later checkpoint pays the fingerprint hash of its encoder)")
    res = [{"name": "many_checkpoints 10 vs 1 beyond I/O", "measured": f"{ratio:.2f}x (10 in one run "
            f"{all10.seconds:.1f} s, one {one:.1f} s, I/O floor 10: {io10.seconds:.1f} s / one: {io1:.1f} s)",
            "target": f"<= {TARGET}x", "pass": ratio <= TARGET}]
    c.report(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
