"""Replace a whole dataset directory at once: a reader, or a crash, sees the old set of parts or the new one.

Used by `compact` and by `--relabel-changed` (which drops superseded records). The new set is built in
`OUT.meta/rewrite.new`, then exchanged with the dataset by one `renameat2(RENAME_EXCHANGE)` (Linux); where
that is missing, two renames with a `rewrite.ready` marker between them, which `recover_swap` finishes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

from pipeline.sinks.files import fsync_dir


def swap_paths(meta_dir: Path) -> tuple[Path, Path, Path]:
    """Where a rewrite builds the new set, parks the old one, and marks the new one complete."""
    return meta_dir / "rewrite.new", meta_dir / "rewrite.old", meta_dir / "rewrite.ready"


def fresh_rewrite_dir(meta_dir: Path) -> Path:
    """An empty directory for the new set of parts (leftovers of an earlier attempt removed)."""
    new, _, _ = swap_paths(meta_dir)
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    return new


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(result == 0)


def swap_in(dataset: Path, meta_dir: Path) -> None:
    """Make the complete set in `rewrite.new` the dataset, atomically, and delete the old set."""
    new, old, ready = swap_paths(meta_dir)
    for part in new.iterdir():
        with part.open("rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(new)
    ready.touch()
    if _exchange(new, dataset):
        ready.unlink()
        shutil.rmtree(new)  # now holds the old parts
    else:
        dataset.rename(old)
        new.rename(dataset)
        ready.unlink()
        shutil.rmtree(old)
    fsync_dir(dataset.parent)


def recover_swap(dataset: Path, meta_dir: Path) -> str | None:
    """Finish or undo a swap a crash interrupted; return a note saying which, or None if there was none."""
    new, old, ready = swap_paths(meta_dir)
    note = None
    if ready.exists() and not dataset.exists():
        # Crashed between the two renames of the fallback swap: the new set is complete, finish the job.
        new.rename(dataset)
        note = "finished a rewrite of the dataset (compaction) that was interrupted"
    elif old.exists() and not dataset.exists():
        old.rename(dataset)
        note = "rolled back a rewrite of the dataset (compaction) that was interrupted"
    ready.unlink(missing_ok=True)
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    return note
