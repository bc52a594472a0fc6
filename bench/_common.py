"""Shared helpers for the bench/ scripts: fixtures, subprocess timing with peak RSS, result lines.

Everything runs offline. Full-size fixtures are cached outside the repository in
~/.cache/rece-tool-bench/ (override with RECE_BENCH_CACHE) and built once.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RECE_TOOL = VENV_BIN / "rece-tool"
PYTHON = sys.executable
CACHE = Path(os.environ.get("RECE_BENCH_CACHE", Path.home() / ".cache" / "rece-tool-bench"))

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENV)

# The streaming copy every "I/O floor" is measured with: 16 MiB chunks, sha256 of every byte,
# written out and fsynced (the tool fsyncs its output too), in a fresh Python process.
COPY_SCRIPT = r"""
import hashlib, os, sys
buf = bytearray(16 << 20); view = memoryview(buf)
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    h = hashlib.sha256()
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as o:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            o.write(view[:n])
        os.fsync(o.fileno())
    print(h.hexdigest())
"""


def header(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def say(*args) -> None:
    print(*args, flush=True)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def disk_free(path: Path = Path.home()) -> int:
    return shutil.disk_usage(path).free


def require_disk(nbytes: int, path: Path = Path.home()) -> None:
    free = disk_free(path)
    if free < nbytes:
        sys.exit(f"bench: needs {gib(nbytes)} free under {path}, only {gib(free)} available")


# --- fixtures ------------------------------------------------------------------------------------

def sd15_fixture(quick: bool = False) -> Path:
    """The full-size SD1.5-shaped fp16 single file (~2.1 GB, random weights), cached; or, with
    `quick`, a tiny one (seconds)."""
    import torch

    from rece_tool import tiny

    CACHE.mkdir(parents=True, exist_ok=True)
    name = "tiny-sd15-fp16.safetensors" if quick else "sd15-full-fp16.safetensors"
    path = CACHE / name
    if not path.exists():
        if not quick:
            require_disk(5 * 2**30, CACHE)
        say(f"building fixture {path} (once; full size takes ~30 s and ~7 GB RAM)")
        t = time.perf_counter()
        tiny.write_sd1_single_file(path, seed=0, dtype=torch.float16, full_size=not quick)
        say(f"  built in {time.perf_counter() - t:.1f} s")
    return path


def nudity_manifest(folder: Path, checkpoints: dict[str, Path], out: Path | None = None,
                    extra: str = "") -> Path:
    lines = ["version = 1", "", "[output]", f'dir = "{(out or folder / "out").as_posix()}"', ""]
    for name, path in checkpoints.items():
        lines += ["[[checkpoint]]", f'name = "{name}"', f'path = "{Path(path).as_posix()}"', ""]
    lines += ["[[concept_set]]", 'name = "nudity"', 'preset = "nudity"', "", extra]
    m = folder / "manifest.toml"
    m.write_text("\n".join(lines) + "\n")
    return m


def make_signing_key(folder: Path) -> Path:
    """`rece-tool keygen` into `folder`; the private key's path."""
    subprocess.run([str(RECE_TOOL), "keygen", str(folder)], check=True, capture_output=True,
                   env={**os.environ, **OFFLINE_ENV})
    keys = [p for p in folder.glob("*.pem") if not p.name.endswith(".pub.pem")]
    if len(keys) != 1:
        raise RuntimeError(f"keygen left {keys} in {folder}")
    return keys[0]


# --- measuring subprocesses ---------------------------------------------------------------------

@dataclass
class Run:
    seconds: float
    cpu: float             # user + system CPU seconds of the process tree (reaped children)
    peak_rss: int          # bytes, the process tree's largest VmHWM (or ru_maxrss) seen
    returncode: int
    stdout: str
    stderr: str


def _vmhwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None,
                 check: bool = True) -> Run:
    """Run `cmd`; wall time and peak RSS (polling /proc/PID/status VmHWM every 50 ms, and the
    kernel's ru_maxrss of the reaped child, whichever is larger)."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    for k, v in list(full_env.items()):
        if v is None:
            del full_env[k]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = ru0.ru_maxrss * 1024
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = 0
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _vmhwm(proc.pid))
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    poller.join()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = ru1.ru_maxrss * 1024
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    # ru_maxrss of RUSAGE_CHILDREN is the max over all reaped children: only informative when it
    # grew during this run.
    if after > before:
        peak = max(peak, after)
    run = Run(seconds, cpu, peak, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}\nstdout: {out[-2000:]}\nstderr: {err[-4000:]}")
    return run


def copy_and_hash(pairs: list[tuple[Path, Path]]) -> Run:
    args = [str(p) for pair in pairs for p in pair]
    return run_measured([PYTHON, "-c", COPY_SCRIPT, *args])


def median(xs) -> float:
    return statistics.median(xs)


def report(results: list[dict], json_path: str | None) -> None:
    """A `RESULT name: measured X (target Y) PASS|MISS` line per result, and the same as JSON
    at `json_path` when given (for run_all.py)."""
    for r in results:
        print(f"RESULT {r['name']}: measured {r['measured']} (target {r['target']}) "
              f"{'PASS' if r['pass'] else 'MISS'}", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


def bench_tmpdir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder on the same file system as the cache (outputs are GBs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=CACHE)


def audit_of(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / name / "audit.json").read_text())
