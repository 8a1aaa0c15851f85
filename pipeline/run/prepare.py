"""Getting a sink ready for a run, and deciding row by row what the run does; shared by the run and `--dry-run`.

`prepare_run` takes the lock, moves an old sink aside (`--skip_labeled False`), repairs what a crash left,
loads the done ids, checks the resume guard, drops superseded records (`--relabel-changed`) and writes the
manifest. `RowGate` then sorts each input row: already done, a repeat, unusable, or to send; since the dry
run uses the same gate, it counts exactly what the run will send.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pipeline.errors import LabelstreamError, SinkMismatchError, UsageError
from pipeline.input.ids import IdSet
from pipeline.input.location import ReadOptions
from pipeline.input.shards import Shard
from pipeline.input.sources import Source, input_source
from pipeline.results import Failed, Row, now_iso, problem_failure, sha_tag
from pipeline.run.dedupe import Dedupe, key_of
from pipeline.run.options import RunOptions
from pipeline.run.sharding import all_done, check_shard_key, shard_key
from pipeline.sinks import Identity, Manifest, Sink, check_layout, open_sink
from pipeline.sinks.layout import move_aside
from pipeline.sinks.storage import object_filesystem, uri_options
from pipeline.stats import RunStats


def open_source(opts: RunOptions) -> Source:
    """The run's input reader, CSV, JSONL or Parquet (not yet opened)."""
    io = opts.io
    # An input in a bucket is read with the same endpoint and credentials (--storage-option) as an output there.
    where = opts.input
    read = ReadOptions(
        io.input_format, io.encoding, io.delimiter, io.require_id_column, uri_options(where), object_filesystem(where)
    )
    return input_source(opts.input, opts.config, read)


def identity_of(opts: RunOptions, source: Source) -> Identity:
    """What the resume guard compares: model, prompt fingerprint, labels, and how ids are made."""
    return Identity(
        model=opts.model,
        prompt=opts.config.prompt_fingerprint(),
        labels=opts.config.labels,
        multi_label=opts.config.multi_label,
        id_source=source.id_source,
    )


@dataclass(slots=True)
class Prepared:
    """A sink ready for a run: opened source, locked sink, done ids, and the manifest as written."""

    source: Source
    sink: Sink
    done: IdSet
    manifest: Manifest
    notes: list[str] = field(default_factory=list)
    relabeled: int = 0  # rows whose text changed, labeled again for --relabel-changed
    redo: IdSet = field(default_factory=IdSet)  # done ids to label again (a dry run keeps them in `done`)
    dropped: IdSet = field(default_factory=IdSet)  # ids whose labels this run dropped (--relabel-changed)

    def plan_dedupe(self, opts: RunOptions, stop: Callable[[], bool] | None = None) -> Dedupe:
        """Read the input and the sink once for the texts that repeat (run/dedupe.py); the input starts over.
        Blocking (a second or so per 200k rows): call it from a thread. Once `stop()` is true it reads no more and
        plans only what it read, which is enough for a run that is stopping (it sends nothing new)."""
        shard = opts.shard if opts.shard is not None and opts.shard.count > 1 else None
        outputs = [f.name for f in opts.config.outputs]
        columns = ["id", "label", "confidence", "model", "text_sha", *outputs]
        redo = self.redo if len(self.redo) else None
        key = key_of(opts.dedupe_match)

        def todo(row: Row) -> bool:
            done = row.id in self.done and not (redo is not None and row.id in redo)
            return not (row.problem or done or (shard is not None and not shard.holds_key(key(row))))

        batches = itertools.takewhile(lambda _: stop is None or not stop(), self.source.batches())
        rows = (row for batch in batches for row in batch if todo(row))
        # Sibling shards' saved records too: what any shard labeled before this run starts is copied, not sent.
        sinks = (
            [self.sink]
            if shard is None
            else [open_sink(opts.output, Shard(i, shard.count)) for i in range(shard.count)]
        )
        records = iter(()) if opts.restart else itertools.chain.from_iterable(s.iter_records(columns) for s in sinks)
        if stop is not None:
            records = itertools.takewhile(lambda _: not stop(), records)
        dedupe = Dedupe.plan(rows, records, outputs=outputs, matching=opts.dedupe_match)
        self.source.close()
        self.source.open()
        return dedupe

    def close(self) -> None:
        """Close the input and release the lock (after a dry run, which opened none of the sink's files)."""
        self.source.close()
        self.sink.meta.unlock()

    async def finish(self, then: Callable[[], None] | None = None) -> None:
        """Close the input and the sink's files, run `then` (still holding the lock), release the lock: the one
        teardown of everything that wrote to a sink, whatever ended it."""
        self.source.close()
        try:
            with contextlib.suppress(LabelstreamError):  # a sink that cannot close has said so already
                await self.sink.close()
            if then is not None:
                then()
        finally:
            self.sink.meta.unlock()


def prepare_run(opts: RunOptions, *, dry_run: bool = False) -> Prepared:
    """Open the input and make the sink ready; a dry run checks the same things and changes nothing."""
    if opts.restart and opts.shard is not None:
        raise UsageError(
            "--skip_labeled False would start one shard over while the others keep theirs. Move the output "
            "aside (or use a new --output) and run every shard again; --procs N --skip_labeled False does both."
        )
    source = open_source(opts)
    source.open()
    sink = open_sink(opts.output, opts.shard)
    try:
        return _prepare(opts, source, sink, dry_run=dry_run)
    except BaseException:
        source.close()
        sink.meta.unlock()
        raise


def _prepare(opts: RunOptions, source: Source, sink: Sink, *, dry_run: bool) -> Prepared:
    notes: list[str] = []
    claimed = sink.meta.claims()
    if not dry_run:
        # Lock first, so a run still writing this sink is never moved aside from under it; the lock file
        # moves with the old side files, so take a fresh one on the new folder afterwards.
        sink.meta.lock()
        if opts.restart:
            # Never move a sharded output aside from under its shards (--procs N --skip_labeled False does it
            # with every shard's lock held).
            try:
                check_layout(opts.output, None)
            except SinkMismatchError:
                sink.meta.unlock()
                sink.meta.withdraw(claimed)
                raise
            backup = move_aside(opts.output)
            sink.meta.unlock()
            sink.meta.lock()
            if backup is not None:
                notes.append(f"moved the previous output to {backup} (--skip_labeled False)")
    if not (opts.restart and dry_run):
        # After the lock: a run claims its place first, then looks for runs of another layout (layout.py).
        try:
            check_layout(opts.output, opts.shard)
        except SinkMismatchError:
            if not dry_run:
                sink.meta.unlock()
                sink.meta.withdraw(claimed)
            raise
    fresh = opts.restart and dry_run  # the real run would move the sink aside and start empty
    done = IdSet() if fresh else sink.load_done(repair=not dry_run)
    notes.extend(sink.notes)
    identity = identity_of(opts, source)
    has_rows = not fresh and (len(done) > 0 or sink.has_rows())
    manifest = sink.meta.check_identity(identity, has_rows=has_rows, force=opts.force, sink_name=sink.meta.what)
    if opts.shard is not None and not has_rows and not opts.force:
        _check_siblings(opts, opts.shard, identity)
    notes.extend(_input_notes(opts, source, manifest))
    outputs = [(f.name, f.kind) for f in opts.config.outputs]
    sink.bind_schema(source.carry, multi_label=opts.config.multi_label, outputs=outputs)
    prepared = Prepared(source, sink, done, manifest, notes)
    if opts.relabel_changed and len(done):
        _relabel_changed(prepared, dry_run=dry_run)
    manifest.input = {
        "id_column": source.id_column,
        "text_column": opts.config.text_column,
        "template": opts.config.template,
        "encoding": source.encoding,
        "delimiter": source.delimiter,
        "format": source.format,
        "file": source.file.fingerprint(),
        # The task file, so that `batch ingest` can validate results without being told again.
        "config": str(Path(opts.config.source).resolve()) if Path(opts.config.source).is_file() else None,
    }
    if opts.shard is not None and opts.shard.count > 1:
        # Rows may have moved between shards since they were labeled (sharding.py): skip ids done in any.
        prepared.done = all_done(opts, opts.shard)
    if not dry_run:
        manifest.runs.append({"started_at": now_iso(), "model": opts.model, "shard_key": shard_key(opts)})
        sink.meta.write_manifest(manifest)
        if opts.shard is not None:
            check_shard_key(opts, opts.shard)
    return prepared


def _relabel_changed(prepared: Prepared, *, dry_run: bool) -> None:
    """--relabel-changed: find the done rows whose text changed; a real run drops their labels first."""
    source, sink = prepared.source, prepared.sink
    changed = changed_ids(source, prepared.done)
    prepared.relabeled = len(changed)
    if len(changed) and not dry_run:
        # Drop first, then label: a crash in between leaves those rows unlabeled, never twice in the sink.
        sink.drop_ids(changed)
        prepared.done, prepared.dropped = sink.load_done(), changed
        prepared.notes.append(f"--relabel-changed: dropped the labels of {len(changed):,} rows whose text changed")
    else:
        prepared.redo = changed
    source.close()
    source.open()


def _check_siblings(opts: RunOptions, shard: Shard, identity: Identity) -> None:
    """A shard that has labeled nothing yet still joins an output whose other shards fixed its setup."""
    for index in range(shard.count):
        if index == shard.index:
            continue
        sibling = open_sink(opts.output, Shard(index, shard.count))
        recorded = sibling.meta.read_manifest()
        if recorded is None or recorded.identity is None or not sibling.has_rows():
            continue
        if diffs := identity.differences(recorded.identity):
            raise SinkMismatchError(
                f"{sibling.meta.what} was labeled with {recorded.identity.model} and prompt "
                f"{recorded.identity.prompt}; this shard differs: {'; '.join(diffs)}. All shards of one output use "
                "one setup: use a new --output, or --force to mix them."
            )
        return


def _input_notes(opts: RunOptions, source: Source, manifest: Manifest) -> list[str]:
    notes = []
    cfg = opts.config
    if cfg.id_column and source.id_column is None:
        notes.append(
            f"id column {cfg.id_column!r} is not in the input; ids are content hashes of the text "
            "(stable across runs; identical texts share one label)"
        )
    if source.missing_carry:
        notes.append(f"carry columns {list(source.missing_carry)} are not in the input; left out")
    before = manifest.input.get("file") if manifest.runs else None
    if isinstance(before, dict):
        with contextlib.suppress(OSError):
            now = source.file.fingerprint()
            if before.get("path") != now["path"]:
                notes.append(
                    f"this sink was labeled from {before.get('path')}; this run reads {now['path']} "
                    "(allowed: ids already in the sink are skipped)"
                )
            elif before.get("head_sha") != now["head_sha"]:
                notes.append(f"{opts.input} has changed since the last run (its first lines differ)")
    return notes


def changed_ids(source: Source, done: IdSet) -> IdSet:
    """Done ids whose text in the input differs from the text they were labeled with (one pass over the input)."""
    changed = IdSet()
    for batch in source.batches():
        for row in batch:
            if row.problem:
                continue
            tag = done.tag_of(row.id)
            if tag and tag != sha_tag(row.sha):
                changed.add(row.id)
    return changed


class Verdict(Enum):
    """What a run does with one input row."""

    DONE = "done"  # already in the sink
    REPEAT = "repeat"  # the same id (and text) came earlier in this input
    CONFLICT = "conflict"  # the same id came earlier with different text: labeled once, by the first
    PROBLEM = "problem"  # unusable (empty text, bad bytes, ragged): dead-lettered without a request
    OTHER_SHARD = "other_shard"  # another shard labels it (--shard)
    HELD = "held"  # --max-cost cannot cover it: left for the next run, and the gate is full from now on
    COPY = "copy"  # its text was sent before (or is in the sink): it gets a copy of that record (run/dedupe.py)
    SEND = "send"


class RowGate:
    """Sorts input rows for a run; counts what it saw into `stats`. `full` once `max_rows` rows were let through,
    or once `admit` (the run's budget) refused a row.

    Problem rows do not count against `max_rows`: they cost no request, and a file whose first N rows are
    unusable must still move forward batch by batch.
    """

    def __init__(
        self,
        done: IdSet,
        stats: RunStats,
        max_rows: int | None,
        *,
        redo: IdSet | None = None,
        dropped: IdSet | None = None,
        shard: Shard | None = None,
        admit: Callable[[Row], bool] | None = None,
        dedupe: Dedupe | None = None,
    ) -> None:
        self.done = done
        self.dedupe = dedupe
        self.copies = 0
        self.admit = admit
        self.held = False  # `admit` refused a row: nothing more passes
        self.shard = shard if shard is not None and shard.count > 1 else None
        self.redo = redo if redo is not None and len(redo) else None
        self.dropped = dropped if dropped is not None and len(dropped) else None
        self.seen = IdSet()
        self.elsewhere = IdSet()  # sharded by text: ids whose first row went to another shard
        self.stats = stats
        self.max_rows = max_rows
        self.sent = 0
        self.problems = 0

    @property
    def full(self) -> bool:
        """Whether --limit has been reached, or the budget refused a row."""
        return self.held or (self.max_rows is not None and self.sent + self.copies >= self.max_rows)

    @property
    def admitted(self) -> int:
        """Rows this run finishes (sent, or dead-lettered as problems)."""
        return self.sent + self.problems + self.copies

    def failure(self, row: Row) -> Failed:
        """The dead letter of a row sorted as PROBLEM (it costs no request), counted in the stats."""
        failure = problem_failure(row)
        self.stats.record_failure(failure.kind, row.id, failure.message)
        return failure

    def _holds(self, row: Row) -> bool:
        """Whether this shard labels `row`: by its text's dedupe key when deduping (sharding.py), else by id. The
        first row of an id decides: a later row with that id and another text goes where the first went."""
        assert self.shard is not None  # noqa: S101 - only asked of a shard
        if self.dedupe is None or row.problem:
            return self.shard.holds(row.id)
        if not self.shard.holds_key(self.dedupe.key(row)):
            self.elsewhere.add(row.id)
            return False
        return row.id in self.seen or row.id not in self.elsewhere

    def classify(self, row: Row) -> Verdict:
        """Decide what happens to `row` (call in input order, and not once `full`)."""
        stats = self.stats
        stats.read += 1
        if self.shard is not None and not self._holds(row):
            stats.other_shards += 1
            if self.dropped is not None and row.id in self.dropped:
                # Edited into another shard's text: that shard labels it, but may have read the done ids before
                # this run dropped it. Not "all labeled" until a run of it has (run/sharding.py).
                stats.unfinished += 1
            return Verdict.OTHER_SHARD
        tag = 0 if row.problem else sha_tag(row.sha)
        held = self.done.tag_of(row.id)
        if held is not None and not (self.redo is not None and row.id in self.redo):
            stats.skipped_done += 1
            if held and tag and held != tag:
                stats.changed += 1
            return Verdict.DONE
        copy = self.dedupe is not None and not row.problem and self.dedupe.is_copy(row)
        if self.admit is not None and not copy and not row.problem and row.id not in self.seen and not self.admit(row):
            self.held = True  # not this run's: the next run sends it
            stats.read -= 1
            return Verdict.HELD
        if not self.seen.add(row.id, tag):
            first = self.seen.tag_of(row.id)
            if first and tag and first != tag:
                stats.conflicts += 1
                if len(stats.conflict_samples) < 5:
                    stats.conflict_samples.append(f"{row.id} (line {row.line})")
                return Verdict.CONFLICT
            stats.duplicates += 1
            if len(stats.duplicate_samples) < 5:
                stats.duplicate_samples.append(f"{row.id} (line {row.line})")
            return Verdict.REPEAT
        if row.problem:
            self.problems += 1
            return Verdict.PROBLEM
        stats.truncated += row.truncated
        if copy:
            self.copies += 1
            return Verdict.COPY
        if self.dedupe is not None:
            self.dedupe.first(row)
        self.sent += 1
        return Verdict.SEND
