"""The side files of a sink, kept in `OUT.meta/` beside it: manifest, dead letters, progress, lock, temp parts.

They live outside the sink itself because readers of a Parquet dataset directory (polars, duckdb) fail on
any file in it that is not a complete part; a JSONL sink keeps the same layout for one rule everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.clock import now_iso
from pipeline.errors import SinkError, SinkMismatchError, StorageError

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Identity:
    """What made a sink's labels: compared on resume so that one sink never mixes two setups."""

    model: str
    prompt: str
    labels: tuple[str, ...]
    multi_label: bool
    id_source: str

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """Human-readable differences between this run and a manifest's recorded identity."""
        diffs = []
        if other.get("model") != self.model:
            diffs.append(f"model {other.get('model')} → {self.model}")
        if other.get("prompt") != self.prompt:
            diffs.append(f"prompt {other.get('prompt')} → {self.prompt} (instructions, examples or template changed)")
        if list(other.get("labels") or []) != list(self.labels):
            diffs.append(f"labels {other.get('labels')} → {list(self.labels)}")
        if other.get("multi_label") != self.multi_label:
            diffs.append(f"multi_label {other.get('multi_label')} → {self.multi_label}")
        if other.get("id_source") != self.id_source:
            diffs.append(f"ids from {other.get('id_source')} → {self.id_source}")
        return diffs

    def as_dict(self) -> dict[str, Any]:
        """JSON form, as stored in the manifest."""
        return {
            "model": self.model,
            "prompt": self.prompt,
            "labels": list(self.labels),
            "multi_label": self.multi_label,
            "id_source": self.id_source,
        }


def meta_dir_for(sink_path: Path) -> Path:
    """`OUT.jsonl` → `OUT.jsonl.meta`, `OUT.parquet/` → `OUT.parquet.meta`."""
    return sink_path.with_name(sink_path.name + ".meta")


class SinkMeta:
    """Access to one sink's side-file folder."""

    def __init__(self, sink_path: Path) -> None:
        self.dir = meta_dir_for(sink_path)
        self.manifest_path = self.dir / "manifest.json"
        self.dead_letters_path = self.dir / "dead_letters.jsonl"
        self.progress_path = self.dir / "progress.json"
        self.tmp_dir = self.dir / "tmp"
        self._lock: IO[bytes] | None = None

    def ensure(self) -> None:
        """Create the folder (and its temp folder)."""
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror}. Check the --output folder.") from None

    def lock(self) -> None:
        """Take an exclusive lock so two runs never append to one sink at once."""
        self.ensure()
        handle = (self.dir / "lock").open("a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().decode(errors="replace").strip() or "?"
            handle.close()
            raise SinkError(
                f"another labelstream run (pid {pid}) is writing {self.dir.name.removesuffix('.meta')}; "
                "wait for it to finish or stop it first."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        """Release the lock (also released by the OS if the process dies)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when there is none yet."""
        try:
            data = orjson.loads(self.manifest_path.read_bytes())
        except FileNotFoundError:
            return None
        except orjson.JSONDecodeError:
            raise SinkError(
                f"{self.manifest_path} is damaged. Delete it and re-run with --force to adopt the sink as it is."
            ) from None
        return data if isinstance(data, dict) else None

    def check_identity(self, identity: Identity, *, has_rows: bool, force: bool, sink_name: str) -> dict[str, Any]:
        """Refuse to resume a sink made by another setup (unless forced); return the manifest to write."""
        manifest = self.read_manifest()
        if manifest is None:
            if has_rows and not force:
                raise SinkMismatchError(
                    f"{sink_name} has rows but no manifest ({self.manifest_path}), so it is unknown which model "
                    "and prompt made them. Use a new --output, or --force to adopt it."
                )
            manifest = {"schema_version": SCHEMA_VERSION, **identity.as_dict(), "runs": []}
        else:
            diffs = identity.differences(manifest)
            if diffs and not force:
                raise SinkMismatchError(
                    f"{sink_name} was labeled with {manifest.get('model')} and prompt {manifest.get('prompt')}; "
                    f"this run differs: {'; '.join(diffs)}. Use a new --output, or --force to mix them."
                )
            if diffs:
                manifest.setdefault("forced", []).append({"differences": diffs, "at": now_iso()})
                manifest.update(identity.as_dict())
        return manifest

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Write the manifest atomically."""
        self.write_json_atomic(self.manifest_path, manifest)

    def write_json_atomic(self, path: Path, data: Mapping[str, Any]) -> None:
        """Replace `path` with `data` as JSON so that readers never see half a file."""
        tmp = self.tmp_dir / f".{path.name}.{os.getpid()}.tmp"
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageError(f"cannot write {path}: {exc.strerror}.") from None

    def read_dead_letters(self) -> Iterator[dict[str, Any]]:
        """Every dead letter ever written (a later run may have labeled the row since)."""
        try:
            handle = self.dead_letters_path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for line in handle:
                with contextlib.suppress(orjson.JSONDecodeError):
                    item = orjson.loads(line)
                    if isinstance(item, dict):
                        yield item
