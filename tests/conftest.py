"""Shared fixtures: tiny random SD1.x checkpoints in the real on-disk layouts, built once."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"          # any hub access in a test is a bug: make it fail
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rece_tool import tiny

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny tensor ops (the oracle's row loops, tiny renders): a second
    thread costs more than it saves, and on a busy machine OpenMP's barriers make every op wait
    for a descheduled thread (10-50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Built lazily, once per session: `models("fp32")`, `models("fp16", ema=True)`, ..."""
    root = tmp_path_factory.mktemp("models")
    cache: dict = {}

    def get(dtype: str = "fp32", ema: bool = False, old_text: bool = False, seed: int = 0,
            diffusers: bool = False) -> Path:
        key = (dtype, ema, old_text, seed, diffusers)
        if key not in cache:
            name = f"sd1-{dtype}-{'ema' if ema else 'noema'}-{'old' if old_text else 'new'}-{seed}"
            if diffusers:
                cache[key] = tiny.write_sd1_diffusers(root / (name + "-diffusers"), seed=seed,
                                                      dtype=tiny.DTYPES[dtype])
            else:
                cache[key] = tiny.write_sd1_single_file(root / f"{name}.safetensors", seed=seed,
                                                        dtype=tiny.DTYPES[dtype], ema=ema,
                                                        old_text_layout=old_text)
        return cache[key]

    return get


def write_manifest(folder: Path, checkpoints: list[tuple[str, Path]], body: str,
                   output: str = "out") -> Path:
    lines = ["version = 1", "[output]", f'dir = "{output}"']
    for name, path in checkpoints:
        lines += ["[[checkpoint]]", f'name = "{name}"', f'path = "{path}"']
    path = folder / "manifest.toml"
    path.write_text("\n".join(lines) + "\n" + body)
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console entry point, in a subprocess: exit codes and stderr as a user sees them."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "rece_tool._cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts with the same keys, shapes and (unless on the meta device) values."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        if a[k].device.type != "meta":
            assert torch.equal(a[k], b[k]), k


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(p.read_bytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()
