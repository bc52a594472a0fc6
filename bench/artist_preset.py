"""Artist preset with 1,734 preserve texts on a full-size ViT-L text encoder (random weights).

The text encoder is the full-size SD1.5 CLIP ViT-L/14 text tower stored in the cached 2 GB
fixture (random weights, SD1.5 text config), loaded and run by the product's own TextEmbedder,
batched. 1,734 distinct artist-like names are generated deterministically (no data set); the
erased artist is a 1,735th name, not among them. The concept set is resolved by the product's
manifest loader (preset "artist": guide "art", 1 RECE round, reg 1e-3, preserve = "" + the file).

Measured: tokenizer + text encoder load, embedding of every distinct text (batched), the edit
(gram + concept_set_transform + kv_edit(T).apply to the 32 K/V matrices). Target: embed + edit
≤ 5 min on CPU.

Baseline: the research code's flow, which re-encodes every text inside each layer's loop (UCE's
edit_model encodes [old, new] as a batch of 2, so each preserve text costs one batch-2 encode per
layer per edit) and builds each text's 77-row outer-product sums per layer explicitly. Running
it would take hours, so it is EXTRAPOLATED: the per-encode cost is timed on a sample of texts and
the per-(text, layer) sum cost on a sample of layers of each shape, then multiplied by
texts × 32 layers × 2 edits (UCE pass + 1 RECE round).

    .venv/bin/python bench/artist_preset.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from rece_tool import erase, manifest as manifest_mod, sanitize  # noqa: E402
from rece_tool.checkpoint.layout import open_checkpoint  # noqa: E402
from rece_tool.checkpoint.safetensors_format import read_tensor  # noqa: E402
from rece_tool import text as text_mod  # noqa: E402
from rece_tool.text import TextEmbedder  # noqa: E402

N_PRESERVE = 1734
TARGET_S = 300.0

FIRST = """Adele Akira Alba Alonso Amara Anders Anselm Aurelio Beatrix Benedikt Bianca Boris Camille
Casimir Cecilia Claude Corrado Dagny Dario Delphine Dmitri Edda Elio Emeric Esther Evander Fabiola
Felix Flora Gaspard Greta Gustave Hana Hector Hilma Ignatius Ilse Isidore Jacoba Jiro Josefa Jules
Kasimir Katsushika Kira Lajos Leonora Lucian Ludmila Maren Mateo Mirela Nadia Niccolo Odile Olafur
Orsola Pavel Petra Quentin Rafaela Rosalind Sabine Severin Sigrid Taddeo Thea Tomasz Ulrike Vanya
Vera Wilhelmina Xaver Yelena Yusuf Zdenka Zoltan""".split()
LAST = """Abramova Achterberg Albescu Amorsolo Andersen Arkwright Baldessari Barbosa Belloni Bergstrom
Blanchard Bonvicini Brakhage Calloway Castellano Cervantes Chaudhry Corvalan Dahlgren Delacroix-Vane
Desrosiers Drummond Eckersley Esposito Falkenrath Ferreira Fontaine Galloway Gendreau Gorchakov
Hallberg Harcourt Hesselbach Holloway Ibarra Ivanescu Jablonski Jovanovic Kaminski Kessler Kowalczyk
Lacombe Lindqvist Lombardi Maclaren Marchetti Montague Nakamura Nordstrom Oyelaran Palmieri
Pemberton Quiroga Rasmussen Rinaldi Rutkowska Sandoval Schellenberg Sorensen Takahashi Trevelyan
Underhill Valdivia Vasquez-Lind Wakefield Westerholm Yamashiro Zelenko""".split()


def artist_names(n: int) -> list[str]:
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    random.Random(1734).shuffle(names)
    if len(names) < n + 1:
        raise RuntimeError("not enough name combinations")
    return names[:n + 1]  # the last one is the artist to erase


def write_manifest(folder: Path, fixture: Path, erase_name: str, preserve: list[str]) -> Path:
    (folder / "artists.txt").write_text("\n".join(preserve) + "\n")
    m = folder / "artist.toml"
    m.write_text(f"""version = 1
[output]
dir = "out"
[[checkpoint]]
name = "sd15"
path = "{fixture.as_posix()}"
[[concept_set]]
name = "artist"
preset = "artist"
erase = ["{erase_name}"]
preserve_file = "artists.txt"
""")
    return m


@torch.no_grad()
def time_baseline(embedder: TextEmbedder, texts: list[str], kv_shapes: list[tuple[int, int]],
                  n_edits: int, sample_texts: int, sample_layers_per_shape: int):
    """(encode seconds, math seconds), both extrapolated from samples, for the research flow."""
    rng = random.Random(0)
    sample = rng.sample(texts, min(sample_texts, len(texts)))
    embedder._encode([sample[0], sample[0]])  # warm-up
    t = time.perf_counter()
    for text in sample:
        embedder._encode([text, text])
    per_encode = (time.perf_counter() - t) / len(sample)
    layers = len(kv_shapes)
    encode_total = per_encode * len(texts) * layers * n_edits

    # per (text, layer) explicit 77-row outer-product sums, as in UCE's retain loop (float32)
    d = kv_shapes[0][1]
    rows = torch.randn(77, d)
    per_shape = {}
    for shape in sorted(set(kv_shapes)):
        w = torch.randn(*shape)
        times = []
        for _ in range(sample_layers_per_shape):
            t = time.perf_counter()
            values = rows @ w.T
            m1 = (values.reshape(77, shape[0], 1) @ rows.reshape(77, 1, d)).sum(dim=0)
            m2 = (rows.reshape(77, d, 1) @ rows.reshape(77, 1, d)).sum(dim=0)
            times.append(time.perf_counter() - t)
            del m1, m2
        per_shape[shape] = sorted(times)[len(times) // 2]
    math_total = sum(per_shape[s] for s in kv_shapes) * len(texts) * n_edits
    return per_encode, encode_total, per_shape, math_total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny fixture and 64 preserve texts (smoke run)")
    ap.add_argument("--json", help="write the RESULT figures here as JSON")
    args = ap.parse_args()
    n = 64 if args.quick else N_PRESERVE

    fixture = c.sd15_fixture(quick=args.quick)
    names = artist_names(n)
    preserve, target = names[:n], names[n]
    c.header("artist_preset")
    c.say(f"fixture   {fixture}{' (TINY text encoder: smoke run only)' if args.quick else ' (full-size ViT-L text encoder, random weights)'}")
    c.say(f"texts     erase [{target!r}], guide 'art', preserve '' + {n} generated artist names "
          f"(e.g. {preserve[0]!r}, {preserve[1]!r}); torch {torch.get_num_threads()} threads, CPU")

    with c.bench_tmpdir("artist-") as tmp:
        folder = Path(tmp)
        m = manifest_mod.load(write_manifest(folder, fixture, target, preserve))
        spec = m.checkpoints[0]
        sets = m.sets_for(spec)
        cs = sets[0]
        c.say(f"resolved  preset {cs.preset}: {len(cs.preserve)} preserve texts, epochs {cs.epochs}, reg {cs.reg}")

        t0 = time.perf_counter()
        ckpt = open_checkpoint(spec.path)
        kv = [read_tensor(wf.header, k) for wf in ckpt.weight_files for k in wf.kv_keys]
        t_read = time.perf_counter() - t0

        t = time.perf_counter()
        embedder = TextEmbedder(ckpt, spec.tokenizer, "cpu")
        t_load = time.perf_counter() - t
        texts = sanitize._texts_of(sets)
        t = time.perf_counter()
        emb = embedder.embed(texts)
        t_embed = time.perf_counter() - t
        c.say(f"  read K/V ({len(kv)} tensors)            {t_read:8.2f} s")
        c.say(f"  load tokenizer + text encoder        {t_load:8.2f} s")
        c.say(f"  embed {len(texts)} distinct texts (batch {text_mod.BATCH})  {t_embed:8.2f} s "
              f"({1000 * t_embed / len(texts):.1f} ms/text)")

        t = time.perf_counter()
        s = erase.gram(kv)
        math = sanitize._math_spec(cs, emb)
        result = erase.concept_set_transform(s, torch.eye(s.shape[0], dtype=torch.float64), math)
        edit = erase.kv_edit(result.transform)
        new = [edit.apply(w) for w in kv]
        t_edit = time.perf_counter() - t
        c.say(f"  edit (gram + transform + apply)      {t_edit:8.2f} s")
        total = t_embed + t_edit
        c.say(f"  embed + edit                         {total:8.2f} s   (with load: {total + t_load:.2f} s)")
        del new

        shapes = [tuple(w.shape) for w in kv]
        per_encode, enc_total, per_shape, math_total = time_baseline(
            embedder, list(cs.preserve), shapes, n_edits=1 + cs.epochs,
            sample_texts=8 if args.quick else 24, sample_layers_per_shape=3)
        base = enc_total + math_total
        c.say("baseline (research flow, EXTRAPOLATED, not run):")
        c.say(f"  one batch-2 encode                   {per_encode * 1000:8.1f} ms (mean over the sampled texts)")
        c.say(f"  re-encoding: {len(cs.preserve)} texts x {len(shapes)} layers x {1 + cs.epochs} edits = "
              f"{enc_total:.0f} s ({enc_total / 3600:.2f} h)")
        c.say("  per-text outer-product sums: " + ", ".join(f"{s[0]}x{s[1]} {v * 1000:.1f} ms" for s, v in per_shape.items())
              + f" -> {math_total:.0f} s ({math_total / 3600:.2f} h)")
        c.say(f"  total {base:.0f} s ({base / 3600:.2f} h); ratio baseline / (embed + edit) = {base / total:.0f}x (extrapolated)")

    res = [{"name": "artist_preset embed+edit (1,734 preserve texts)",
            "measured": f"{total:.1f} s ({base / total:.0f}x faster than the extrapolated research flow, {base / 3600:.1f} h)",
            "target": f"<= {TARGET_S:.0f} s", "pass": total <= TARGET_S}]
    c.report(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
