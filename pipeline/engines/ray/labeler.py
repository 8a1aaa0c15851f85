"""The Ray Data stage: rows in, sink records out, with labelstream's client and many requests per actor.

A batch reaching `Labeler` has the row columns below (`rows_table` builds them from a user's dataset, the
CLI engine from its own CSV reader). Every row of the batch that the job's `SharedLimit` lets it claim (an
id once per job; none once the run stops) is labeled concurrently on the actor's event loop, under the
actor's window and the job's `SharedLimit`; Ray Data runs several batches of an actor at once, so an actor
keeps up to its whole window in flight. Labeled rows come out as sink records (the
schema of a labelstream Parquet sink); failed rows become dead letters and do not come out, so a later
run sends them again, exactly as with the CLI.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.input.sources import content_id
from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy
from pipeline.results import RECORD_FIELDS, Failed, Labeled, Row, problem_failure
from pipeline.sinks.meta import append_dead_letters
from pipeline.sinks.storage import ObjectStore, as_path, object_uri
from pipeline.task.config import TaskConfig

# Columns of the rows a Labeler takes; every other column is carried into the records.
ROW_COLUMNS: Final = ("id", "text", "line", "truncated", "problem")


def rows_table(batch: pa.Table, config: TaskConfig, carry: Sequence[str]) -> pa.Table:
    """A user's columns → the Labeler's row columns: id, text (template applied, cut at max_chars), carry."""
    texts: list[str] = []
    problems: list[str | None] = []
    columns = {name: batch.column(name).to_pylist() for name in config.template_columns}
    for i in range(batch.num_rows):
        if config.template is None:
            text = _text(columns[config.text_column][i])
        else:
            text = config.template.format_map({c: _text(columns[c][i]) for c in config.template_columns})
        texts.append(text)
        problems.append(None if text.strip() else "empty_text")
    if config.id_column and config.id_column in batch.column_names:
        ids = [_text(v).strip() for v in batch.column(config.id_column).to_pylist()]
    else:
        ids = [content_id(t) for t in texts]
    problems = [p or (None if i else "missing_id") for p, i in zip(problems, ids, strict=True)]
    out = {
        "id": pa.array(ids, pa.string()),
        "text": pa.array([t[: config.max_chars] for t in texts], pa.string()),
        "line": pa.array([0] * batch.num_rows, pa.int64()),
        "truncated": pa.array([len(t) > config.max_chars for t in texts], pa.bool_()),
        "problem": pa.array(problems, pa.string()),
    }
    for name in carry:
        out[name] = pc.cast(batch.column(name), pa.string())
    return pa.table(out)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class Labeler:
    """A Ray Data callable class: one labelstream client per actor (see the module docstring)."""

    def __init__(
        self,
        *,
        config: TaskConfig,
        model: str,
        base_url: str | None,
        limits: LimitSettings,
        retry: RetryPolicy,
        shared: Any,
        schema: pa.Schema,
        dead_letters: str | None,
        run_id: str,
        service_tier: str | None = None,
        storage: dict[str, str] | None = None,
    ) -> None:
        self.config, self.model, self.base_url = config, model, base_url
        self.limits, self.retry, self.shared, self.schema = limits, retry, shared, schema
        self.dead_letters = as_path(dead_letters) if dead_letters else None
        self.storage = storage  # the object store's non-secret options, when the dead letters go there
        self._dead_batches = 0
        self._tag = os.urandom(4).hex()  # names this actor's dead-letter objects apart from its siblings'
        self.run_id, self.service_tier = run_id, service_tier
        self.outputs = frozenset(f.name for f in config.outputs)
        self.carry = [f.name for f in schema if f.name in set(schema.names) - set(RECORD_FIELDS) - self.outputs]
        self._client: Any = None
        self._reported: dict[str, int] = {}

    def _start(self) -> Any:
        # On the actor's event loop: the HTTP session and the limiter's primitives belong to it.
        from pipeline.api.client import LabelClient  # noqa: PLC0415 - the SDK loads in the actor, not the driver
        from pipeline.engines.ray.limit import SharedLimiter  # noqa: PLC0415
        from pipeline.run.options import resolve_credentials  # noqa: PLC0415
        from pipeline.task.prompt import Prompt  # noqa: PLC0415

        # The key comes from the actor's environment (never through Ray's task arguments, which Ray stores).
        api_key, base_url = resolve_credentials(None, self.base_url)
        self._client = LabelClient(
            prompt=Prompt(self.config),
            limiter=SharedLimiter(self.limits, self.shared),
            model=self.model,
            api_key=api_key,
            base_url=base_url,
            retry=self.retry,
            service_tier=self.service_tier,
        )
        return self._client

    async def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.sinks.parquet import labeled_table  # noqa: PLC0415

        client = self._client or self._start()
        # One remote call a batch: repeated ids (across actors too) and a stopping run are the job's to know.
        claimed = await self.shared.claim.remote(batch.column("id").to_pylist())
        rows = [row for row, mine in zip(_rows(batch, self.carry), claimed, strict=True) if mine]
        results = await asyncio.gather(*(self._one(client, row) for row in rows))
        labeled = [r for r in results if isinstance(r, Labeled)]
        failed = [r for r in results if isinstance(r, Failed)]
        if failed and self.dead_letters is not None:
            await asyncio.to_thread(self._dead_letter, self.dead_letters, failed)
        self._report(client, labeled, failed)
        return labeled_table(labeled, self.schema, self.outputs)

    def _dead_letter(self, where: Path, failed: list[Failed]) -> None:
        uri = object_uri(where)
        if uri is None:
            append_dead_letters(where, failed, self.run_id)
            return
        from pipeline.sinks.objects import put_dead_letters  # noqa: PLC0415 - only for outputs on object storage

        self._dead_batches += 1
        store = ObjectStore(uri, self.storage or {})
        put_dead_letters(store, where, failed, self.run_id, tag=self._tag, number=self._dead_batches)

    async def _one(self, client: Any, row: Row) -> Labeled | Failed:
        if row.problem:
            return problem_failure(row)
        result: Labeled | Failed = await client.label(row)
        return result

    def _report(self, client: Any, labeled: list[Labeled], failed: list[Failed]) -> None:
        calls = client.stats
        now = {"retries": calls.retries, "rate_limited": calls.rate_limited}
        counts = {name: value - self._reported.get(name, 0) for name, value in now.items()}
        self._reported = now
        counts["labeled"] = len(labeled)
        counts["failed"] = len(failed)
        counts["prompt_tokens"] = sum(i.prompt_tokens for i in labeled)
        counts["completion_tokens"] = sum(i.completion_tokens for i in labeled)
        counts["cached_tokens"] = sum(i.cached_tokens for i in labeled)
        for item in failed:
            counts[f"failure:{item.kind}"] = counts.get(f"failure:{item.kind}", 0) + 1
        self.shared.add.remote(counts)


def _rows(batch: pa.Table, carry: Sequence[str]) -> list[Row]:
    columns: Mapping[str, list[Any]] = {name: batch.column(name).to_pylist() for name in (*ROW_COLUMNS, *carry)}
    return [
        Row(
            id=columns["id"][i],
            text=columns["text"][i],
            line=columns["line"][i] or 0,
            carry={name: _text(columns[name][i]) for name in carry},
            problem=columns["problem"][i],
            detail=_PROBLEMS.get(columns["problem"][i] or "", ""),
            truncated=bool(columns["truncated"][i]),
        )
        for i in range(batch.num_rows)
    ]


_PROBLEMS: Final = {"empty_text": "the text is empty or only whitespace", "missing_id": "the id column is empty"}
