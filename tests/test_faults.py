"""Faults: big files, full disks, signals, concurrent runs — nothing lost, nothing half-written.

The big checkpoint is a tiny SD1 file with a 600 MiB tensor of zeros appended
(`first_stage_model.padding`), written as a sparse file: it costs no disk and no memory to make,
but rece-tool has to stream every byte of it (the output copy is real, and is removed at the
end of the module).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, sha256, write_manifest
from rece_tool import output
from rece_tool.checkpoint.safetensors_format import read_header
from rece_tool.errors import OutputError, WriteFailure

PAD_BYTES = 600 * 1024 * 1024
PAD_KEY = "first_stage_model.padding"  # not UNet, not text encoder: copied through untouched
MiB = 1024 * 1024
NUDITY = '[[concept_set]]\nname = "nudity"\npreset = "nudity"\n'
CLI = [sys.executable, "-m", "rece_tool._cli"]


def pad_checkpoint(src: Path, dst: Path, pad: int = PAD_BYTES) -> Path:
    """`src` plus one `pad`-byte U8 tensor at the end of its data, as a sparse file."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    doc[PAD_KEY] = {"dtype": "U8", "shape": [pad], "data_offsets": [len(data), len(data) + pad]}
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + data)
        f.truncate(8 + len(body) + len(data) + pad)  # the zeros are a hole: no disk, no RAM
    return dst


@pytest.fixture(scope="module")
def big(models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    path = pad_checkpoint(models("fp32"), folder / "big.safetensors")
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def workspace(tmp_path: Path, model: Path, name: str = "m") -> tuple[Path, Path]:
    """A manifest sanitizing `model` into tmp_path/out; returns (manifest, output folder)."""
    manifest = write_manifest(tmp_path, [(name, model)], NUDITY, output="out")
    return manifest, tmp_path / "out"


def entries(folder: Path) -> list[str]:
    """Everything under `folder`, hidden entries included."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- peak memory -------------------------------------------------------------------------------

MEASURE = """
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=sys.stderr).returncode
print(json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""
IMPORTS_THEN_INSPECT = """
import sys, torch, transformers
from transformers import CLIPTextModel
import rece_tool.sanitize, rece_tool._cli
sys.argv = ["rece-tool", "inspect", sys.argv[1]]
rece_tool._cli.main()
"""


def peak_rss_mib(argv: list[str]) -> tuple[int, float]:
    """Exit code and peak RSS of `argv`, run as the only child of a fresh helper interpreter."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["rc"], result["maxrss_kib"] / 1024


def test_peak_memory_does_not_grow_with_the_checkpoint(big, models, tmp_path, capsys):
    """Peak RSS ≈ imports + text encoder + K/V, whatever else the checkpoint carries."""
    small = models("fp32")
    imports_rc, imports = peak_rss_mib([sys.executable, "-c", IMPORTS_THEN_INSPECT, str(big)])
    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    small_rc, small_peak = peak_rss_mib([*CLI, "sanitize", str(workspace(tmp_path / "small", small)[0]),
                                         "-q", "--device", "cpu"])
    manifest, out = workspace(tmp_path / "big", big)
    big_rc, big_peak = peak_rss_mib([*CLI, "sanitize", str(manifest), "-q", "--device", "cpu"])
    assert (imports_rc, small_rc, big_rc) == (0, 0, 0)
    written = out / "m" / "m.safetensors"
    assert written.stat().st_size > PAD_BYTES
    figures = (f"peak RSS: imports+inspect {imports:.0f} MiB, sanitize tiny {small_peak:.0f} MiB, "
               f"sanitize tiny+{PAD_BYTES // MiB} MiB padding {big_peak:.0f} MiB")
    with capsys.disabled():
        print(f"\n{figures}")
    assert big_peak < small_peak + 128, figures       # the padding is streamed, never held
    assert big_peak < imports + 400, figures          # and the whole run stays near the imports
    written.unlink()


# --- disk full ---------------------------------------------------------------------------------

def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_disk_full_leaves_nothing(models, tmp_path):
    manifest, out = workspace(tmp_path, models("fp32"))
    before = sha256(models("fp32"))
    proc = subprocess.run([*CLI, "sanitize", str(manifest), "-q", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(4 * MiB),
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    line = one_line(proc.stderr)
    assert proc.returncode in (2, 3), proc.stderr
    assert str(out / "m" / "m.safetensors") in line, line  # the final path, not the staging one
    assert "File too large" in line or "space" in line, line
    assert entries(out) == [], entries(out)          # no staging folder, temp file or lock
    assert sha256(models("fp32")) == before


# --- signals -----------------------------------------------------------------------------------

def _wait_for_write(proc: subprocess.Popen, out: Path, min_bytes: int = 8 * MiB,
                    timeout: float = 120, name: str = "m") -> Path:
    """Poll until the model's temporary file in the staging folder holds `min_bytes` of data
    (allocated blocks: the file is laid out at its full, sparse size before any is written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for tmp in out.glob(f"{output.STAGING_PREFIX}{name}-*/.{name}.safetensors.*.tmp"):
            try:
                if tmp.stat().st_blocks * 512 >= min_bytes:
                    return tmp
            except FileNotFoundError:
                pass
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"the write never started: {entries(out)}")


@pytest.mark.parametrize("signum,existing", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGINT-fresh", "SIGTERM-over-existing"])
def test_interrupt_mid_write(big, tmp_path, signum, existing):
    manifest, out = workspace(tmp_path, big)
    args = [*CLI, "sanitize", str(manifest), "-q", "--device", "cpu"]
    if existing:  # a previous release that --overwrite would replace: must survive intact
        (out / "m").mkdir(parents=True)
        (out / "m" / "m.safetensors").write_bytes(b"previous release")
        (out / "m" / "audit.json").write_text('{"previous": true}')
        args.append("--overwrite")
    before = entries(out), sha256(out) if out.exists() else None
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_write(proc, out)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    line = one_line(stderr)
    assert proc.returncode == 130, stderr
    assert "interrupted" in line, line
    if existing:
        assert (entries(out), sha256(out)) == before  # the previous release, byte for byte
    else:
        assert entries(out) == []  # no staging folder, temp file or lock


def test_interrupt_with_two_checkpoints_in_flight_leaves_nothing(big, tmp_path):
    """The pipeline holds checkpoint m (solved, still being written) while m2 is copied: an
    interrupt then abandons both, and nothing of either is left."""
    manifest = write_manifest(tmp_path, [("m", big), ("m2", big)], NUDITY, output="out")
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "sanitize", str(manifest), "-q", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_write(proc, out, name="m2")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in one_line(stderr)
    left = entries(out)
    # m finishes only after m2 is solved, a window the signal (sent as m2's copy starts) does
    # not wait for; should a slow machine let it finish first, it must be whole.
    if left:
        assert left[0] == "m" and all(p.startswith("m/") for p in left[1:]), left
        assert "m/audit.json" in left and "m/m.safetensors" in left, left
# --- two runs, one output ----------------------------------------------------------------------

def test_concurrent_runs_never_interleave(big, tmp_path):
    manifest, out = workspace(tmp_path, big)
    args = [*CLI, "sanitize", str(manifest), "-q", "--device", "cpu"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_write(first, out)
        first.send_signal(signal.SIGSTOP)  # a slow writer, holding the lock, deterministically
        try:
            during = entries(out)
            second = run_cli("sanitize", str(manifest), "-q", "--device", "cpu", "--overwrite")
            line = one_line(second.stderr)
            assert second.returncode == 2, second.stderr
            assert "another rece-tool run is writing" in line and str(out / "m") in line, line
            assert entries(out) == during  # the second run wrote nothing, removed nothing
            # ... not even the first run's lock file: a third run must be refused as well
            lock = out / ".m.lock"
            fd = os.open(lock, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        finally:
            first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert entries(out) == ["m", "m/audit.json", "m/m.safetensors", "m/report.html"]
    header = read_header(out / "m" / "m.safetensors")  # complete and well-formed
    assert header.tensors[PAD_KEY].nbytes == PAD_BYTES
    audit = json.loads((out / "m" / "audit.json").read_text())
    assert audit["output"]["files"][0]["bytes"] == header.file_size
    shutil.rmtree(out)


# --- output.py, in-process ---------------------------------------------------------------------

def test_output_paths_cannot_escape(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="symbolic link"):
        with output.staged_output(tmp_path / "link", "m", overwrite=True):
            pass
    out = tmp_path / "out"
    out.mkdir()
    (out / "m").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="outside the output folder"):
        with output.staged_output(out, "m", overwrite=True):
            pass
    for name in ("../m", "a/../../m"):
        with pytest.raises(OutputError):
            output.final_path(out, name)
    assert entries(tmp_path / "real") == []
    assert entries(out) == ["m"]


def test_a_refused_run_keeps_the_holders_lock(tmp_path):
    """The loser of the lock must not unlink the winner's lock file (a third run would then
    lock a fresh file and write concurrently)."""
    out = tmp_path / "out"
    with output.staged_output(out, "m", overwrite=False) as staging:
        with pytest.raises(OutputError, match="another rece-tool run"):
            with output.staged_output(out, "m", overwrite=False):
                pass
        assert (out / ".m.lock").exists()
        with pytest.raises(OutputError, match="another rece-tool run"):
            with output.staged_output(out, "m", overwrite=False):
                pass
        (staging / "f").write_text("x")
    assert entries(out) == ["m", "m/f"]


def test_orphaned_lock_is_not_trusted(tmp_path, monkeypatch):
    """A run that locked a lock file its previous holder already unlinked tries again."""
    out = tmp_path / "out"
    out.mkdir()
    real_flock, calls = fcntl.flock, []

    def flock(fd, op):
        real_flock(fd, op)
        if not calls:  # the first time: the previous holder unlinks the file under us
            calls.append(fd)
            os.unlink(out / ".m.lock")
    monkeypatch.setattr(output.fcntl, "flock", flock)
    with output.staged_output(out, "m", overwrite=False):
        assert len(calls) == 1
        fd = os.open(out / ".m.lock", os.O_RDWR)  # the file now at the path is really held
        try:
            with pytest.raises(BlockingIOError):
                real_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert entries(out) == ["m"]


def test_stale_cleanup_only_touches_its_own_checkpoint(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = out / f"{output.STAGING_PREFIX}m-x-4242"   # checkpoint "m-x", a concurrent run
    other.mkdir()
    mine = out / f"{output.STAGING_PREFIX}m-4242"      # checkpoint "m", killed with SIGKILL
    mine.mkdir()
    with output.staged_output(out, "m", overwrite=False) as staging:
        (staging / "f").write_text("x")
    assert other.exists() and not mine.exists()


def test_a_previous_output_set_aside_by_a_killed_run_is_restored(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = out / f"{output.STAGING_PREFIX}m-4242-old"  # killed between the two renames
    old.mkdir()
    (old / "m.safetensors").write_text("previous release")
    with pytest.raises(OutputError, match="already exists"):
        with output.staged_output(out, "m", overwrite=False):
            pass
    assert (out / "m" / "m.safetensors").read_text() == "previous release"
    assert entries(out) == ["m", "m/m.safetensors"]


def test_failed_promotion_restores_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "m").mkdir(parents=True)
    (out / "m" / "m.safetensors").write_text("previous release")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(output.STAGING_PREFIX) and not str(src).endswith("-old"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)
    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(WriteFailure, match="No space left"):
        with output.staged_output(out, "m", overwrite=True) as staging:
            (staging / "m.safetensors").write_text("new release")
    assert (out / "m" / "m.safetensors").read_text() == "previous release"
    assert entries(out) == ["m", "m/m.safetensors"]


def test_destination_is_checked_before_any_work(tmp_path):
    """`check_destination` refuses what `staged_output` would, and creates nothing."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "out" / "m").mkdir(parents=True)
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "m").symlink_to(tmp_path / "real")
    before = entries(tmp_path)
    for out, match in [("file", "not a folder"), ("link", "symbolic link"), ("out", "already exists"),
                       ("out2", "outside the output folder")]:
        with pytest.raises(OutputError, match=match):
            output.check_destination(tmp_path / out, "m", overwrite=out == "out2")
    output.check_destination(tmp_path / "out", "m", overwrite=True)
    output.check_destination(tmp_path / "new" / "deeper", "m", overwrite=False)
    assert entries(tmp_path) == before


def test_a_failure_while_completing_leaves_nothing(models, tmp_path):
    """complete() runs after solve() returned (the pipeline may have moved on to the next
    checkpoint): a failure there must still remove the staging folder, lock and temporaries."""
    from rece_tool import manifest as manifest_mod
    from rece_tool.errors import CheckpointError
    from rece_tool.sanitize import Options, _CheckpointRun

    src = tmp_path / "model.safetensors"
    shutil.copyfile(models("fp16"), src)
    manifest, out = workspace(tmp_path, src)
    m = manifest_mod.load(manifest)
    run = _CheckpointRun(m, m.checkpoints[0], Options(device="cpu", quiet=True))
    run.solve()
    with open(src, "ab") as f:  # the source changes before its copy is finished
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="changed while being read"):
        run.complete()
    assert entries(out) == []
