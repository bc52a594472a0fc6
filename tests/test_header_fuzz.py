"""Fuzzing the safetensors header reader: any bytes → a valid `Header` or a clean `CheckpointError`.

`parse_header(path, prefix, file_size)` and `read_header(path)` are the only code that reads
untrusted checkpoint bytes before anything is trusted. Whatever they are fed — raw bytes,
hostile length fields, JSON headers that are almost right — they must either return a header
whose every entry is in bounds and consistent, or raise `CheckpointError` (exit 2, one line,
naming the file). Never another exception, never a hang, never a huge allocation.

Everything accepted is also cross-checked against the reference implementation (the
`safetensors` package): rece-tool must never accept a file the reference rejects, and the
two must agree on its tensors.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rece_tool.checkpoint.safetensors_format import (DTYPES, MAX_HEADER_BYTES, Header, parse_header,
                                                     read_header, serialize_header)
from rece_tool.errors import EXIT_BAD_INPUT, CheckpointError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_TMP = tempfile.TemporaryDirectory(prefix="rece-fuzz-")
FILE = Path(_TMP.name) / "fuzz.safetensors"
DTYPE_NAMES = sorted(DTYPES)


# --- the property --------------------------------------------------------------------------------

def check_header(h: Header, file_size: int) -> None:
    """Everything a caller may rely on once a header parsed."""
    assert 2 <= h.header_len <= MAX_HEADER_BYTES
    assert h.data_start == 8 + h.header_len <= file_size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())
    data_size = file_size - h.data_start
    cursor = 0
    for e in h.entries_by_offset():
        assert e.dtype in DTYPES
        assert all(type(s) is int and s >= 0 for s in e.shape)
        assert e.nbytes == e.numel * DTYPES[e.dtype][1]
        assert e.begin == cursor and e.begin <= e.end <= data_size
        cursor = e.end
    assert cursor == data_size
    # what write_edited will write back must serialize and parse again to the same tensors
    again = serialize_header(h, h.metadata)
    (n,) = struct.unpack("<Q", again[:8])
    h2 = parse_header(h.path, again, len(again) + data_size)
    assert h2.tensors.keys() == h.tensors.keys() and h2.metadata == h.metadata
    assert all(h2.tensors[k] == h.tensors[k] for k in h.tensors)


def outcome(data: bytes, file_size: int | None = None) -> Header | None:
    """parse_header on `data` (a file's first bytes); None when it refused cleanly."""
    size = len(data) if file_size is None else file_size
    path = Path("fuzz/bad.safetensors")
    try:
        h = parse_header(path, data, size)
    except CheckpointError as exc:
        assert exc.exit_code == EXIT_BAD_INPUT
        line = exc.diagnostics()
        assert "\n" not in line and str(path) in line
        return None
    # any other exception propagates and fails the test
    check_header(h, size)
    return h


def on_disk(data: bytes) -> Header | None:
    """The same bytes through read_header (a real file), which must agree with parse_header;
    whatever we accept, the reference implementation must accept with the same tensors."""
    FILE.write_bytes(data)
    try:
        h = read_header(FILE)
    except CheckpointError as exc:
        assert exc.exit_code == EXIT_BAD_INPUT and "\n" not in exc.diagnostics()
        assert outcome(data) is None
        return None
    check_header(h, len(data))
    assert outcome(data) is not None
    reference(h, data)
    return h


def reference(h: Header, data: bytes) -> None:
    from safetensors import safe_open

    with safe_open(str(FILE), framework="pt") as f:
        assert set(f.keys()) == set(h.tensors)
        assert (f.metadata() or {}) == h.metadata
        for name, e in h.tensors.items():
            sl = f.get_slice(name)
            assert tuple(sl.get_shape()) == e.shape
            assert sl.get_dtype() == e.dtype


# --- strategies ----------------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 5), max_size=3)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)


@st.composite
def valid_files(draw):
    """A well-formed file: (doc, data region, entries in order)."""
    specs = draw(st.lists(st.tuples(names, st.sampled_from(DTYPE_NAMES), shapes),
                          max_size=6, unique_by=lambda t: t[0]))
    order = draw(st.permutations(range(len(specs))))  # data order ≠ header order
    doc: dict = {}
    if draw(st.booleans()):
        doc["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    offsets, cursor = {}, 0
    for i in order:
        name, dtype, shape = specs[i]
        numel = 1
        for s in shape:
            numel *= s
        size = numel * DTYPES[dtype][1]
        offsets[name] = [cursor, cursor + size]
        cursor += size
    for name, dtype, shape in specs:
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets[name]}
    data = draw(st.binary(min_size=cursor, max_size=cursor)) if cursor <= 256 else b"\0" * cursor
    return doc, data


def assemble(doc_or_body: dict | bytes, data: bytes, pad: int = 0) -> bytes:
    body = (doc_or_body if isinstance(doc_or_body, bytes)
            else json.dumps(doc_or_body, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    body += b" " * pad
    return struct.pack("<Q", len(body)) + body + data


MUTATIONS = ["offset", "dtype", "shape", "shape_type", "offsets_type", "drop_field", "extra_field",
             "metadata_value", "metadata_type", "data_len", "length_field", "duplicate",
             "surrogate", "truncate", "garbage_value", "trailing_json", "nest"]


@st.composite
def mutated_files(draw):
    doc, data = draw(valid_files())
    tensors = [k for k in doc if k != "__metadata__"]
    kind = draw(st.sampled_from(MUTATIONS))
    pad = draw(st.integers(0, 9))
    target = draw(st.sampled_from(tensors)) if tensors else None
    if kind == "offset" and target:
        i = draw(st.integers(0, 1))
        doc[target]["data_offsets"][i] += draw(st.integers(-9, 9).filter(bool))
    elif kind == "dtype" and target:
        doc[target]["dtype"] = draw(st.one_of(st.sampled_from(DTYPE_NAMES), st.text(max_size=6), json_values))
    elif kind == "shape" and target:
        doc[target]["shape"] = draw(st.lists(st.integers(-3, 2**64), max_size=9))
    elif kind == "shape_type" and target:
        doc[target]["shape"] = draw(json_values)
    elif kind == "offsets_type" and target:
        doc[target]["data_offsets"] = draw(st.one_of(json_values, st.lists(st.integers(-2**65, 2**65), max_size=3)))
    elif kind == "drop_field" and target:
        del doc[target][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "extra_field" and target:
        doc[target][draw(st.text(max_size=6))] = draw(json_values)
    elif kind == "metadata_value":
        doc["__metadata__"] = {**doc.get("__metadata__", {}), draw(st.text(max_size=4)): draw(json_values)}
    elif kind == "metadata_type":
        doc["__metadata__"] = draw(json_values)
    elif kind == "data_len":
        delta = draw(st.integers(-8, 8).filter(bool))
        data = data[:len(data) + delta] if delta < 0 else data + b"\0" * delta
    elif kind == "garbage_value" and target:
        doc[target] = draw(json_values)
    elif kind == "nest":
        doc[draw(names)] = {"dtype": "F32", "shape": [[[[[0]]]]], "data_offsets": [0, 0]}
    raw = assemble(doc, data, pad)
    body = raw[8:len(raw) - len(data)]
    if kind == "length_field":
        raw = struct.pack("<Q", draw(st.one_of(st.integers(0, 2**64 - 1),
                                               st.integers(max(0, len(body) - 9), len(body) + 9)))) + raw[8:]
    elif kind == "duplicate" and len(tensors) >= 2:
        a, b = json.dumps(tensors[0], ensure_ascii=False), json.dumps(tensors[1], ensure_ascii=False)
        raw = assemble(body.replace(b.encode(), a.encode(), 1), data)
    elif kind == "surrogate" and target:
        t = json.dumps(target, ensure_ascii=False).encode()
        raw = assemble(body.replace(t, t[:-1] + b'\\udc80"', 1), data)
    elif kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif kind == "trailing_json":
        raw = assemble(body.rstrip() + draw(st.sampled_from([b"{}", b"x", b"\0", b"\xff", b"]"])), data)
    return raw


# --- the tests -----------------------------------------------------------------------------------

@FUZZ
@given(valid_files(), st.integers(0, 9))
def test_valid_files_parse(file, pad):
    doc, data = file
    raw = assemble(doc, data, pad)
    h = on_disk(raw)
    assert h is not None
    assert h.metadata == doc.get("__metadata__", {})
    assert {k: (e.dtype, list(e.shape), [e.begin, e.end]) for k, e in h.tensors.items()} == {
        k: (v["dtype"], v["shape"], v["data_offsets"]) for k, v in doc.items() if k != "__metadata__"}


@FUZZ
@given(mutated_files())
def test_mutated_headers_are_refused_or_consistent(raw):
    on_disk(raw)


@FUZZ
@given(st.binary(max_size=300))
def test_raw_bytes(raw):
    on_disk(raw)


@FUZZ
@given(st.binary(max_size=120), st.binary(max_size=64), st.integers(0, 2**64 - 1) | st.none())
def test_raw_header_bodies(body, data, length):
    """A plausible frame (length field, body starting with `{`) around arbitrary bytes."""
    body = b"{" + body
    raw = struct.pack("<Q", len(body) if length is None else length) + body + data
    on_disk(raw)


@FUZZ
@given(valid_files(), st.integers(-2**63, 2**64))
def test_file_size_disagrees_with_prefix(file, file_size):
    """parse_header trusts nothing about the size it is told either."""
    raw = assemble(*file)
    assume(file_size != len(raw))
    outcome(raw, file_size)


@pytest.mark.parametrize("body", [
    b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",         # the JSON parser's own recursion
    b'{"a":' + b"[" * 900 + b"]" * 900 + b"}",           # deep enough for a recursive depth walk
    b'{"a":' + b'{"b":' * 900 + b"1" + b"}" * 900 + b"}",
    b'{"x\\ud800":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',  # lone surrogate name
    b'{"__metadata__":{"k":"\\udc80"}}',                 # lone surrogate metadata
    b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}',  # huge int literal
    b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}',
    b'{"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,0]}}',
    b'{"a":{"dtype":"BOOL","shape":[true],"data_offsets":[0,1]}}',  # bool is not an int here
    b'{"__metadata__":null}',
    b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"dtype":"F16"}}',  # duplicate inner key
])
def test_known_hostile_headers(body):
    raw = struct.pack("<Q", len(body)) + body + b"\0" * 8
    assert on_disk(raw) is None


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(fifo)
    with pytest.raises(CheckpointError, match="folder"):
        read_header(tmp_path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header("/dev/zero")
