"""Where the files of an output live, for one process or for N shards, and which of the two an output is.

    unsharded   OUT.jsonl                          OUT.parquet/part-000001-<tag>.parquet
                OUT.jsonl.meta/                    OUT.parquet.meta/
    shard i/N   OUT.shard-i-of-N.jsonl             OUT.parquet/part-sIIofNN-000001-<tag>.parquet
                OUT.jsonl.meta/shard-i-of-N/       OUT.parquet.meta/shard-i-of-N/

An output is one or the other, never both, and all its shards share one N. A run claims its place first
(the lock file, which creates its side-file folder) and only then looks for a run of the other kind, so of
two runs that start at once with different layouts at least one sees the other and refuses.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pipeline.errors import SinkMismatchError, UsageError
from pipeline.input.shards import Shard
from pipeline.sinks.meta import meta_dir_for
from pipeline.sinks.storage import ObjectStore, object_uri

PART: Final = re.compile(r"^part-(?:s(\d+)of(\d+)-)?(\d{6})-[0-9a-f]+\.parquet$")
_SHARD_NAME: Final = re.compile(r"^shard-(\d+)-of-(\d+)$")
MERGING: Final = "merging"  # marker in OUT.meta/ while `compact` turns N shards into one sink


def is_jsonl(path: Path) -> bool:
    """Whether an output path names a JSONL sink."""
    return path.suffix.lower() in {".jsonl", ".ndjson"}


def shard_file(path: Path, shard: Shard) -> Path:
    """`OUT.jsonl` → `OUT.shard-i-of-N.jsonl`: where shard i/N of a JSONL output writes."""
    return path.with_name(f"{path.stem}.{shard.name}{path.suffix}")


def part_shard(name: str) -> Shard | bool | None:
    """The shard a Parquet part name carries (None: an unsharded part; False: not a part file)."""
    match = PART.match(name)
    if match is None:
        return False
    return _shard(int(match.group(1)), int(match.group(2))) or False if match.group(1) else None


def part_number(name: str) -> int:
    """The sequence number in a part file name (0 if it is not one)."""
    match = PART.match(name)
    return int(match.group(3)) if match else 0


@dataclass(slots=True)
class Layout:
    """What is on disk for an output: the shards found (by side folder, file or part name), unsharded files."""

    shards: set[Shard] = field(default_factory=set)
    unsharded: list[str] = field(default_factory=list)  # what shows an unsharded sink, for messages
    merging: bool = False

    @property
    def counts(self) -> set[int]:
        """Every N that shards of this output were written with."""
        return {s.count for s in self.shards}

    @property
    def count(self) -> int | None:
        """N, when the output is sharded (with one N)."""
        counts = self.counts
        return next(iter(counts)) if len(counts) == 1 else None

    @property
    def sharded(self) -> bool:
        """Whether any shard of this output exists."""
        return bool(self.shards)


def discover(path: Path) -> Layout:
    """Look at what an output consists of, without changing anything."""
    if object_uri(path) is not None:
        return _discover_objects(path)
    layout = Layout()
    meta = meta_dir_for(path)
    if meta.is_dir():
        for entry in meta.iterdir():
            if (match := _SHARD_NAME.match(entry.name)) and (found := _shard(*map(int, match.groups()))):
                layout.shards.add(found)
        layout.unsharded += [f"{meta / n}" for n in ("lock", "manifest.json") if (meta / n).exists()]
        layout.merging = (meta / MERGING).exists()
    if is_jsonl(path):
        prefix, suffix = f"{path.stem}.shard-", path.suffix
        if path.parent.is_dir():
            for entry in path.parent.glob(f"{glob_escape(prefix)}*{glob_escape(suffix)}"):
                middle = entry.name[len(path.stem) + 1 : -len(suffix)]
                if (match := _SHARD_NAME.match(middle)) and (found := _shard(*map(int, match.groups()))):
                    layout.shards.add(found)
        if path.is_file():
            layout.unsharded.append(str(path))
    elif path.is_dir():
        for entry in path.iterdir():
            carried = part_shard(entry.name)
            if isinstance(carried, Shard):
                layout.shards.add(carried)
            elif carried is None:
                layout.unsharded.append(str(entry))
    return layout


def _discover_objects(path: Path) -> Layout:
    """`discover` for a Parquet dataset on object storage: shard folders under `.meta/`, shard tags of parts."""
    store = ObjectStore(str(object_uri(path)))
    layout = Layout()
    meta = meta_dir_for(path)
    for name, _, is_dir in store.entries(store.key(meta)):
        if is_dir and (match := _SHARD_NAME.match(name)) and (found := _shard(*map(int, match.groups()))):
            layout.shards.add(found)
        elif name in {"lease.json", "manifest.json"}:
            layout.unsharded.append(str(meta / name))
        layout.merging = layout.merging or name == MERGING
    for name, _, _ in store.entries(store.key(path)):
        carried = part_shard(name)
        if isinstance(carried, Shard):
            layout.shards.add(carried)
        elif carried is None:
            layout.unsharded.append(str(path / name))
    return layout


def _shard(index: int, count: int) -> Shard | None:
    """The shard a file name names, or None when the name is not a valid shard (never an error here)."""
    return Shard(index, count) if 0 <= index < count else None


def glob_escape(text: str) -> str:
    """`text` with glob wildcards made literal."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def check_layout(path: Path, shard: Shard | None, layout: Layout | None = None) -> None:
    """Refuse a run whose layout differs from the output's: a shard of another N, or sharded vs one process."""
    layout = layout or discover(path)
    if layout.merging:
        raise SinkMismatchError(
            f"{path} is being merged from shards into one sink by `labelstream compact`, which was interrupted. "
            f"Run `labelstream compact {path}` again to finish it."
        )
    if shard is None:
        if layout.sharded:
            counts = "/".join(str(n) for n in sorted(layout.counts))
            raise SinkMismatchError(
                f"{path} is split into {counts} shards; run them with --shard i/{counts} (or --procs {counts}), or "
                "use a new --output. A finished sharded Parquet dataset becomes one sink with `labelstream compact`."
            )
        return
    others = sorted(n for n in layout.counts if n != shard.count)
    if others:
        raise SinkMismatchError(
            f"{path} is written by {others[0]} shards; this run is shard {shard.label}. Every shard of one output "
            f"must use the same N: pass --shard i/{others[0]} (or --procs {others[0]}), or use a new --output."
        )
    if layout.unsharded:
        raise SinkMismatchError(
            f"{path} holds the labels of a run without --shard ({layout.unsharded[0]}); shards cannot join it. "
            "Use a new --output for a sharded run, or run without --shard."
        )


def move_aside(path: Path) -> Path | None:
    """Rename an output, sharded or not (with its side files and shard files), to `NAME.bak-<time>`."""
    if object_uri(path) is not None:
        raise UsageError(
            f"--skip_labeled False would move {path} aside, and object storage has no rename. Label into a new "
            "--output prefix (or delete the old one yourself)."
        )
    meta = meta_dir_for(path)
    shard_files = [shard_file(path, s) for s in discover(path).shards] if is_jsonl(path) else []
    moving = [p for p in (path, meta, *shard_files) if p.exists()]
    if not moving:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    for item in moving:
        if item == path:
            item.rename(backup)
        elif item == meta:
            item.rename(backup.with_name(backup.name + ".meta"))
        else:
            item.rename(item.with_name(item.name + f".bak-{stamp}"))
    return backup
