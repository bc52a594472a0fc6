"""Run every benchmark in sequence and print a summary table of figure vs target.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME ...] [--skip NAME ...]

Each script's full output is streamed as it runs; the table at the end repeats their RESULT
lines. Exit status 0 even when a target is missed (these are measurements, not gates); 1 if a
script crashed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["sanitize_vs_copy", "edit_math", "artist_preset", "reference_flow", "many_checkpoints"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-run every script")
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, default=None)
    ap.add_argument("--skip", nargs="+", choices=SCRIPTS, default=[])
    args = ap.parse_args()
    chosen = [s for s in (args.only or SCRIPTS) if s not in args.skip]

    rows, crashed = [], []
    with tempfile.TemporaryDirectory(prefix="rece-bench-") as tmp:
        for name in chosen:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out)] + (["--quick"] if args.quick else [])
            t = time.perf_counter()
            code = subprocess.call(cmd)
            secs = time.perf_counter() - t
            if code != 0 or not out.exists():
                crashed.append(name)
                rows.append((name, "CRASHED", f"exit {code}", "", "MISS", secs))
                continue
            for r in json.loads(out.read_text()):
                rows.append((name, r["name"], r["measured"], r["target"], "PASS" if r["pass"] else "MISS", secs))

    print("\n=== summary" + (" (QUICK smoke run: figures meaningless)" if args.quick else "") + " ===")
    w = max(len(r[1]) for r in rows) if rows else 10
    for script, name, measured, target, verdict, secs in rows:
        print(f"{verdict:<5} {name:<{w}}  {measured}  (target {target})  [{script}, {secs:.0f} s]")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
