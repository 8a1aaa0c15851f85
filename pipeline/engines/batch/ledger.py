"""The batch engine's ledger: every request file and batch it made for a sink, in `OUT.meta/batches.json`.

One submission is one request file and (once created) one batch. Its state moves one way, and each move is
written (synced) before the step that depends on it starts:

    prepared ──upload──▶ uploaded ──(record "creating")──▶ creating ──create──▶ submitted ──collect──▶ collected

- prepared: the request and rows files are on disk; nothing is at the provider yet. Such a submission holds no
  rows: a run that cannot upload it (or whose create is refused) discards it, and the next run discards any
  that a crash left and plans their rows afresh (`Ledger.discard`), so no one is told rows are at the provider
  that never got there.
- uploaded: the input file id is recorded; no batch was asked for.
- creating: a create request may have reached the provider. A crash here is the one gap a record cannot
  close, so the create carries the submission id in the batch's metadata, and a restart looks the batch up
  by it before it creates anything (`submit.find_batch`).
- submitted: the batch id is recorded; the rows wait at the provider.
- collected: the batch ended and its results are in the sink (or dead letters); its rows are free again,
  so those that came back without a label are sent by the next run.

Rows of every submission past `prepared` and not yet collected are "held" (in a live batch, or possibly so):
no run sends them again.
Nothing here talks to the network, so `labelstream status` can read the ledger cheaply.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.engines.batch.files import read_row_ids
from pipeline.errors import BatchError, SinkError, StorageError
from pipeline.input.ids import IdSet
from pipeline.results import now_iso
from pipeline.sinks.meta import SinkMeta

PREPARED: Final = "prepared"
UPLOADED: Final = "uploaded"
CREATING: Final = "creating"
SUBMITTED: Final = "submitted"
COLLECTED: Final = "collected"
# The batch's own statuses after which nothing more will come.
ENDED: Final = frozenset({"completed", "failed", "expired", "cancelled"})
# The metadata key a batch carries its submission id under.
SUBMISSION_KEY: Final = "labelstream_submission"
_VERSION: Final = 1


@dataclass(slots=True)
class Submission:
    """One request file and the batch made from it."""

    id: str
    model: str
    requests: int
    bytes: int
    state: str = PREPARED
    endpoint: str | None = None  # where it was sent: its batch exists only there
    input_file_id: str | None = None
    batch_id: str | None = None
    create_sent_at: int | None = None  # unix seconds when a create request was (about to be) sent
    status: str | None = None  # the provider's last word on the batch
    counts: dict[str, int] = field(default_factory=dict)  # its request_counts
    outcome: dict[str, int] = field(default_factory=dict)  # labeled, failed, unfinished, skipped once collected
    errors: list[str] = field(default_factory=list)
    prepared_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)

    @property
    def live(self) -> bool:
        """Whether it is still in play (not yet collected)."""
        return self.state != COLLECTED

    @property
    def held(self) -> bool:
        """Whether its rows are at the provider, or may be: uploaded and not yet collected."""
        return self.state not in (PREPARED, COLLECTED)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Submission:
        """Read an entry written by this or a later version (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def new_submission_id() -> str:
    """A fresh submission id: unique across runs, machines and sinks."""
    return f"sub_{uuid.uuid4().hex[:20]}"


class Ledger:
    """The submissions of one sink; only the run holding the sink's lock changes it."""

    def __init__(self, meta: SinkMeta) -> None:
        self.meta = meta
        self.submissions: list[Submission] = []
        try:
            raw = orjson.loads(meta.read_bytes(meta.batches_path))
        except FileNotFoundError:
            return
        except orjson.JSONDecodeError:
            raise SinkError(
                f"{meta.batches_path} is damaged, so it is unknown which rows are in running batches. Check on "
                "them at the provider, then move the file aside to start the batch records over."
            ) from None
        entries = raw.get("submissions") if isinstance(raw, dict) else None
        self.submissions = [Submission.from_json(e) for e in entries or [] if isinstance(e, dict)]

    @property
    def live(self) -> list[Submission]:
        """Submissions not yet collected, oldest first."""
        return [s for s in self.submissions if s.live]

    @property
    def held(self) -> list[Submission]:
        """Submissions whose rows are (or may be) at the provider, oldest first."""
        return [s for s in self.submissions if s.held]

    def ensure(self) -> None:
        """Create the folder for request and rows files."""
        self.meta.ensure()
        try:
            self.meta.batches_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create {self.meta.batches_dir}: {exc.strerror}. Check the --output folder."
            ) from None

    def save(self, *, durable: bool = True) -> None:
        """Write the ledger atomically (`durable`: synced before this returns, for records a step depends on)."""
        self.meta.ensure()
        data = {"version": _VERSION, "submissions": [asdict(s) for s in self.submissions]}
        self.meta.write_json_atomic(self.meta.batches_path, data, durable=durable)

    def record(self, sub: Submission, **changes: Any) -> None:
        """Change a submission and write the ledger durably before the next step starts."""
        for name, value in changes.items():
            setattr(sub, name, value)
        sub.updated_at = now_iso()
        self.save()

    def add(self, sub: Submission) -> None:
        """Register a prepared submission (its files must be written already): its rows file is kept where the sink
        lives first, so the record never names rows a later run (on any machine) cannot read."""
        self.meta.keep_batch_file(self.rows_path(sub.id))
        self.submissions.append(sub)
        self.save()

    def requests_path(self, sub_id: str) -> Path:
        """Where a submission's request file lives."""
        return self.meta.batches_dir / f"{sub_id}.requests.jsonl"

    def rows_path(self, sub_id: str) -> Path:
        """Where a submission's rows file lives."""
        return self.meta.batches_dir / f"{sub_id}.rows.jsonl"

    def download_path(self, sub_id: str, what: str) -> Path:
        """Where a submission's output or error file is downloaded to."""
        return self.meta.batches_dir / f"{sub_id}.{what}.jsonl"

    def check_endpoint(self, where: str, sink_name: str) -> None:
        """Refuse to look for this sink's live batches at another endpoint than the one they were sent to."""
        for sub in self.live:
            if sub.endpoint and sub.state != PREPARED and sub.endpoint != where:
                raise BatchError(
                    f"{sink_name} has batches at {sub.endpoint} (e.g. {sub.batch_id or sub.id}), and this run uses "
                    f"{where}. Pass --base-url {sub.endpoint} to collect them; only if they are gone for good, move "
                    f"{self.meta.batches_path} aside: their rows are then sent again."
                )

    def discard(self, sub: Submission) -> None:
        """Forget a submission that never reached the provider (`prepared`), and delete its files."""
        if sub.state != PREPARED:
            raise BatchError(f"submission {sub.id} is {sub.state}: it may be at the provider, so it is kept")
        self.submissions.remove(sub)
        self.save()  # first the record, then the files: a crash in between leaves files `tidy` removes
        self.drop_files(sub)

    def live_ids(self) -> IdSet:
        """Ids of the rows that submissions hold (see `held`): no one sends them again."""
        ids = IdSet()
        for sub in self.held:
            for row_id in read_row_ids(self.rows_of(sub)):
                ids.add(row_id)
        return ids

    def rows_of(self, sub: Submission) -> Path:
        """A submission's rows file, ready to read (fetched from where the sink lives, if need be)."""
        path = self.rows_path(sub.id)
        self.meta.fetch_batch_file(path)
        return path

    def tidy(self) -> int:
        """Delete files no live submission owns (what a crash before registering, or after collecting, left)."""
        keep = {sub.id for sub in self.live}
        removed = 0
        for name in self.meta.batch_file_names():
            if name.lstrip(".").split(".", 1)[0] not in keep:
                with contextlib.suppress(OSError):
                    self.meta.drop_batch_file(self.meta.batches_dir / name)
                    removed += 1
        return removed

    def drop_files(self, sub: Submission, *, keep_rows: bool = False) -> None:
        """Delete a submission's files (the request file once it is uploaded; all once collected)."""
        paths = [self.requests_path(sub.id), self.download_path(sub.id, "output"), self.download_path(sub.id, "errors")]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if not keep_rows:
            self.meta.drop_batch_file(self.rows_path(sub.id))


def describe(sub: Submission) -> str:
    """One line about a submission, for status and the progress log."""
    counts = sub.counts
    done = f"{counts.get('completed', 0):,}/{counts.get('total', sub.requests):,} done" if counts else ""
    failed = f", {counts['failed']:,} failed" if counts.get("failed") else ""
    where = sub.batch_id or sub.input_file_id or "not uploaded"
    status = sub.status or sub.state
    return f"{sub.id} {where}: {status} {done}{failed}".rstrip()
