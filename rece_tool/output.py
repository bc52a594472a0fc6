"""The output folder: staged, locked, promoted atomically.

Everything for one checkpoint is written into a hidden staging folder beside its final place,
then renamed into place in one step. A lock file keeps two runs from writing the same output;
an interrupted run leaves only its staging folder, which is removed on the way out (and by the
next run, if the process was killed outright).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError, WriteFailure

STAGING_PREFIX = ".rece-staging-"
LOCK_SUFFIX = ".lock"


def _check_dir(out_dir: Path) -> Path:
    if out_dir.is_symlink():
        raise OutputError("is a symbolic link; refusing to write through it", path=out_dir,
                          field="output.dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=out_dir,
                          field="output.dir") from None
    if not out_dir.is_dir():
        raise OutputError("is not a folder", path=out_dir, field="output.dir")
    return out_dir.resolve()


def final_path(out_dir: Path, name: str) -> Path:
    target = out_dir / name
    if target.resolve().parent != out_dir.resolve() or target.is_symlink():
        raise OutputError("resolves outside the output folder", path=target, field="checkpoint.name")
    return target


@contextmanager
def staged_output(out_dir: Path, name: str, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh staging folder; on normal exit it replaces `<out_dir>/<name>` atomically."""
    out_dir = _check_dir(out_dir)
    target = final_path(out_dir, name)
    lock_path = out_dir / f".{name}{LOCK_SUFFIX}"
    lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError("another rece-tool run is writing this output right now",
                                  path=target, hint="wait for it to finish, or use another output.dir") from None
            raise
        # Staging folders of runs that were killed outright (SIGKILL) are ours to clear.
        for stale in out_dir.glob(f"{STAGING_PREFIX}{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists() and not overwrite:
            raise OutputError("already exists", path=target, hint="pass --overwrite to replace it")
        staging = out_dir / f"{STAGING_PREFIX}{name}-{os.getpid()}"
        staging.mkdir()
        try:
            yield staging
            _promote(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(lock_fd)
        try:
            lock_path.unlink()
        except FileNotFoundError:
            pass


def _promote(staging: Path, target: Path) -> None:
    old = target.with_name(f"{STAGING_PREFIX}{target.name}-{os.getpid()}-old")
    try:
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    except OSError as exc:
        raise WriteFailure(f"cannot move the finished output into place: {exc.strerror}", path=target) from exc
    finally:
        shutil.rmtree(old, ignore_errors=True)


def copy_file(src: Path, dst: Path) -> None:
    """Copy bytes (the kernel's copy path where it has one), never following a link out."""
    if src.is_symlink():
        raise OutputError("is a symbolic link inside the checkpoint folder; refusing to follow it", path=src)
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise WriteFailure(f"copying failed: {exc.strerror}", path=dst,
                           hint="check free space and permissions; nothing was left behind") from exc
