"""A copy of a safetensors file with some tensors' bytes replaced, written while the edit is solved.

Writing 2 GB is the slow part of a run and needs nothing from the math but the few K/V tensors,
so `EditedCopy` starts the moment a checkpoint is opened: the kernel copies every untouched
byte range into place (`copy_file_range`, no trip through user space) while worker threads
hash the source (provenance) and, in order, the output's data region (ModelSpec's
`hash_sha256`). The caller solves the edit meanwhile and hands over the new K/V bytes with
`put`; `finish` writes the final header, hashes the whole file for the signature and moves it
into place.

The header's size must be fixed before its content is known (the audit summary and the hashes
come last), so it is reserved up front: the placeholder metadata plus `HEADER_SLACK` bytes,
filled out with spaces, which the format allows. A final header that still does not fit
costs one more copy of the data region, never a wrong file.

Nothing half-written survives: the file is built as a hidden temporary beside `out_path`,
fsynced and renamed; any failure or interrupt stops the workers and removes it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping

from ..errors import CheckpointError, WriteFailure
from .safetensors_format import READ_CHUNK, Header, serialize_header

HEADER_SLACK = 4096
COPY_CHUNK = 64 * 1024 * 1024  # per copy_file_range call: cancellable within ~0.1 s
# copy_file_range refused by this kernel or filesystem pair: copy through user space instead.
# (EPERM: seccomp profiles of some container runtimes.)
NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


@dataclass
class StreamResult:
    source_sha256: str  # of the whole source file
    data_sha256: str    # of the output's data region (ModelSpec's "hash of the tensor data")
    bytes_written: int
    file_sha256: str = ""  # of the whole output file, as a signature records it ("": not asked for)


class _Cancelled(Exception):
    pass


class EditedCopy:
    """Use as a context manager: workers start on entry; leaving without `finish` (an error,
    an interrupt) cancels them and removes the temporary file."""

    def __init__(self, header: Header, edited: Collection[str], out_path: Path,
                 placeholder: Mapping[str, str], progress: Callable[[int], None] | None = None,
                 slack: int = HEADER_SLACK):
        self.header = header
        self.out_path = Path(out_path)
        self._edited = frozenset(edited)
        unknown = self._edited - header.tensors.keys()
        if unknown:
            raise ValueError(f"not tensors of {header.path}: {sorted(unknown)}")
        self._reserved = len(serialize_header(header, placeholder)) + slack
        self._reserved += -self._reserved % 8
        self._data_size = header.file_size - header.data_start
        self._runs = _untouched_runs(header, self._edited)  # what the copy and the data hash read
        self._progress = progress
        self._tmp = self.out_path.with_name(f".{self.out_path.name}.{os.getpid()}.tmp")
        self._pending: dict[str, bytes] = {}
        self._put: set[str] = set()
        self._ready = threading.Condition()
        self._cancel = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._src = self._dst = -1
        self._source_hash = hashlib.sha256()
        self._data_hash = hashlib.sha256()
        self._finished = False

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> "EditedCopy":
        with self._removed_on_failure():
            try:
                self._src = os.open(self.header.path, os.O_RDONLY)
                self._snapshot = _identity(os.fstat(self._src))
                prefix = os.pread(self._src, self.header.data_start, 0)
            except OSError as exc:
                raise CheckpointError(f"cannot read: {exc.strerror or exc}", path=self.header.path) from None
            if prefix != self.header.raw:
                raise CheckpointError("changed while being read", path=self.header.path)
            self._dst = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            os.ftruncate(self._dst, self._reserved + self._data_size)
        try:
            for name, work in (("copy", self._copy), ("source-sha256", self._hash_source),
                               ("data-sha256", self._hash_data)):
                thread = threading.Thread(target=self._guarded, args=(work,), name=f"rece-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._finished:
            return
        try:
            self._stop()  # may wait for a flush in progress; a second interrupt must not skip...
        finally:
            _unlink(self._tmp)  # ...removing the file (its fds close once the workers are gone)
            if not any(t.is_alive() for t in self._threads):
                self._close(remove=True)

    def put(self, name: str, blob: bytes) -> None:
        """The new bytes of an edited tensor: written in place now, hashed in order later."""
        entry = self.header.tensors[name]
        if name not in self._edited or name in self._put:
            raise ValueError(f"{name} is not an edited tensor of {self.header.path}, or was put twice")
        if len(blob) != entry.nbytes:
            raise ValueError(f"replacement for {name} has {len(blob)} bytes, expected {entry.nbytes}")
        self._raise_worker_error()
        try:
            _pwrite_all(self._dst, blob, self._reserved + entry.begin)
        except OSError as exc:
            raise self._write_failure(exc) from exc
        with self._ready:
            self._put.add(name)
            self._pending[name] = blob
            self._ready.notify_all()
        if self._progress:
            self._progress(len(blob))

    def finish(self, metadata: Callable[[StreamResult], Mapping[str, str]],
               hash_file: bool = True) -> StreamResult:
        """Wait for the workers, write the final header (`metadata(result)`), hash the whole
        file (`hash_file`: for a signature), fsync, rename into place."""
        missing = self._edited - self._put
        if missing:
            raise ValueError(f"edited tensors never put: {sorted(missing)}")
        for thread in self._threads:
            thread.join()
        self._raise_worker_error()
        with self._removed_on_failure():
            if _identity(os.fstat(self._src)) != self._snapshot or \
                    _identity(os.stat(self.header.path)) != self._snapshot:
                raise CheckpointError("changed while being read", path=self.header.path)
            result = StreamResult("0x" + self._source_hash.hexdigest(), "0x" + self._data_hash.hexdigest(),
                                  self._reserved + self._data_size)
            final = serialize_header(self.header, metadata(result))
            if len(final) <= self._reserved:
                final = _pad(final, self._reserved)
                _pwrite_all(self._dst, final, 0)
            else:
                self._rewrite_with(final)
                result.bytes_written = len(final) + self._data_size
            if hash_file:  # what is in the file (from the page cache), while the kernel flushes it
                flushed = _Background(os.fsync, self._dst)
                try:
                    result.file_sha256 = "0x" + _hash_fd(self._dst, 0, result.bytes_written,
                                                         self._cancel).hexdigest()
                finally:
                    flushed.result()  # joined before any path below can close its fd
            else:
                os.fsync(self._dst)
            os.close(self._dst)
            self._dst = -1
            os.replace(self._tmp, self.out_path)
        self._finished = True
        self._close(remove=False)
        return result

    # --- workers --------------------------------------------------------------------------

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except _Cancelled:
            pass
        except BaseException as exc:  # handed to the caller's thread by _raise_worker_error
            self._errors.append(exc)
            self._cancel.set()
            with self._ready:
                self._ready.notify_all()

    def _copy(self) -> None:
        src_base, dst_base = self.header.data_start, self._reserved
        kernel = hasattr(os, "copy_file_range")
        for begin, end in self._runs:
            done = begin
            while done < end:
                if self._cancel.is_set():
                    raise _Cancelled
                n = min(COPY_CHUNK, end - done)
                moved = 0
                if kernel:
                    try:
                        moved = os.copy_file_range(self._src, self._dst, n, src_base + done, dst_base + done)
                    except OSError as exc:
                        if exc.errno not in NO_KERNEL_COPY:
                            raise
                        kernel = False
                if kernel and moved == 0:  # some FUSE and network filesystems: not supported
                    kernel = False
                if not kernel:
                    data = os.pread(self._src, min(n, READ_CHUNK), src_base + done)
                    _pwrite_all(self._dst, data, dst_base + done)
                    moved = len(data)
                if moved <= 0:
                    raise CheckpointError("file ended early while copying", path=self.header.path)
                done += moved
                if self._progress:
                    self._progress(moved)
        # Start the disk writing now, on this thread, while the edit is still being solved:
        # left to the kernel, the dirty pages would wait for `finish`'s fsync, idling the disk
        # until then.
        getattr(os, "fdatasync", os.fsync)(self._dst)

    def _hash_source(self) -> None:
        _hash_fd(self._src, 0, self.header.file_size, self._cancel, self._source_hash, self.header.path)

    def _hash_data(self) -> None:
        base = self.header.data_start
        buf = bytearray(READ_CHUNK)
        runs = iter(self._runs)
        run = next(runs, None)
        for entry in self.header.entries_by_offset():
            if entry.name not in self._edited:
                if run is not None and run[0] == entry.begin:  # a whole run of untouched tensors
                    _hash_fd(self._src, base + run[0], base + run[1], self._cancel,
                             self._data_hash, self.header.path, buf)
                    run = next(runs, None)
                continue
            with self._ready:
                while entry.name not in self._pending and not self._cancel.is_set():
                    self._ready.wait()
                if self._cancel.is_set():
                    raise _Cancelled
                blob = self._pending.pop(entry.name)  # hashed once, then its memory goes
            self._data_hash.update(blob)

    # --- helpers --------------------------------------------------------------------------

    @contextmanager
    def _removed_on_failure(self):
        """Any failure closes the files and removes the temporary; OS errors become WriteFailure."""
        try:
            yield
        except OSError as exc:
            self._close(remove=True)
            raise self._write_failure(exc) from exc
        except BaseException:
            self._close(remove=True)
            raise

    def _rewrite_with(self, final: bytes) -> None:
        """The final header outgrew its reservation: copy the data behind a header of its own size."""
        bigger = self._tmp.with_name(self._tmp.name + ".2")
        fd = os.open(bigger, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _pwrite_all(fd, final, 0)
            done = 0
            while done < self._data_size:
                data = os.pread(self._dst, min(READ_CHUNK, self._data_size - done), self._reserved + done)
                if not data:
                    raise CheckpointError("temporary file ended early", path=self._tmp)
                _pwrite_all(fd, data, len(final) + done)
                done += len(data)
            os.replace(bigger, self._tmp)
        except BaseException:
            os.close(fd)
            _unlink(bigger)
            raise
        os.close(self._dst)
        self._dst = fd

    def _stop(self) -> None:
        self._cancel.set()
        with self._ready:
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()

    def _raise_worker_error(self) -> None:
        if not self._errors:
            return
        exc = self._errors[0]
        if isinstance(exc, OSError):
            raise self._write_failure(exc) from exc
        raise exc

    def _write_failure(self, exc: OSError) -> WriteFailure:
        return WriteFailure(f"writing failed: {exc.strerror or exc}", path=self.out_path,
                            hint="check free space and permissions; nothing was left behind")

    def _close(self, remove: bool) -> None:
        for fd in (self._src, self._dst):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._src = self._dst = -1
        if remove:
            _unlink(self._tmp)


def _untouched_runs(header: Header, edited: frozenset[str]) -> list[tuple[int, int]]:
    """Maximal [begin, end) ranges of the data region holding no edited tensor."""
    runs: list[tuple[int, int]] = []
    for entry in header.entries_by_offset():
        if entry.name in edited or entry.nbytes == 0:
            continue
        if runs and runs[-1][1] == entry.begin:
            runs[-1] = (runs[-1][0], entry.end)
        else:
            runs.append((entry.begin, entry.end))
    return runs


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _pad(header: bytes, size: int) -> bytes:
    """The same header, its JSON right-padded with spaces to `size` bytes in all."""
    body = header[8:] + b" " * (size - len(header))
    return len(body).to_bytes(8, "little") + body


def _hash_fd(fd: int, begin: int, end: int, cancel: threading.Event, sha=None, path=None,
             buf: bytearray | None = None):
    sha = sha if sha is not None else hashlib.sha256()
    view = memoryview(buf if buf is not None else bytearray(READ_CHUNK))
    offset = begin
    while offset < end:
        if cancel.is_set():
            raise _Cancelled
        try:
            got = os.preadv(fd, [view[:min(READ_CHUNK, end - offset)]], offset)
        except OSError as exc:
            if path is None:  # our own temporary file: a write-side failure
                raise
            raise CheckpointError(f"cannot read: {exc.strerror or exc}", path=path) from None
        if got <= 0:
            raise CheckpointError("file ended early while hashing", path=path)
        sha.update(view[:got])  # hashlib releases the GIL on large buffers
        offset += got
    return sha


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _Background:
    """One call on a thread of its own; `result()` joins it and re-raises its error."""

    def __init__(self, fn, *args):
        self._error: BaseException | None = None

        def run():
            try:
                fn(*args)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
