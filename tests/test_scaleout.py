"""Sharding across workers and skip-if-done reruns."""

from __future__ import annotations

import shutil

import pytest

from conftest import run_cli, write_manifest
from rece_tool.errors import BadInput
from rece_tool.shard import parse_shard, select

NAMES = [f"model-{k}" for k in range(11)]


@pytest.mark.parametrize("count", range(1, 8))
def test_shards_cover_every_checkpoint_exactly_once(count):
    picked = [name for index in range(count) for name in select(NAMES, index, count)]
    assert sorted(picked) == sorted(NAMES) and len(picked) == len(NAMES)
    assert select(NAMES, 0, count) == select(list(NAMES), 0, count)  # deterministic


@pytest.mark.parametrize("text,env,expected", [
    ("2/5", {}, (2, 5)),
    ("auto", {"JOB_COMPLETION_INDEX": "3", "RECE_SHARD_COUNT": "4"}, (3, 4)),
    ("auto/6", {"JOB_COMPLETION_INDEX": "5"}, (5, 6)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"}, (0, 1)),
])
def test_parse_shard(text, env, expected):
    assert parse_shard(text, env) == expected


@pytest.mark.parametrize("text,env,message", [
    ("5/5", {}, "0 ≤ I < N"),
    ("1/0", {}, "0 ≤ I < N"),
    ("one/two", {}, "is not I/N"),
    ("auto", {}, "neither JOB_COMPLETION_INDEX"),
    ("auto", {"JOB_COMPLETION_INDEX": "1"}, "RECE_SHARD_COUNT"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not a non-negative integer"),
])
def test_bad_shard_specs(text, env, message):
    with pytest.raises(BadInput, match=message):
        parse_shard(text, env)


NUDITY = '[[concept_set]]\nname = "nudity"\npreset = "nudity"\n'


def test_shard_flag_runs_only_its_checkpoints(models, tmp_path):
    src = models("fp32")
    manifest = write_manifest(tmp_path, [("a", src), ("b", src), ("c", src)], NUDITY)
    r = run_cli("sanitize", str(manifest), "--quiet", "--shard", "auto",
                env={"JOB_COMPLETION_INDEX": "1", "RECE_SHARD_COUNT": "2"})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]


def test_skip_if_done_only_when_inputs_and_settings_match(models, tmp_path):
    src = tmp_path / "model.safetensors"
    shutil.copyfile(models("fp32"), src)
    manifest = write_manifest(tmp_path, [("m", src.name)], NUDITY)
    out = tmp_path / "out" / "m" / "m.safetensors"
    assert run_cli("sanitize", str(manifest), "--quiet").returncode == 0
    first = out.stat().st_mtime_ns

    r = run_cli("sanitize", str(manifest), "--quiet")
    assert r.returncode == 0 and "m: skipped" in r.stderr
    assert out.stat().st_mtime_ns == first

    # Other settings: not skipped, and not silently replaced either.
    changed = write_manifest(tmp_path, [("m", src.name)], NUDITY + "epochs = 1\n")
    r = run_cli("sanitize", str(changed), "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert out.stat().st_mtime_ns == first

    # Other source bytes under the same path: not skipped.
    manifest = write_manifest(tmp_path, [("m", src.name)], NUDITY)
    shutil.copyfile(models("fp32", seed=1), src)
    r = run_cli("sanitize", str(manifest), "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr

    # --overwrite forces.
    r = run_cli("sanitize", str(manifest), "--quiet", "--overwrite")
    assert r.returncode == 0 and "skipped" not in r.stderr
    assert out.stat().st_mtime_ns != first


def test_checkpoints_sharing_a_text_encoder_share_embeddings(models, tmp_path):
    """Fine-tunes of one base (same text encoder bytes) reuse one embedder; another encoder doesn't."""
    import torch

    from rece_tool.checkpoint.layout import open_checkpoint
    from rece_tool.text import embedder_for

    base = models("fp32")
    finetune = tmp_path / "finetune.safetensors"
    shutil.copyfile(base, finetune)  # same text encoder; a fine-tune differs in the UNet only
    shared: dict = {}
    cpu = torch.device("cpu")
    first = embedder_for(open_checkpoint(base), None, cpu, shared)
    first.embed(["nudity", " "])
    again = embedder_for(open_checkpoint(finetune), None, cpu, shared)
    other = embedder_for(open_checkpoint(models("fp32", seed=1)), None, cpu, shared)
    assert again is first and other is not first and len(shared) == 2
    assert set(again._cache) == {"nudity", " "}  # already embedded: no second forward pass
    assert not torch.equal(first.embed(["nudity"])["nudity"].rows, other.embed(["nudity"])["nudity"].rows)


def test_pipelined_run_finishes_the_checkpoint_before_a_failing_one(models, tmp_path):
    """Checkpoint k+1 is solved while k is still being written: a failure in k+1 must still
    leave k complete and correct, and leave nothing of k+1 or of those after it."""
    import hashlib
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from rece_tool.checkpoint.safetensors_format import read_header

    good = models("fp16")
    tensors = load_file(str(good))
    key = next(k for k in tensors if k.endswith("attn2.to_k.weight"))
    tensors[key][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    manifest = write_manifest(tmp_path, [("first", good), ("second", bad), ("third", good)], NUDITY)
    r = run_cli("sanitize", str(manifest), "--quiet")
    assert r.returncode == 2 and "non-finite" in r.stderr and key in r.stderr, r.stderr
    assert "first:" in r.stderr  # its summary was printed before the failure was reported
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["first"]
    audit = json.loads((out / "first" / "audit.json").read_text())
    (entry,) = audit["output"]["files"]
    written = out / "first" / entry["path"]
    data = written.read_bytes()[read_header(written).data_start:]
    assert entry["data_sha256"] == "0x" + hashlib.sha256(data).hexdigest()
    assert not torch.equal(load_file(str(written))[key], load_file(str(good))[key])  # edited
