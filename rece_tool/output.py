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
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError, ReceError, WriteFailure

STAGING_PREFIX = ".rece-staging-"
LOCK_SUFFIX = ".lock"


def _refuse_unusable_dir(out_dir: Path) -> None:
    if out_dir.is_symlink():
        raise OutputError("is a symbolic link; refusing to write through it", path=out_dir,
                          field="output.dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("is not a folder", path=out_dir, field="output.dir",
                          hint="point output.dir at a folder (it is created if missing)")


def check_destination(out_dir: Path, name: str, overwrite: bool) -> None:
    """The cheap refusals of `staged_output`, without creating anything: for callers to run
    before the expensive work, so a run that cannot write fails in seconds, not after it.
    (`staged_output` checks again, under the lock.)"""
    _refuse_unusable_dir(out_dir)
    if out_dir.is_dir():
        target = final_path(out_dir, name)
        if target.exists() and not overwrite:
            raise OutputError("already exists", path=target, hint="pass --overwrite to replace it")


def _check_dir(out_dir: Path) -> tuple[Path, list[Path]]:
    """The output folder, created if missing, and the folders this call created (outermost first)."""
    _refuse_unusable_dir(out_dir)
    created = []
    try:
        # One level at a time, so that only folders this call made count as its own: a
        # concurrent shard creating the same folder must not see it removed under it.
        for folder in reversed([out_dir, *out_dir.parents]):
            try:
                folder.mkdir()
                created.append(folder)
            except FileExistsError:
                pass
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=out_dir,
                          field="output.dir") from None
    if not out_dir.is_dir():
        raise OutputError("is not a folder", path=out_dir, field="output.dir")
    return out_dir.resolve(), created


def _remove_if_empty(folders: list[Path]) -> None:
    """Folders a failed run created, innermost first, as long as nothing else was put in them."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def final_path(out_dir: Path, name: str) -> Path:
    target = out_dir / name
    if target.resolve().parent != out_dir.resolve() or target.is_symlink():
        raise OutputError("resolves outside the output folder", path=target, field="checkpoint.name")
    return target


def _staging_pattern(name: str) -> re.Pattern:
    """This checkpoint's staging folders (`-PID`) and set-aside old outputs (`-PID-old`) only:
    a plain glob on `name-*` would also match a concurrent run's `name-x` staging folder."""
    return re.compile(re.escape(f"{STAGING_PREFIX}{name}-") + r"\d+(-old)?")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _lock(out_dir: Path, name: str, target: Path) -> tuple[int, Path]:
    """An exclusive flock on `<out_dir>/.<name>.lock`, or OutputError if another run holds it.

    The holder unlinks the lock file *before* releasing it, so a run that opened the file
    just before that and then wins the flock holds an orphan: it checks that the path still
    names the inode it locked and otherwise tries again with the current file.
    """
    lock_path = out_dir / f".{name}{LOCK_SUFFIX}"
    for _ in range(50):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file: {exc.strerror or exc}", path=lock_path,
                              field="output.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError("another rece-tool run is writing this output right now",
                                  path=target, hint="wait for it to finish, or use another output.dir") from None
            raise OutputError(f"cannot lock: {exc.strerror or exc}", path=lock_path,
                              field="output.dir") from None
        try:
            on_disk = os.stat(lock_path, follow_symlinks=False)
            mine = os.fstat(fd)
            if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
                return fd, lock_path
        except FileNotFoundError:
            pass
        os.close(fd)  # an orphan left by the previous holder: take the current file instead
    raise OutputError("cannot take the output lock: it keeps changing under us", path=lock_path,
                      field="output.dir", hint="is another rece-tool run looping on this output?")


def _unlock(fd: int, lock_path: Path) -> None:
    try:
        lock_path.unlink()  # while still holding the lock: see _lock
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextmanager
def staged_output(out_dir: Path, name: str, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh staging folder; on normal exit it replaces `<out_dir>/<name>` atomically."""
    out_dir, created = _check_dir(out_dir)
    target = final_path(out_dir, name)
    lock_fd, lock_path = _lock(out_dir, name, target)
    promoted = False
    try:
        # Staging folders of runs that were killed outright (SIGKILL) are ours to clear; an
        # old output set aside by a run killed mid-promotion is put back, never deleted.
        pattern = _staging_pattern(name)
        for stale in sorted(out_dir.iterdir()):
            if not pattern.fullmatch(stale.name):
                continue
            if stale.name.endswith("-old") and not (target.exists() or target.is_symlink()):
                try:
                    os.replace(stale, target)
                except OSError as exc:
                    raise WriteFailure(f"cannot restore the previous output: {exc.strerror or exc}",
                                       path=stale) from None
            else:
                _remove(stale)
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise OutputError("already exists", path=target, hint="pass --overwrite to replace it")
        staging = out_dir / f"{STAGING_PREFIX}{name}-{os.getpid()}"
        try:
            staging.mkdir()
        except OSError as exc:
            raise WriteFailure(f"cannot create the staging folder: {exc.strerror or exc}",
                               path=staging) from None
        try:
            try:
                yield staging
            except ReceError as exc:
                # Name the file the user will look for, not the hidden staging folder that is
                # removed on the way out.
                if exc.path is not None and Path(exc.path).is_relative_to(staging):
                    exc.path = str(target / Path(exc.path).relative_to(staging))
                raise
            _promote(staging, target)
            promoted = True
        finally:
            _remove(staging)
    finally:
        _unlock(lock_fd, lock_path)
        if not promoted:
            _remove_if_empty(created)


def _promote(staging: Path, target: Path) -> None:
    """Move `staging` to `target`; an existing `target` is set aside first and put back if the
    move fails or is interrupted, so the previous output is never lost."""
    old = target.with_name(f"{STAGING_PREFIX}{target.name}-{os.getpid()}-old")
    moved = False
    try:
        if target.exists() or target.is_symlink():
            os.replace(target, old)
            moved = True
        os.replace(staging, target)
    except BaseException as exc:
        if moved and not (target.exists() or target.is_symlink()):
            try:
                os.replace(old, target)
                moved = False
            except OSError:
                pass  # left as `-old`: the next run puts it back (see staged_output)
        if isinstance(exc, OSError):
            raise WriteFailure(f"cannot move the finished output into place: {exc.strerror or exc}",
                               path=target) from exc
        raise
    if moved:
        _remove(old)


def copy_file(src: Path, dst: Path) -> None:
    """Copy bytes (the kernel's copy path where it has one), never following a link out."""
    if src.is_symlink():
        raise OutputError("is a symbolic link inside the checkpoint folder; refusing to follow it", path=src)
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise WriteFailure(f"copying failed: {exc.strerror}", path=dst,
                           hint="check free space and permissions; nothing was left behind") from exc
