"""`--shard I/N`: a deterministic partition of a manifest's checkpoints, no coordinator needed.

Checkpoint k (in manifest order, counting from 0) belongs to shard k mod N, so N workers
started with I = 0..N-1 cover every checkpoint exactly once. `--shard auto` reads the index
that the scheduler gives each worker:

| scheduler                 | index                                          | count                          |
|---------------------------|------------------------------------------------|--------------------------------|
| Kubernetes Indexed Job    | JOB_COMPLETION_INDEX                           | RECE_SHARD_COUNT (= completions) |
| Slurm job array           | SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN     | SLURM_ARRAY_TASK_COUNT         |

`auto/N` takes the index from the environment and N from the flag.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence, TypeVar

from .errors import BadInput

T = TypeVar("T")
SHARD_COUNT_ENV = "RECE_SHARD_COUNT"
_EXPLICIT = re.compile(r"^(\d+)/(\d+)$")
_AUTO = re.compile(r"^auto(?:/(\d+))?$")


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise BadInput(f"{name}={value!r} is not a non-negative integer", field="--shard")
    return int(value)


def parse_shard(text: str, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """`I/N`, `auto` or `auto/N` → (index, count), validated."""
    env = os.environ if env is None else env
    if m := _EXPLICIT.match(text):
        index, count = int(m.group(1)), int(m.group(2))
    elif m := _AUTO.match(text):
        count = int(m.group(1)) if m.group(1) else None
        index = _int_env(env, "JOB_COMPLETION_INDEX")
        if index is not None:
            count = count or _int_env(env, SHARD_COUNT_ENV)
        else:
            task = _int_env(env, "SLURM_ARRAY_TASK_ID")
            if task is None:
                raise BadInput("--shard auto found neither JOB_COMPLETION_INDEX (Kubernetes Indexed "
                               "Job) nor SLURM_ARRAY_TASK_ID (Slurm array)", field="--shard",
                               hint="pass --shard I/N explicitly")
            index = task - (_int_env(env, "SLURM_ARRAY_TASK_MIN") or 0)
            count = count or _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise BadInput("--shard auto cannot tell how many shards there are", field="--shard",
                           hint=f"set {SHARD_COUNT_ENV} to the Job's completions, or pass --shard auto/N")
    else:
        raise BadInput(f"{text!r} is not I/N, auto or auto/N", field="--shard")
    if count < 1 or not 0 <= index < count:
        raise BadInput(f"shard {index}/{count}: need 0 ≤ I < N", field="--shard")
    return index, count


def select(items: Sequence[T], index: int, count: int) -> list[T]:
    return [item for k, item in enumerate(items) if k % count == index]
