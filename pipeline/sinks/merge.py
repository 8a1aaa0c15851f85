"""`labelstream compact` on a sharded Parquet dataset: N finished shards become one ordinary sink.

The steps, each safe to repeat, so that a crash anywhere is finished by running `compact` again:

1. with every shard's lock held, check that all N shards finished and agree on their setup; write the
   `merging` marker (from now on every run of the output refuses and points at `compact`);
2. write the merged dead letters, then the merged manifest, into `OUT.meta/` (each by one rename);
3. rewrite every shard's parts into unsharded parts and swap the dataset directory in one exchange;
4. delete the shards' side folders, then the marker.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import orjson

from pipeline.errors import SinkError, SinkMismatchError, StorageError
from pipeline.input.shards import Shard
from pipeline.results import now_iso
from pipeline.sinks.layout import MERGING, Layout, part_shard
from pipeline.sinks.meta import Manifest, SinkMeta
from pipeline.sinks.parquet import ParquetSink, rewrite_parts, target_schema
from pipeline.sinks.progress_file import RunState, last_state
from pipeline.sinks.swap import fresh_rewrite_dir, recover_swap, swap_in


def merge_shards(path: Path, layout: Layout, *, rows_per_part: int = 1_000_000) -> tuple[int, int]:
    """Merge a finished sharded dataset into one unsharded sink; return (parts before, parts after)."""
    top = SinkMeta(path)
    marker = top.dir / MERGING
    count = layout.count
    if count is None:
        recorded = orjson.loads(marker.read_bytes()) if marker.exists() else {}
        count = recorded.get("shards") if isinstance(recorded, dict) else None
    if not isinstance(count, int):
        raise SinkError(f"{path} holds shards of several sizes ({sorted(layout.counts)}); it cannot be merged.")
    sinks = [ParquetSink(path, Shard(i, count)) for i in range(count)]
    held: list[SinkMeta] = []
    try:
        for sink in sinks:
            if sink.meta.dir.is_dir():
                sink.meta.lock()  # refuses while a shard is still running
                held.append(sink.meta)
        if not marker.exists():
            check_finished(path, sinks)
            manifest = merged_manifest(path, sinks)
            top.ensure()
            top.write_json_atomic(marker, {"shards": count, "started_at": now_iso()})
        else:
            manifest = None
        top.lock()
        held.append(top)
        if manifest is not None or not top.manifest_path.exists():
            _merge_side_files(top, sinks, manifest or merged_manifest(path, sinks))
        before, after = _merge_parts(path, top, sinks, rows_per_part)
        for meta in held[:-1]:
            meta.unlock()
        for sink in sinks:
            shutil.rmtree(sink.meta.dir, ignore_errors=True)
        marker.unlink(missing_ok=True)
        return before, after
    except OSError as exc:
        raise StorageError(f"merging the shards of {path} failed: {exc}. Run `labelstream compact` again.") from None
    finally:
        for meta in held:
            meta.unlock()


def check_finished(path: Path, sinks: Sequence[ParquetSink]) -> None:
    """Refuse to merge while any shard has not finished (naming each with its state)."""
    unfinished = []
    for sink in sinks:
        state = last_state(sink.meta)
        if state != RunState.DONE:
            unfinished.append(f"{sink.shard.label if sink.shard else '?'} ({state})")
    if unfinished:
        raise SinkError(
            f"cannot merge {path} yet: shards {', '.join(unfinished)} have not finished. Run each to the end "
            "(re-run the same shard command; rows already labeled are skipped), then compact again."
        )


def merged_manifest(path: Path, sinks: Sequence[ParquetSink]) -> Manifest:
    """One manifest for the merged sink; refuses shards whose labels came from different setups."""
    merged: Manifest | None = None
    first_label = ""
    for sink in sinks:
        manifest = sink.meta.read_manifest()
        if manifest is None or sink.shard is None:
            continue
        label = sink.shard.label
        runs = [{**run, "shard": label} for run in manifest.runs]
        if merged is None:
            merged, first_label = Manifest.from_json(manifest.to_json()), label
            merged.runs = runs
            continue
        diffs = manifest.identity.differences(merged.identity) if merged.identity and manifest.identity else []
        if diffs and sink.has_rows():
            raise SinkMismatchError(
                f"cannot merge {path}: shard {label} was labeled with another setup than shard {first_label} "
                f"({'; '.join(diffs)}). Keep the shards as they are, or relabel one of them."
            )
        merged.runs += runs
        merged.forced += manifest.forced
    if merged is None:
        raise SinkError(f"{path} has no shard with a manifest; nothing to merge.")
    merged.extra["merged_from_shards"] = {"count": len(sinks), "at": now_iso()}
    return merged


def _merge_side_files(top: SinkMeta, sinks: list[ParquetSink], manifest: Manifest) -> None:
    """The dead letters of every shard into one file, then the manifest: each replaced by one rename."""
    tmp = top.tmp_dir / f".dead_letters.{os.getpid()}.tmp"
    top.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as out:
        for sink in sinks:
            if sink.meta.dead_letters_path.exists():
                with sink.meta.dead_letters_path.open("rb") as src:
                    shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(top.dead_letters_path)
    top.write_manifest(manifest)


def _merge_parts(path: Path, top: SinkMeta, sinks: list[ParquetSink], rows_per_part: int) -> tuple[int, int]:
    """Rewrite the shards' parts as unsharded ones and swap the directory in (nothing to do once swapped)."""
    recover_swap(path, top.dir)
    for sink in sinks:
        if sink.meta.dir.is_dir():
            sink.recover()  # an unfinished --relabel-changed, temporary parts
    parts = sorted(p for p in path.iterdir() if isinstance(part_shard(p.name), Shard)) if path.is_dir() else []
    if not parts:
        done = sorted(p for p in path.iterdir() if part_shard(p.name) is None) if path.is_dir() else []
        return len(done), len(done)
    new = fresh_rewrite_dir(top.dir)
    try:
        written = len(rewrite_parts(parts, target_schema(parts), new, rows_per_part=rows_per_part))
        swap_in(path, top.dir)
    except OSError:
        recover_swap(path, top.dir)
        raise
    return len(parts), written
