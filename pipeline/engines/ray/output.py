"""Ray Data's Parquet writer, aimed at a labelstream Parquet sink: part names, atomic files, the done ids.

Ray Data writes each block straight to its final name. In a directory that readers scan while the job
runs (pandas, duckdb, polars, `labelstream status`), a half-written file breaks them, and after a crash
it would be a torn part. For a local (or NFS) directory the writer therefore gets a pyarrow filesystem
that writes each file under `OUT.meta/tmp/` and renames it into place once complete, like labelstream's
own sink; object stores (s3://, gs://) publish a file whole anyway. File names follow the sink's part
pattern, so `status`, `export`, `eval` and `compact` read the directory as any labelstream sink.

The output is the checkpoint: `done_ids` reads the ids of every complete part, and a restarted job
filters those rows out before they reach an actor. What a crash can cost is the rows labeled but not yet
in a written file (see docs/engines.md, Ray, for the measured number).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import SinkError
from pipeline.sinks.files import fsync_dir
from pipeline.sinks.layout import PART
from pipeline.sinks.meta import meta_dir_for
from pipeline.sinks.storage import ObjectStore, object_uri

WRITER_CPUS: Final = 0.25  # a write task mostly waits on the disk


def is_remote(path: str) -> bool:
    """Whether `path` names an object store or other remote filesystem (a URI with a scheme)."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> Path:
    """A local output path (with or without file://), absolute."""
    return Path(path.removeprefix("file://")).resolve()


def part_names() -> Any:
    """A Ray `FilenameProvider` giving sink part names: `part-<task, 6 digits>-<write uuid><i>.parquet`."""
    from ray.data.datasource import FilenameProvider  # noqa: PLC0415 - ray loads only for Ray jobs

    class _PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            # Deterministic per (write, task): a retried write task replaces its own file, never adds one.
            return f"part-{task_index:06d}-{write_uuid}{{i}}.parquet"

    return _PartNames()


class _Publishing:
    """A file written under a temporary name and renamed to `final` when closed (fsynced first), unless
    `publish()` says no (the run that wrote it is gone): then it is dropped, and its rows count as not done."""

    def __init__(self, final: str, tmp_dir: Path, publish: Callable[[], bool]) -> None:
        self.final = final
        self.publish = publish
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_dir / f"{Path(final).name}.{uuid.uuid4().hex[:8]}.tmp"
        self.handle = self.tmp.open("wb")
        self.closed = False

    def write(self, data: Any) -> int:
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def tell(self) -> int:
        return self.handle.tell()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            if self.publish():
                self.tmp.replace(self.final)
                fsync_dir(Path(self.final).parent)
        finally:
            with contextlib.suppress(OSError):
                self.tmp.unlink()


def still_running(lock: Path, owner: int) -> bool:
    """Whether the run with pid `owner` still holds the sink's lock.

    Killing a driver does not stop its Ray workers at once: a write task can finish a second later, after the
    next run has read the done ids, and its rows would be there twice. So a part of a CLI run is published
    only while the lock file names that run and someone holds the lock (the lock is the driver's own flock).
    """
    try:
        handle = lock.open("rb")
    except FileNotFoundError:
        return False
    with handle:
        if handle.read().decode(errors="replace").strip() != str(owner):
            return False  # another run holds the sink now
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # held exclusively, and the file names our driver
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False  # nobody holds it: our driver is gone


class _Delegating(pafs.FileSystemHandler):  # type: ignore[misc]  # pyarrow is untyped here
    """A pyarrow filesystem handler that hands every call to `inner` (subclasses change what they must)."""

    @property
    def inner(self) -> pafs.FileSystem:
        raise NotImplementedError

    def normalize_path(self, path: str) -> str:
        return str(self.inner.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return list(self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("labelstream never empties a filesystem root")

    def delete_file(self, path: str) -> None:
        self.inner.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.inner.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.inner.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.inner.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        raise OSError("labelstream writes whole part files; appending to one is not supported")


class AtomicLocalFiles(_Delegating):
    """A local filesystem whose new files appear complete or not at all (temporary files under `tmp_dir`)."""

    def __init__(self, tmp_dir: str, lock: str | None = None, owner: int | None = None) -> None:
        self.tmp_dir = tmp_dir
        self.lock, self.owner = lock, owner  # a CLI run: publish only while it holds the sink's lock
        self.local = pafs.LocalFileSystem()

    def __reduce__(self) -> tuple[Any, ...]:  # sent to Ray's write tasks
        return (AtomicLocalFiles, (self.tmp_dir, self.lock, self.owner))

    @property
    def inner(self) -> pafs.FileSystem:
        return self.local

    def _publish(self) -> bool:
        return self.lock is None or self.owner is None or still_running(Path(self.lock), self.owner)

    def equals(self, other: Any) -> bool:
        return isinstance(other, AtomicLocalFiles) and other.tmp_dir == self.tmp_dir

    def get_type_name(self) -> str:
        return "labelstream-atomic-local"

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        return pa.PythonFile(_Publishing(path, Path(self.tmp_dir), self._publish), mode="w")


class StoreFiles(_Delegating):
    """The object store of `uri`, rebuilt in each Ray worker from the `--storage-option`s that are not credentials:
    the workers take credentials from their own environment, never from a task argument (Ray keeps those)."""

    def __init__(self, uri: str, options: dict[str, str]) -> None:
        self.uri, self.options = uri, options
        self._fs: pafs.FileSystem | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # sent to Ray's write tasks
        return (StoreFiles, (self.uri, self.options))

    @property
    def inner(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = ObjectStore(self.uri, self.options).fs
        return self._fs

    def equals(self, other: Any) -> bool:
        return isinstance(other, StoreFiles) and (other.uri, other.options) == (self.uri, self.options)

    def get_type_name(self) -> str:
        return "labelstream-object-store"

    def create_dir(self, path: str, recursive: bool) -> None:
        """Nothing: an object store has no folders, and pyarrow's would be empty marker objects left behind."""


def write_args(
    path: str, *, rows_per_file: int, owner: int | None = None, storage: dict[str, str] | None = None
) -> dict[str, Any]:
    """Keyword arguments for `Dataset.write_parquet(path, ...)` that make it write a labelstream sink.

    `rows_per_file` is what a crash may re-pay at most per writer: labeled rows wait for that many before
    their part is written (the CLI's own sink writes every 5,000 rows or 30 s). `owner`: the pid of the CLI
    run holding the sink's lock, whose parts are published only while it does (`still_running`). `storage`: the
    non-secret options of an object store `path` is on (the CLI's staging prefix; see sinks/staging.py).
    """
    args: dict[str, Any] = {
        "filename_provider": part_names(),
        "compression": "zstd",
        "min_rows_per_file": rows_per_file,
        "ray_remote_args": {"num_cpus": WRITER_CPUS},
    }
    if storage is not None and (uri := object_uri(path)) is not None:
        args["filesystem"] = pafs.PyFileSystem(StoreFiles(uri, storage))
    elif not is_remote(path):
        meta = meta_dir_for(local_path(path))
        files = AtomicLocalFiles(str(meta / "tmp"), str(meta / "lock") if owner else None, owner)
        args["filesystem"] = pafs.PyFileSystem(files)
    return args


def done_ids(path: str) -> pa.Array:
    """The ids in every complete part of the output at `path` (empty if there is none), as one string array."""
    if is_remote(path):
        filesystem, root = pafs.FileSystem.from_uri(path)
    else:
        filesystem, root = pafs.LocalFileSystem(), str(local_path(path))
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return pa.array([], pa.string())
    if info.type != pafs.FileType.Directory:
        raise SinkError(f"{path} is a file; a Ray job writes a Parquet dataset directory. Use a new output.")
    found = filesystem.get_file_info(pafs.FileSelector(root))
    chunks = []
    for entry in sorted(found, key=lambda e: e.path):
        if entry.type != pafs.FileType.File or not PART.match(entry.base_name):
            continue
        try:
            chunks.append(pq.read_table(entry.path, columns=["id"], filesystem=filesystem).column("id"))
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(
                f"{entry.path} is not a readable Parquet part ({exc}). Move it out of {path} and re-run; its "
                "rows will be labeled again."
            ) from None
    if not chunks:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array(chunks, pa.string()).combine_chunks())
