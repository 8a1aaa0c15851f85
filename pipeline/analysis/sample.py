"""The gold sample `labelstream compare` labels: stratified by gold label, seeded, drawn once and kept.

Every candidate labels the same `sample.csv`, so their scores differ only by model and prompt. The sample keeps
every column of the gold file (ids, text, carried columns, the gold label itself), in the file's order. Each
gold label gets its share of the sample (largest remainders, at least one row each while the sample has room),
and within a label the rows are picked by a seeded generator. `sample.json` beside it records how it was
drawn; a later compare into the same folder reuses the sample, or refuses when the gold file or the settings
changed (the finished sinks would no longer match it).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

# eval's own readers of gold files, so a sample accepts exactly the gold cells `eval` scores.
from pipeline.analysis.evaluate import _gold_labels as parse_gold
from pipeline.analysis.evaluate import _header as gold_header
from pipeline.errors import InputError, StorageError, UsageError

SAMPLE_NAME: Final = "sample.csv"
_MANIFEST_NAME: Final = "sample.json"
_SHOWN: Final = 10  # unknown gold values named in an error


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """How a sample is drawn: from which gold file and column, how many rows, with which seed."""

    gold: str
    gold_column: str
    size: int
    seed: int
    gold_sha256: str = ""


@dataclass(slots=True)
class Sample:
    """A drawn sample: where it is, how it was drawn, how many gold rows there were and how many of each label."""

    path: Path
    spec: SampleSpec
    gold_rows: int = 0
    per_label: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows in the sample."""
        return sum(self.per_label.values())


def draw_sample(
    gold: Path, column: str, labels: Sequence[str], *, multi_label: bool, size: int, seed: int, folder: Path
) -> Sample:
    """Draw (or reuse) the stratified sample of `gold` into `folder`; labels outside `labels` are an error."""
    spec = SampleSpec(str(gold), column, size, seed, _sha256(gold))
    path, manifest = folder / SAMPLE_NAME, folder / _MANIFEST_NAME
    kept = _read_manifest(manifest)
    if kept is not None and path.is_file():
        if kept.spec != spec:
            raise UsageError(
                f"{folder} holds a sample drawn from {kept.spec.gold} (column {kept.spec.gold_column!r}, "
                f"--sample {kept.spec.size}, --seed {kept.spec.seed}) that this compare would draw differently "
                "(other settings, or the gold file changed). Use another --out, or delete the folder to start over."
            )
        return kept
    header = gold_header(gold)
    if column not in header:
        raise UsageError(f"{gold} has no column {column!r}; its columns are {header}. Pass --gold-column NAME.")
    strata = _strata(gold, header.index(column), labels, multi_label=multi_label)
    chosen = _choose(strata, size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    sample = Sample(path, spec, sum(map(len, strata.values())), {k: len(v) for k, v in chosen.items() if v})
    picked = {line for lines in chosen.values() for line in lines}
    _write_atomically(path, lambda handle: _copy_rows(gold, picked, handle))
    body = {"spec": asdict(spec), "gold_rows": sample.gold_rows, "per_label": sample.per_label}
    _write_atomically(manifest, lambda handle: handle.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()))
    return sample


def _records(gold: Path) -> Iterator[list[str]]:
    """The gold file's records after the header (the delimiter guessed as `eval` guesses it)."""
    try:
        with gold.open("r", encoding="utf-8-sig", newline="") as handle:
            delimiter = max((",", "\t", ";", "|"), key=handle.readline().count)
            handle.seek(0)
            reader = csv.reader(handle, delimiter=delimiter)
            next(reader, None)
            yield from reader
    except UnicodeDecodeError as exc:
        raise InputError(
            f"gold file {gold} is not UTF-8 ({exc.reason} at byte {exc.start}); save it as UTF-8."
        ) from None


def _strata(gold: Path, where: int, labels: Sequence[str], *, multi_label: bool) -> dict[str, list[int]]:
    """Record numbers by gold label (for multi-label: by the set of labels); empty gold cells are left out."""
    canonical = {label.casefold(): label for label in labels}
    unknown: dict[str, int] = {}
    strata: dict[str, list[int]] = {}
    for number, fields in enumerate(_records(gold)):
        cell = fields[where] if where < len(fields) else ""
        found = parse_gold(cell, canonical, multi=multi_label, unknown=unknown)
        if found:
            strata.setdefault("+".join(sorted(found)), []).append(number)
    if unknown:
        shown = ", ".join(f"{value!r} ×{n}" for value, n in sorted(unknown.items(), key=lambda kv: -kv[1])[:_SHOWN])
        more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        raise InputError(
            f"{gold} has gold labels that are not labels of the task: {shown}{more}. The task's labels are "
            f"{list(labels)}; fix those cells, or compare with a task file that has these labels."
        )
    if not strata:
        raise InputError(f"{gold} has no row with a gold label; fill in the gold column or pass --gold-column NAME.")
    return strata


def _choose(strata: dict[str, list[int]], size: int, seed: int) -> dict[str, list[int]]:
    """Each stratum's share of `size` rows (largest remainders, one at least while there is room), seeded."""
    total = sum(map(len, strata.values()))
    size = min(size, total)
    names = sorted(strata)
    exact = {name: size * len(strata[name]) / total for name in names}
    quota = {name: int(exact[name]) for name in names}
    by_remainder = sorted(names, key=lambda name: (quota[name] - exact[name], name))
    for name in by_remainder[: size - sum(quota.values())]:
        quota[name] += 1
    for name in names:  # a rare label still gets a row, taken from the largest share
        if quota[name] == 0 and size >= len(names):
            donor = max(names, key=lambda other: (quota[other], other))
            quota[donor] -= 1
            quota[name] = 1
    rng = random.Random(seed)
    return {name: sorted(rng.sample(strata[name], quota[name])) for name in names}


def _copy_rows(gold: Path, picked: set[int], handle: Any) -> None:
    header = gold_header(gold)
    writer = csv.writer(handle)
    writer.writerow(header)
    for number, fields in enumerate(_records(gold)):
        if number in picked:
            writer.writerow(fields)


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            write(handle)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}.") from None


def _read_manifest(path: Path) -> Sample | None:
    try:
        raw = orjson.loads(path.read_bytes())
        return Sample(path.with_name(SAMPLE_NAME), SampleSpec(**raw["spec"]), raw["gold_rows"], raw["per_label"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise InputError(f"gold file {path} not found.") from None
    except OSError as exc:
        raise InputError(f"cannot read gold file {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()
