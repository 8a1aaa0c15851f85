"""Where an input lives and what it holds: local or object storage, its format, its compression.

Everything opens through `pyarrow.fs`, so `s3://bucket/key` and `gs://bucket/key` read like local files
(credentials from the usual environment, endpoint and region as `storage_options`). pyarrow is imported
only when an input is opened, so `import pipeline.cli` stays light.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlencode

from pipeline.errors import InputError

FORMATS = ("csv", "tsv", "jsonl", "parquet")
_BY_SUFFIX = {
    ".csv": "csv",
    ".txt": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zst", ".zstd")
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
PARQUET_MAGIC = b"PAR1"
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_HEAD_BYTES = 1 << 16


def is_uri(location: str | Path) -> bool:
    """Whether `location` names object storage (`s3://…`, `gs://…`) rather than a local path."""
    return isinstance(location, str) and bool(_URI.match(location)) and not location.startswith("file://")


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """How to read an input: `format` (None: by extension), CSV `encoding`/`delimiter`, and object storage.

    `storage_options` become query parameters of the URI (pyarrow reads `endpoint_override`, `region`,
    `scheme`, … there); `filesystem` replaces the one the URI names (e.g. one built with credentials).
    """

    format: str | None = None
    encoding: str = "utf-8"
    delimiter: str | None = None
    require_id_column: bool = False
    storage_options: Mapping[str, str] = field(default_factory=dict)
    filesystem: Any = None


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input: its filesystem and path there, its format, compression, and whether it is a directory."""

    name: str  # as the user wrote it, for messages
    filesystem: Any  # a pyarrow.fs.FileSystem
    path: str
    format: str
    compression: str | None = None
    is_dir: bool = False
    size: int = 0

    def open_stream(self) -> Any:
        """A binary stream of the (decompressed) content."""
        import pyarrow as pa  # noqa: PLC0415 - see the module docstring

        try:
            raw = self.filesystem.open_input_stream(self.path, compression=None)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot read input {self.name}: {_reason(exc)}") from None
        return pa.CompressedInputStream(raw, self.compression) if self.compression else raw

    def head(self, size: int = _HEAD_BYTES) -> bytes:
        """The first `size` bytes of the (decompressed) content."""
        with self.open_stream() as stream:
            try:
                return bytes(stream.read(size))
            except OSError as exc:
                raise InputError(f"cannot read input {self.name}: {_reason(exc)}") from None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input across runs: where it is, its size and a hash of its start (or listing)."""
        where = self.name if is_uri(self.name) else str(Path(self.path).resolve())
        if self.is_dir:
            listing = "\n".join(f"{info.path} {info.size}" for info in self._files())
            return {"path": where, "size": self.size, "head_sha": _short_hash(listing.encode())}
        with self.filesystem.open_input_stream(self.path, compression=None) as raw:
            head = bytes(raw.read(_HEAD_BYTES))
        return {"path": where, "size": self.size, "head_sha": _short_hash(head)}

    def count_lines(self, stop: threading.Event | None = None) -> int:
        """Newlines in the content (plus one for an unterminated last line); checks `stop` between 1 MiB chunks."""
        lines = 0
        chunk, last = b"", b""
        with self.open_stream() as stream:
            while not (stop is not None and stop.is_set()) and (chunk := bytes(stream.read(1 << 20))):
                lines += chunk.count(b"\n")
                last = chunk
        return lines + (1 if last and last[-1:] != b"\n" else 0)

    def _files(self) -> list[Any]:
        from pyarrow import fs  # noqa: PLC0415

        infos = self.filesystem.get_file_info(fs.FileSelector(self.path, recursive=True))
        return sorted((i for i in infos if i.type == fs.FileType.File), key=lambda i: i.path)


def open_input(location: str | Path, options: ReadOptions | None = None) -> InputFile:
    """Find an input (local path or URI), check it exists, and settle its format and compression.

    Raises InputError naming the input and what to do when it is missing, unreadable or of no known format.
    """
    from pyarrow import fs  # noqa: PLC0415

    options = options or ReadOptions()
    name = str(location)
    if options.format is not None and options.format not in FORMATS:
        raise InputError(f"unknown --input-format {options.format!r}; use one of {', '.join(FORMATS)}.")
    filesystem, path = _filesystem(location, options)
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:
        raise InputError(f"cannot read input {name}: {_reason(exc)}") from None
    if info.type == fs.FileType.NotFound:
        raise InputError(f"input file {name} not found.")
    is_dir = info.type == fs.FileType.Directory
    fmt = options.format or ("parquet" if is_dir else format_of(name))
    if is_dir and fmt != "parquet":
        raise InputError(f"input {name} is a directory; pass a {fmt.upper()} file (a directory is read as Parquet).")
    file = InputFile(name, filesystem, path, fmt, is_dir=is_dir, size=int(info.size or 0))
    if is_dir:
        size = sum(int(i.size or 0) for i in file._files())
        return InputFile(name, filesystem, path, fmt, is_dir=True, size=size)
    with filesystem.open_input_stream(path, compression=None) as raw:
        magic = bytes(raw.read(4))
    compression = next((kind for sig, kind in _MAGIC.items() if magic.startswith(sig)), None)
    if compression and fmt == "parquet":
        raise InputError(
            f"{name} is a {compression}-compressed file; Parquet compresses its own pages. Decompress it first, "
            "or pass --input-format csv|tsv|jsonl if it holds text."
        )
    return InputFile(name, filesystem, path, fmt, compression=compression, size=file.size)


def default_output(location: str | Path) -> Path:
    """Where labels go when --output is not given: INPUT.labels.jsonl beside a local input."""
    if is_uri(location):
        raise InputError(f"--input {location} is a URI, with no folder beside it for the labels: pass --output.")
    return Path(location).with_suffix(".labels.jsonl")


def format_of(name: str) -> str:
    """The format a file name says (a `.gz`/`.zst` suffix is looked through); CSV when it says none."""
    lower = PurePosixPath(name.split("?", 1)[0].lower())
    if lower.suffix in _COMPRESSED_SUFFIXES:
        lower = lower.with_suffix("")
    return _BY_SUFFIX.get(lower.suffix, "csv")


def check_format(file: InputFile, head: bytes) -> None:
    """Refuse content of another format than the input's name (or --input-format) says."""
    if file.format != "parquet" and head.startswith(PARQUET_MAGIC):
        raise InputError(
            f"{file.name} holds Parquet data, not {file.format.upper()}. Rename it to .parquet, "
            "or pass --input-format parquet."
        )
    if file.format == "parquet" and not file.is_dir and not head.startswith(PARQUET_MAGIC):
        looks = "JSONL" if head.lstrip()[:1] == b"{" else "text (CSV?)" if _is_text(head) else "binary data"
        guess = "jsonl" if looks == "JSONL" else "csv|tsv"
        raise InputError(
            f"{file.name} is not Parquet (it does not start with PAR1; it looks like {looks}). "
            f"Pass --input-format {guess}, or rename the file to what it holds."
        )


def _filesystem(location: str | Path, options: ReadOptions) -> tuple[Any, str]:
    from pyarrow import fs  # noqa: PLC0415

    if not is_uri(location):
        local = str(location).removeprefix("file://")
        return options.filesystem or fs.LocalFileSystem(), str(Path(local).absolute())
    uri = str(location)
    if options.storage_options:
        uri += ("&" if "?" in uri else "?") + urlencode(dict(options.storage_options))
    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a URI it cannot use
        reason = _reason(exc)
        for value in options.storage_options.values():  # a secret given as an option never reaches a message
            reason = reason.replace(value, "***") if len(value) >= 6 else reason  # no secret is that short
        raise InputError(
            f"cannot open input {location}: {reason}. Local paths, s3:// and gs:// URIs are supported."
        ) from None
    return options.filesystem or filesystem, path


def _is_text(head: bytes) -> bool:
    sample = head[:4096]
    return b"\x00" not in sample and sum(b < 9 or 13 < b < 32 for b in sample) * 20 < max(1, len(sample))


def _short_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc).strip().rstrip(".")
