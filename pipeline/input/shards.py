"""Shards: which rows one of N processes or machines labels, chosen by a stable hash of the row id.

The hash depends on the id alone, never on the row's position, so appending rows to the input or
reordering it never moves a row from one shard to another: a shard that resumes finds its done rows
where it left them. `--shard auto` takes the shard from the scheduler that started the process
(a Kubernetes Indexed Job or a Slurm array job).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import blake2b
from typing import Final

from pipeline.errors import UsageError

# A key of its own: the done-id sets use the unkeyed BLAKE2b of the id for their hash slots, and a shard
# chosen from those same bits would crowd each shard's ids into a fraction of the slots.
_KEY: Final = b"labelstream-shard"
_SPEC: Final = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_AUTO: Final = re.compile(r"^\s*auto\s*(?:/\s*(\d+)\s*)?$", re.IGNORECASE)
SHARDS_ENV: Final = "LABELSTREAM_SHARDS"


def shard_of(row_id: str, count: int) -> int:
    """The shard (0 … count-1) that labels `row_id`: the same on every machine, for every input order."""
    digest = blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8, key=_KEY).digest()
    return int.from_bytes(digest, "little") % count


def key_shard(key: int, count: int) -> int:
    """The shard of a 64-bit text key. Hashed again (not `key % count`): the dedupe sets hold these keys as
    Python ints, whose hash slots are their low bits, and a shard's keys all alike there would crowd them."""
    digest = blake2b(key.to_bytes(8, "little"), digest_size=8, key=_KEY).digest()
    return int.from_bytes(digest, "little") % count


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count` (0-based: `--shard 0/4` … `--shard 3/4`)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(
                f"--shard {self.index}/{self.count}: the shard index counts from 0, so it must be 0 to "
                f"{max(0, self.count - 1)} (e.g. --shard 0/{max(1, self.count)})."
            )

    def holds(self, row_id: str) -> bool:
        """Whether this shard labels `row_id`."""
        return self.count == 1 or shard_of(row_id, self.count) == self.index

    def holds_key(self, key: int) -> bool:
        """Whether this shard labels the rows of a 64-bit text key (sharding by text, run/sharding.py)."""
        return self.count == 1 or key_shard(key, self.count) == self.index

    @property
    def label(self) -> str:
        """`3/8`, as the flag takes it."""
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """`shard-3-of-8` (the index padded to the width of the count, so names sort in shard order)."""
        width = len(str(self.count - 1))
        return f"shard-{self.index:0{width}d}-of-{self.count}"

    @property
    def part_tag(self) -> str:
        """`s03of08`: the shard as Parquet part names carry it."""
        width = max(2, len(str(self.count)))
        return f"s{self.index:0{width}d}of{self.count:0{width}d}"


def parse_shard(text: str, env: Mapping[str, str] | None = None) -> Shard:
    """`i/N`, or `auto` / `auto/N`: the index from `JOB_COMPLETION_INDEX` (Kubernetes Indexed Job) or
    `SLURM_ARRAY_TASK_ID` (a Slurm array of 0 … N-1), the count from `/N`, `$LABELSTREAM_SHARDS`, or (Slurm)
    `SLURM_ARRAY_TASK_COUNT`."""
    if match := _SPEC.match(text):
        return Shard(int(match.group(1)), int(match.group(2)))
    if match := _AUTO.match(text):
        return _from_scheduler(os.environ if env is None else env, int(match.group(1)) if match.group(1) else None)
    raise UsageError(f"--shard {text!r}: use i/N (e.g. --shard 0/4, counting from 0) or auto.")


def _from_scheduler(env: Mapping[str, str], count: int | None) -> Shard:
    def number(name: str) -> int | None:
        value = env.get(name, "").strip()
        if not value:
            return None
        if not value.isdigit():
            raise UsageError(f"--shard auto: ${name} is {value!r}, not a whole number.")
        return int(value)

    if (index := number("JOB_COMPLETION_INDEX")) is not None:
        count = count or number(SHARDS_ENV)
        if count is None:
            raise UsageError(
                f"--shard auto found JOB_COMPLETION_INDEX={index} but not the number of shards: set "
                f"{SHARDS_ENV} to the Job's completions (or pass --shard auto/N)."
            )
        return Shard(index, count)
    if (task := number("SLURM_ARRAY_TASK_ID")) is not None:
        # The task id is the shard (--array=0-(N-1)), so `sbatch --array=3` re-runs shard 3 alone.
        count = count or number(SHARDS_ENV) or number("SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise UsageError(
                f"--shard auto found SLURM_ARRAY_TASK_ID={task} but not the number of shards: set {SHARDS_ENV} "
                "(or pass --shard auto/N)."
            )
        return Shard(task, count)
    raise UsageError(
        "--shard auto reads the shard from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) or "
        "SLURM_ARRAY_TASK_ID (a Slurm array job); neither is set. Pass --shard i/N instead."
    )
