"""The safetensors format, read with every bound checked and written by streaming.

The format (https://github.com/huggingface/safetensors):

    [8 bytes]  N, little-endian u64: the header length
    [N bytes]  UTF-8 JSON object: {"__metadata__": {str: str}?,
                                   name: {"dtype": D, "shape": [int...], "data_offsets": [b, e]}...}
               (may be right-padded with spaces)
    [rest]     the data region; offsets are relative to its first byte

What we enforce before trusting a byte of it:
- 8 ≤ N + 8 ≤ file size, and N ≤ MAX_HEADER_BYTES (a hostile length cannot make us allocate);
- the header is a JSON object, no duplicate names, nesting no deeper than the format needs;
- `__metadata__` maps strings to strings;
- every tensor has a known dtype, a shape of non-negative ints, `e - b == numel · itemsize`;
- the tensors, sorted by offset, are contiguous and cover the data region exactly
  (no overlap, no gap, no trailing bytes).

The rest of the code never parses these bytes itself: it asks for a `Header`, reads tensors
with `read_tensor`; `edited_copy.EditedCopy` writes edited copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own cap
MAX_TENSORS = 1_000_000
MAX_JSON_DEPTH = 4  # {name: {"shape": [..], "data_offsets": [..]}} is depth 3
READ_CHUNK = 16 * 1024 * 1024  # streaming reads and hashes

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_DTYPE = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Header:
    path: Path
    header_len: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]  # in header order
    file_size: int
    raw: bytes = field(repr=False, default=b"")  # the 8 length bytes + the JSON, as on disk

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def entries_by_offset(self) -> list[TensorEntry]:
        return sorted(self.tensors.values(), key=lambda e: (e.begin, e.end))


def _fail(path: Path, message: str, key: str | None = None) -> CheckpointError:
    return CheckpointError(message, path=path, field=key,
                           hint="the file is not a valid safetensors checkpoint")


def _depth(value) -> int:
    """Nesting depth of parsed JSON (containers only), without recursion: a hostile header
    nested hundreds deep must not exhaust the interpreter's stack."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _is_utf8(text: str) -> bool:
    """JSON escapes can smuggle lone surrogates (`"\\ud800"`) that no UTF-8 file may hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_duplicates(pairs):
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_header(path: Path, prefix: bytes, file_size: int) -> Header:
    """Validate `prefix` (the file's first 8 + N bytes) against the format and `file_size`."""
    if file_size < 8 or len(prefix) < 8:
        raise _fail(path, f"file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise _fail(path, f"header length {n} runs past the end of the {file_size}-byte file")
    if n < 2 or len(prefix) < 8 + n:
        raise _fail(path, f"header length {n} is too short")
    raw_json = prefix[8:8 + n]
    if raw_json[:1] != b"{":
        raise _fail(path, "header does not start with a JSON object")
    try:
        text = raw_json.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "header is not a JSON object")
    if _depth(doc) > MAX_JSON_DEPTH:
        raise _fail(path, "header nests deeper than the format allows")
    if len(doc) > MAX_TENSORS:
        raise _fail(path, f"header lists more than {MAX_TENSORS} tensors")

    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise _fail(path, "metadata must be a JSON object of strings", "__metadata__")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _fail(path, f"metadata value of {key!r} is {type(value).__name__}, must be a string",
                        "__metadata__")
        if not (_is_utf8(key) and _is_utf8(value)):
            raise _fail(path, f"metadata entry {key!r} is not valid Unicode (lone surrogate escape)",
                        "__metadata__")

    data_size = file_size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        if not _is_utf8(name):
            raise _fail(path, f"tensor name {name!r} is not valid Unicode (lone surrogate escape)")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, "entry must have exactly dtype, shape and data_offsets", name)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _fail(path, f"unknown dtype {dtype!r}", name)
        if not isinstance(shape, list) or not all(
                type(s) is int and 0 <= s < 2**40 for s in shape) or len(shape) > 8:
            raise _fail(path, f"shape {shape!r} is not a list of non-negative ints", name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise _fail(path, "data_offsets must be two ints", name)
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise _fail(path, f"data_offsets {offsets} fall outside the {data_size}-byte data region", name)
        entry = TensorEntry(name, dtype, tuple(shape), begin, end)
        if entry.numel * DTYPES[dtype][1] != entry.nbytes:
            raise _fail(path, f"data_offsets span {entry.nbytes} bytes but dtype × shape needs "
                              f"{entry.numel * DTYPES[dtype][1]}", name)
        tensors[name] = entry

    cursor = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != cursor:
            what = "overlaps the previous tensor" if entry.begin < cursor else "leaves a gap before it"
            raise _fail(path, f"data_offsets {[entry.begin, entry.end]} {what}", entry.name)
        cursor = entry.end
    if cursor != data_size:
        raise _fail(path, f"tensors cover {cursor} of the {data_size} data bytes")
    return Header(path, n, metadata, tensors, file_size, bytes(prefix[:8 + n]))


def read_header(path: str | Path) -> Header:
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait forever for a writer; anything but a
        # regular file (FIFO, device, socket) is refused before a byte is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise CheckpointError("is a folder, not a .safetensors file", path=path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", path=path) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise CheckpointError("is a folder, not a .safetensors file", path=path)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CheckpointError("is not a regular file (a FIFO, socket or device?)", path=path)
        with open(fd, "rb", closefd=True) as f:
            size = st.st_size
            first = f.read(8)
            if len(first) == 8:
                (n,) = struct.unpack("<Q", first)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    first += f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", path=path) from None
    return parse_header(path, first, size)


def read_tensor(header: Header, name: str) -> torch.Tensor:
    """One tensor, read with pread into memory of its own (no mmap kept alive)."""
    entry = header.tensors[name]
    torch_dtype, _ = DTYPES[entry.dtype]
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)  # uninitialised: every byte is read into it
    with open(header.path, "rb") as f:
        view = memoryview(buf.numpy())
        offset, done = header.data_start + entry.begin, 0
        while done < entry.nbytes:
            got = os.preadv(f.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError("file ended while reading a tensor", path=header.path, field=name)
            done += got
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=torch_dtype)
    return buf.view(torch_dtype).reshape(entry.shape)


def read_tensors(header: Header, names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {name: read_tensor(header, name) for name in names}


def file_sha256(path: Path, start: int = 0) -> str:
    """"0x" + sha256 of a file's bytes from `start` on (0: the whole file), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return "0x" + h.hexdigest()


def header_sha256(path: Path) -> str:
    """"0x" + sha256 of a file's 8 length bytes and JSON header, as audit logs record it."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > MAX_HEADER_BYTES:
            raise _fail(Path(path), f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        f.seek(0)
        return "0x" + hashlib.sha256(f.read(8 + n)).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian raw bytes of a contiguous CPU tensor (bf16 included)."""
    t = tensor.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def serialize_header(header: Header, metadata: Mapping[str, str]) -> bytes:
    """The 8 length bytes + JSON header for the same tensors with new metadata, space-padded to 8."""
    doc: dict = {"__metadata__": dict(metadata)} if metadata else {}
    for e in header.tensors.values():
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
