"""EditedCopy: the background-copied, in-place-edited safetensors writer, checked against the
bytes of the source, hashlib and the reference safetensors reader."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rece_tool.checkpoint import edited_copy
from rece_tool.checkpoint.edited_copy import EditedCopy
from rece_tool.checkpoint.safetensors_format import read_header, tensor_bytes
from rece_tool.errors import CheckpointError, WriteFailure


@pytest.fixture
def source(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"block.{i}.weight": torch.randn(64 + i, 48, generator=g).to(torch.float16) for i in range(12)}
    tensors["block.3.bias"] = torch.randn(7, generator=g)  # a different dtype in between
    path = tmp_path / "src.safetensors"
    save_file(tensors, str(path), metadata={"kept": "yes"})
    return path, tensors


EDITED = ["block.2.weight", "block.7.weight"]


def edited_values(tensors):
    return {name: (tensors[name].float() * -2 + 1).to(torch.float16) for name in EDITED}


def meta(result=None, summary="short"):
    out = {"kept": "yes", "summary": summary}
    if result is not None:
        out.update(source=result.source_sha256, data=result.data_sha256)
    else:
        out.update(source="0x" + "0" * 64, data="0x" + "0" * 64)
    return out


def write(path, tensors, out, summary="short", **kwargs):
    header = read_header(path)
    new = edited_values(tensors)
    with EditedCopy(header, EDITED, out, meta(), **kwargs) as copy:
        for name in reversed(EDITED):  # any order
            copy.put(name, tensor_bytes(new[name]))
        result = copy.finish(lambda r: meta(r, summary))
    return result, new


def check_output(src, tensors, out, result, new):
    # every tensor as the reference reader sees it: edited ones new, all others unchanged
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            expect = new.get(name, t)
            assert torch.equal(f.get_tensor(name), expect), name
        assert f.metadata()["kept"] == "yes"
        assert f.metadata()["source"] == result.source_sha256
        assert f.metadata()["data"] == result.data_sha256
    raw = out.read_bytes()
    header = read_header(out)
    assert result.bytes_written == len(raw)
    assert result.file_sha256 == "0x" + hashlib.sha256(raw).hexdigest()
    assert result.data_sha256 == "0x" + hashlib.sha256(raw[header.data_start:]).hexdigest()
    assert result.source_sha256 == "0x" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert header.data_start % 8 == 0
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left


def test_edited_copy_bytes_and_hashes(source, tmp_path):
    src, tensors = source
    before = src.read_bytes()
    out = tmp_path / "o" / "out.safetensors"
    out.parent.mkdir()
    result, new = write(src, tensors, out)
    check_output(src, tensors, out, result, new)
    assert src.read_bytes() == before
    # the reserved header is padded with spaces, which the format allows
    raw_header = read_header(out).raw
    assert raw_header.endswith(b" " * (edited_copy.HEADER_SLACK // 2))


def test_header_outgrowing_its_reservation_is_rewritten(source, tmp_path):
    src, tensors = source
    out = tmp_path / "o" / "out.safetensors"
    out.parent.mkdir()
    result, new = write(src, tensors, out, summary="x" * 5000, slack=0)
    check_output(src, tensors, out, result, new)
    assert read_header(out).metadata["summary"] == "x" * 5000


def test_user_space_copy_when_the_kernel_refuses(source, tmp_path, monkeypatch):
    src, tensors = source

    def refuse(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = tmp_path / "o" / "out.safetensors"
    out.parent.mkdir()
    result, new = write(src, tensors, out)
    check_output(src, tensors, out, result, new)


def test_failure_mid_way_leaves_nothing(source, tmp_path):
    src, tensors = source
    folder = tmp_path / "o"
    folder.mkdir()
    header = read_header(src)
    with pytest.raises(KeyboardInterrupt):
        with EditedCopy(header, EDITED, folder / "out.safetensors", meta()) as copy:
            copy.put(EDITED[0], tensor_bytes(edited_values(tensors)[EDITED[0]]))
            raise KeyboardInterrupt
    assert list(folder.iterdir()) == []


def test_finish_refuses_a_missing_or_wrong_tensor(source, tmp_path):
    src, tensors = source
    header = read_header(src)
    new = edited_values(tensors)
    folder = tmp_path / "o"
    folder.mkdir()
    with EditedCopy(header, EDITED, folder / "out.safetensors", meta()) as copy:
        with pytest.raises(ValueError, match="expected"):
            copy.put(EDITED[0], b"short")
        with pytest.raises(ValueError, match="not an edited tensor"):
            copy.put("block.0.weight", tensor_bytes(tensors["block.0.weight"]))
        copy.put(EDITED[0], tensor_bytes(new[EDITED[0]]))
        with pytest.raises(ValueError, match="never put"):
            copy.finish(meta)
    assert list(folder.iterdir()) == []


def test_source_changed_while_copying_is_refused(source, tmp_path):
    src, tensors = source
    header = read_header(src)
    new = edited_values(tensors)
    folder = tmp_path / "o"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="changed while being read"):
        with EditedCopy(header, EDITED, folder / "out.safetensors", meta()) as copy:
            for name in EDITED:
                copy.put(name, tensor_bytes(new[name]))
            with open(src, "ab") as f:  # the source grows under us
                f.write(b"\0" * 8)
            copy.finish(meta)
    assert list(folder.iterdir()) == []


def test_unwritable_destination_is_a_write_failure(source, tmp_path):
    src, _ = source
    with pytest.raises(WriteFailure):
        with EditedCopy(read_header(src), EDITED, tmp_path / "missing" / "out.safetensors", meta()):
            pass


def test_whole_file_hash_only_when_asked(source, tmp_path):
    src, tensors = source
    header = read_header(src)
    new = edited_values(tensors)
    out = tmp_path / "out.safetensors"
    with EditedCopy(header, EDITED, out, meta()) as copy:
        for name in EDITED:
            copy.put(name, tensor_bytes(new[name]))
        result = copy.finish(meta, hash_file=False)
    assert result.file_sha256 == ""
    raw = out.read_bytes()
    assert result.data_sha256 == "0x" + hashlib.sha256(raw[read_header(out).data_start:]).hexdigest()
