"""The side files of a sink, kept in `OUT.meta/` beside it: manifest, dead letters, progress, lock, temp parts,
and the batch engine's ledger (`batches.json`) with its request and row files (`batches/`).

They live outside the sink itself because readers of a Parquet dataset directory (polars, duckdb) fail on
any file in it that is not a complete part; a JSONL sink keeps the same layout for one rule everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import orjson

from pipeline.errors import SinkError, SinkMismatchError, StorageError
from pipeline.input.shards import Shard
from pipeline.results import OLD_KINDS, Failed, encode_dead_letters, now_iso
from pipeline.sinks.files import Appender, replace_atomically
from pipeline.sinks.limit_memory import LimitMemory, endpoint_name

SCHEMA_VERSION: Final = 3  # 2: records carry text_sha; 3: confidence, cached_tokens, extra output fields
_IDENTITY_KEYS: Final = ("model", "prompt", "labels", "multi_label", "id_source")


@dataclass(frozen=True, slots=True)
class Identity:
    """What made a sink's labels: compared on resume so that one sink never mixes two setups."""

    model: str
    prompt: str
    labels: tuple[str, ...]
    multi_label: bool
    id_source: str

    def differences(self, other: Identity) -> list[str]:
        """Human-readable differences between this run and a sink's recorded identity."""
        diffs = []
        if other.model != self.model:
            diffs.append(f"model {other.model} → {self.model}")
        if other.prompt != self.prompt:
            diffs.append(f"prompt {other.prompt} → {self.prompt} (instructions, examples or template changed)")
        if other.labels != self.labels:
            diffs.append(f"labels {list(other.labels)} → {list(self.labels)}")
        if other.multi_label != self.multi_label:
            diffs.append(f"multi_label {other.multi_label} → {self.multi_label}")
        if other.id_source != self.id_source:
            diffs.append(f"ids from {other.id_source} → {self.id_source}")
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

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Identity | None:
        """The identity recorded in a manifest, or None when it holds none."""
        if not all(key in raw for key in _IDENTITY_KEYS):
            return None
        return cls(
            model=str(raw["model"]),
            prompt=str(raw["prompt"]),
            labels=tuple(str(x) for x in raw.get("labels") or ()),
            multi_label=bool(raw["multi_label"]),
            id_source=str(raw["id_source"]),
        )


@dataclass(slots=True)
class Manifest:
    """`manifest.json`: the identity of the sink's labels, how its input was read, and its history of runs.

    Keys this version does not know are kept as they are (`extra`), so an older labelstream never drops
    what a newer one wrote.
    """

    identity: Identity | None = None
    input: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    forced: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        """The model the sink's labels came from (None before the first run)."""
        return self.identity.model if self.identity else None

    def to_json(self) -> dict[str, Any]:
        """The manifest as written: identity fields at the top level."""
        out: dict[str, Any] = {**self.extra, "schema_version": self.schema_version}
        if self.identity is not None:
            out.update(self.identity.as_dict())
        out["input"] = self.input
        out["runs"] = self.runs
        if self.forced:
            out["forced"] = self.forced
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Manifest:
        """Read a manifest written by this or another version."""
        known = {*_IDENTITY_KEYS, "schema_version", "input", "runs", "forced"}
        version = raw.get("schema_version")
        return cls(
            identity=Identity.from_dict(raw),
            input=dict(raw.get("input") or {}),
            runs=list(raw.get("runs") or []),
            forced=list(raw.get("forced") or []),
            schema_version=version if isinstance(version, int) else 1,
            extra={k: v for k, v in raw.items() if k not in known},
        )


def pid_alive(pid: int) -> bool:
    """Whether a process a side file names (lock, progress file, lease) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def meta_dir_for(sink_path: Path) -> Path:
    """`OUT.jsonl` → `OUT.jsonl.meta`, `OUT.parquet/` → `OUT.parquet.meta`."""
    return sink_path.with_name(sink_path.name + ".meta")


class SinkMeta:
    """Access to one sink's side-file folder: `OUT.meta/`, or `OUT.meta/shard-i-of-N/` for a shard of `OUT`."""

    def __init__(self, sink_path: Path, shard: Shard | None = None) -> None:
        self.dir = meta_dir_for(sink_path) / shard.name if shard else meta_dir_for(sink_path)
        self.what = f"{sink_path} (shard {shard.label})" if shard else str(sink_path)
        self.manifest_path = self.dir / "manifest.json"
        self.dead_letters_path = self.dir / "dead_letters.jsonl"
        self.progress_path = self.dir / "progress.json"
        self.tmp_dir = self.dir / "tmp"
        self.batches_path = self.dir / "batches.json"  # the batch engine's ledger: files and batches it made
        self.batches_dir = self.dir / "batches"  # its request files and the rows each batch holds
        self.limits_path = self.dir / "limits.json"  # rate limits learned, for the next run (limit_memory.py)
        self._lock: IO[bytes] | None = None
        self._dead_letters = Appender(self.dead_letters_path)

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
                f"another labelstream run (pid {pid}) is writing {self.what}; wait for it to finish or stop it first."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._lock = handle

    def claims(self) -> list[Path]:
        """What taking the lock would create (the folder, its temp folder, the lock file), for `withdraw`."""
        return [p for p in (self.dir / "lock", self.tmp_dir, self.dir) if not p.exists()]

    def withdraw(self, created: list[Path]) -> None:
        """Remove what a refused run created by locking (see `claims`), so that it leaves no trace."""
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()

    def unlock(self) -> None:
        """Release the lock (also released by the OS if the process dies)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def read_bytes(self, path: Path) -> bytes:
        """The whole of one side file (FileNotFoundError when there is none)."""
        return path.read_bytes()

    def read_manifest(self) -> Manifest | None:
        """The manifest, or None when there is none yet."""
        try:
            data = orjson.loads(self.read_bytes(self.manifest_path))
        except FileNotFoundError:
            return None
        except orjson.JSONDecodeError:
            raise SinkError(
                f"{self.manifest_path} is damaged. Delete it and re-run with --force to adopt the sink as it is."
            ) from None
        return Manifest.from_json(data) if isinstance(data, dict) else None

    def check_identity(self, identity: Identity, *, has_rows: bool, force: bool, sink_name: str) -> Manifest:
        """Refuse to resume a sink whose rows another setup made (unless forced); return the manifest to write.

        Only labeled rows fix a sink's identity: a run that labeled nothing (a mistyped --model, say) does not
        stop the next run from using the sink with another setup.
        """
        manifest = self.read_manifest()
        if manifest is None:
            if has_rows and not force:
                raise SinkMismatchError(
                    f"{sink_name} has rows but no manifest ({self.manifest_path}), so it is unknown which model "
                    "and prompt made them. Use a new --output, or --force to adopt it."
                )
            manifest = Manifest()
        recorded = manifest.identity
        if has_rows and recorded is not None:
            diffs = identity.differences(recorded)
            if diffs and not force:
                raise SinkMismatchError(
                    f"{sink_name} was labeled with {recorded.model} and prompt {recorded.prompt}; "
                    f"this run differs: {'; '.join(diffs)}. Use a new --output, or --force to mix them."
                )
            if diffs:
                manifest.forced.append({"differences": diffs, "at": now_iso()})
        manifest.identity = identity
        manifest.schema_version = SCHEMA_VERSION
        return manifest

    def write_manifest(self, manifest: Manifest) -> None:
        """Write the manifest atomically."""
        self.write_json_atomic(self.manifest_path, manifest.to_json())

    def write_json_atomic(self, path: Path, data: Mapping[str, Any], *, durable: bool = False) -> None:
        """Replace `path` with `data` as JSON so that readers never see half a file (`durable`: synced to disk
        before this returns, for records a later step depends on)."""
        replace_atomically(path, orjson.dumps(data, option=orjson.OPT_INDENT_2), self.tmp_dir, durable=durable)

    def keep_batch_file(self, path: Path) -> None:
        """Make a finished file of `batches_dir` last as long as the sink does (on disk it is there already)."""

    def fetch_batch_file(self, path: Path) -> bool:
        """Whether a kept file of `batches_dir` is at `path` to read (fetched from where the sink lives if need be)."""
        return path.exists()

    def drop_batch_file(self, path: Path) -> None:
        """Delete a file of `batches_dir`, and its kept copy."""
        path.unlink(missing_ok=True)

    def batch_file_names(self) -> set[str]:
        """The names of the files in `batches_dir` and of the kept ones."""
        return {p.name for p in self.batches_dir.iterdir()} if self.batches_dir.is_dir() else set()

    def limit_memory(self, endpoints: Sequence[str | None], model: str) -> LimitMemory:
        """The rate limits learned against these endpoints (None: the SDK's default) and this model."""
        endpoint = ",".join(endpoint_name(url) if url else "default" for url in endpoints)
        return LimitMemory(
            self.limits_path, self.write_json_atomic, read=self.read_bytes, endpoint=endpoint, model=model
        )

    def append_dead_letters(self, items: Sequence[Failed], run_id: str) -> None:
        """Append the dead letters of failed rows durably (blocking: call it on the sink's I/O thread)."""
        if items:
            self.ensure()
            write_dead_letters(self._dead_letters, items, run_id)

    def close(self) -> None:
        """Close the dead-letter file."""
        self._dead_letters.close()

    def read_dead_letters(self) -> Iterator[dict[str, Any]]:
        """Every dead letter ever written (a later run may have labeled the row since)."""
        try:
            handle = self.dead_letters_path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            yield from parse_dead_letters(handle)


def parse_dead_letters(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The records of dead-letter lines (a torn or foreign line is skipped; old kinds get their new names)."""
    for line in lines:
        with contextlib.suppress(orjson.JSONDecodeError):
            item = orjson.loads(line)
            if isinstance(item, dict):
                if item.get("kind") in OLD_KINDS:
                    item["kind"] = OLD_KINDS[item["kind"]]
                yield item


def write_dead_letters(appender: Appender, items: Sequence[Failed], run_id: str) -> None:
    """The one writer of dead letters: one record a write, safe beside other processes appending to the file."""
    try:
        appender.append_records(encode_dead_letters(items, run_id))
    except OSError as exc:
        raise StorageError(f"cannot write {appender.path}: {exc.strerror}. Free space and re-run to resume.") from None


def append_dead_letters(path: Path, items: Sequence[Failed], run_id: str) -> None:
    """Append dead letters to `path` from a process that holds no SinkMeta (a Ray actor); see write_dead_letters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    appender = Appender(path)
    try:
        write_dead_letters(appender, items, run_id)
    finally:
        appender.close()
