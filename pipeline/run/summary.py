"""The end-of-run summary: counts, failure rate, error samples by kind, speed, tokens, cost, what to run next."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.api.errors import REFUSED_ADVICE, refusal_advice
from pipeline.errors import ExitCode, LabelstreamError, clip
from pipeline.run.options import RunOptions
from pipeline.sinks.progress_file import RunState, worst_state
from pipeline.stats import RunStats, short_duration, short_number


@dataclass(frozen=True, slots=True)
class Summary:
    """What a run did; `exit_code` is OK when every row it tried is labeled, DEAD_LETTERS when some were not."""

    state: str
    input: str
    output: str
    dead_letters: str
    labeled: int
    failed: int
    saved: int
    skipped_done: int
    duplicates: int
    conflicts: int
    changed: int
    truncated: int
    retries: int
    rate_limited: int
    elapsed_s: float
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    model: str
    resume_command: str
    failures: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)
    duplicate_samples: list[str] = field(default_factory=list)
    conflict_samples: list[str] = field(default_factory=list)
    relabel_hint: bool = True  # False when --relabel-changed was given
    error: str | None = None
    cached_tokens: int = 0
    max_cost: float | None = None
    engine: str = "online"
    tier: str = "standard"  # the online calls' price tier
    standard_cost_usd: float | None = None  # the same tokens as standard online requests
    batches: int = 0
    submitted: int = 0
    in_batches: int = 0
    pending: int = 0
    unfinished: int = 0
    unavailable: int = 0  # flex: 429 resource_unavailable answers (retried; not rate limits)
    shard: str | None = None  # "1/4" for a run of one shard
    other_shards: int = 0  # input rows left to the other shards
    servers: dict[str, dict[str, int]] = field(default_factory=dict)  # url → rows, errors, backoffs (fleets)
    logprobs_unread: int = 0  # rows labeled without confidence although their reply carried logprobs
    refused: int = 0  # of `failed`: batch requests refused as sent, which re-runs do not send again unchanged
    refused_before: int = 0  # rows left out because their unchanged request was refused as sent before
    hedged: int = 0  # copies sent of the run's last stragglers
    timeouts: int = 0  # attempts abandoned without a reply in time (never counted as 429s)
    held: int = 0  # of those, the ones in clusters: overload, or a gateway holding requests
    unusable_replies: int = 0  # replies that gave no label (their tokens are in the totals: they are billed)
    unusable_tokens: int = 0
    abandoned: int = 0  # attempts left without a reply: timed out, or cut off by a stop (may still be billed)
    abandoned_cost_usd: float | None = None  # the most they may cost (part of cost_usd)
    gateway: str | None = None  # a gateway that named itself in its replies ("litellm")
    copies: int = 0  # of `labeled`: rows given the record of an identical text, without a request (dedupe)
    copy_saving_usd: float | None = None  # what their requests would have cost, at this run's mean per request

    @classmethod
    def of(
        cls,
        s: RunStats,
        *,
        opts: RunOptions,
        state: str,
        error: LabelstreamError | None,
        dead_letters: str,
        resume: str,
        engine: str = "online",
        servers: dict[str, dict[str, int]] | None = None,
    ) -> Summary:
        """Summarise a finished (or stopped) run from its counters."""
        return cls(
            state=state,
            input=str(opts.input),
            output=str(opts.output),
            dead_letters=dead_letters,
            labeled=s.labeled,
            failed=s.failed,
            saved=s.saved,
            skipped_done=s.skipped_done,
            duplicates=s.duplicates,
            conflicts=s.conflicts,
            changed=s.changed,
            truncated=s.truncated,
            retries=s.calls.retries,
            rate_limited=s.calls.rate_limited,
            elapsed_s=round(s.elapsed, 2),
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens,
            cost_usd=s.cost,
            model=s.model,
            resume_command=resume,
            failures=dict(s.failure_counts),
            samples={k: list(v) for k, v in s.failures.items()},
            duplicate_samples=list(s.duplicate_samples),
            conflict_samples=list(s.conflict_samples),
            relabel_hint=not opts.relabel_changed,
            error=error.message if error else None,
            cached_tokens=s.calls.cached_tokens,
            max_cost=opts.max_cost,
            engine=engine,
            tier=s.tier,
            standard_cost_usd=s.standard_cost,
            batches=s.batches,
            submitted=s.submitted,
            in_batches=s.in_batches,
            pending=s.pending,
            unfinished=s.unfinished,
            unavailable=s.calls.unavailable,
            shard=opts.shard.label if opts.shard else None,
            other_shards=s.other_shards,
            servers=servers or {},
            logprobs_unread=s.calls.logprobs_unread,
            refused=s.refused,
            refused_before=s.refused_before,
            hedged=s.calls.hedged,
            timeouts=s.calls.timeouts,
            held=s.calls.held,
            unusable_replies=s.calls.unusable_replies,
            unusable_tokens=s.calls.unusable_tokens,
            abandoned=s.calls.abandoned,
            abandoned_cost_usd=s.abandoned_cost,
            gateway=s.calls.gateway,
            copies=s.copies,
            copy_saving_usd=s.cost * s.copies / (s.labeled - s.copies) if s.cost and s.labeled > s.copies else None,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Summary:
        """A summary from its JSON form (`as_dict`), e.g. a shard's, read back from its progress file."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for name in ("input", "output", "dead_letters", "model", "resume_command"):  # older progress files
            values.setdefault(name, "")
        return cls(**values)

    @property
    def exit_code(self) -> ExitCode:
        """OK: all labeled (or, with --no-wait, sent); DEAD_LETTERS: some rows dead-lettered, back unprocessed, or
        left out because their request was refused before."""
        return ExitCode.DEAD_LETTERS if self.failed or self.unfinished or self.refused_before else ExitCode.OK

    @property
    def failure_rate(self) -> float:
        """Failed share of the rows this run finished."""
        finished = self.labeled + self.failed
        return self.failed / finished if finished else 0.0

    @property
    def rows_per_s(self) -> float:
        """Finished rows per second of wall time."""
        return (self.labeled + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cache_hit_share(self) -> float:
        """Share of the prompt tokens the provider served from its prompt cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form (in the progress file and `status --json`): every field, costs rounded, and the rates."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("cost_usd", "standard_cost_usd", "abandoned_cost_usd"):
            data[name] = None if data[name] is None else round(data[name], 6)
        data["failure_rate"] = round(self.failure_rate, 4)
        data["rows_per_s"] = round(self.rows_per_s, 2)
        data["cache_hit_share"] = round(self.cache_hit_share, 4)
        return data

    def render(self, *, with_error: bool = True) -> str:
        """The human summary printed at the end of a run (without the error when the caller shows it next)."""
        lines = [self._head_line(), self._token_line(), *self._attempt_lines()]
        lines.extend(self._batch_lines() + self._confidence_lines() + self._hedge_lines())
        lines.extend(self._row_lines() + self._failure_lines() + self._server_lines())
        where = f"{self.output}, shard {self.shard}" if self.shard else self.output
        lines.append(f"  sink: {where} (+{self.saved:,} rows this run)")
        if self.error and with_error:
            lines.append(f"  stopped because: {self.error}")
        lines.extend(self._next_lines())
        return "\n".join(lines)

    def _head_line(self) -> str:
        """How the run ended, and its counts and speed."""
        heads: dict[str, str] = {RunState.FAILED: "stopped", RunState.BUDGET: "stopped at --max-cost"}
        head = heads.get(self.state, self.state)
        if self.state == RunState.DONE and self.pending:
            head = "submitted"
        return (
            f"labelstream {head}: {self.labeled:,} labeled, {self.failed:,} failed "
            f"({self.failure_rate:.1%}), {self.skipped_done:,} already in the sink, "
            f"in {short_duration(self.elapsed_s)} ({self.rows_per_s:.1f} rows/s)"
        )

    def _token_line(self) -> str:
        """Tokens, what they cost (against --max-cost, and at standard prices when cheaper), and retries."""
        cost = f" ≈ ${self.cost_usd:.4f}" if self.cost_usd is not None else ", no price in the price table"
        budget = f" of --max-cost ${self.max_cost:g}" if self.max_cost is not None and self.cost_usd is not None else ""
        priced = self.model
        standard = self.standard_cost_usd
        if self.cost_usd is not None and standard is not None and standard - self.cost_usd > 5e-7:
            where = {"batch": "batch", "auto": "online and batch"}.get(self.engine, self.tier)
            priced += f" at {where} prices; ${standard:.4f} as standard online requests"
        causes = [f"{self.rate_limited} after 429"]
        causes += [f"{self.timeouts} after timeouts"] if self.timeouts else []
        causes += [f"{self.unavailable} after flex had no capacity"] if self.unavailable else []
        return (
            f"  tokens: {short_number(self.prompt_tokens)} prompt ({self.cache_hit_share:.0%} from the prompt cache) + "
            f"{short_number(self.completion_tokens)} completion{cost}{budget} ({priced}); "
            f"retries: {self.retries} ({', '.join(causes)})"
        )

    def _row_lines(self) -> list[str]:
        """What the input held besides rows to label: repeated ids, edited rows, cut texts."""
        lines = []
        if self.duplicates:
            examples = ", ".join(self.duplicate_samples[:3])
            lines.append(f"  {self.duplicates:,} repeated ids skipped (each labeled once), e.g. {examples}")
        if self.conflicts:
            examples = ", ".join(self.conflict_samples[:3])
            lines.append(
                f"  {self.conflicts:,} ids repeated with different text: only the first row of each was labeled, "
                f"and export gives the others its label. Make the ids unique. E.g. {examples}"
            )
        if self.changed:
            hint = " Re-run with --relabel-changed to label them again." if self.relabel_hint else ""
            lines.append(f"  {self.changed:,} rows already in the sink now have different text.{hint}")
        if self.copies:
            saving = f", ≈ ${self.copy_saving_usd:.4f} saved" if self.copy_saving_usd is not None else ""
            lines.append(f"  {self.copies:,} rows repeated a text sent once: copied (copied_from), no request{saving}")
        if self.truncated:
            lines.append(f"  {self.truncated:,} texts were longer than max_chars and were cut (see 'truncated')")
        return lines

    def _server_lines(self) -> list[str]:
        """Rows, errors and back-offs per server of a fleet."""
        if len(self.servers) <= 1:
            return []
        lines = ["  rows per server:"]
        for url, counts in sorted(self.servers.items()):
            trouble = f", {counts.get('errors', 0):,} errors, backed off {counts.get('backoffs', 0):,}×"
            lines.append(f"    {url}: {counts.get('rows', 0):,} rows{trouble if counts.get('errors') else ''}")
        return lines

    def _next_lines(self) -> list[str]:
        """What to run next: resume, collect batches, or retry the dead letters."""
        if self.state != RunState.DONE:
            return [f"  resume with: {self.resume_command}"]
        if self.pending:
            return [
                f"  collect the results (and send what is left) with: {self.resume_command}\n"
                f"  see how the batches are doing: labelstream batch status {self.output}"
            ]
        if self.failed:
            retry = self.failed - sum(n for kind, n in self.failures.items() if kind in REFUSED_ADVICE)  # same again
            return [
                f"  dead letters: {self.dead_letters}"
                + (f"; to retry the {retry:,} failed rows, re-run: {self.resume_command}" if retry else "")
            ]
        if self.unfinished:
            return [f"  to send the {self.unfinished:,} unprocessed rows again, re-run: {self.resume_command}"]
        return []

    def _failure_lines(self) -> list[str]:
        """Dead letters by kind, most frequent first, with one sample each (up to five kinds)."""
        kinds = sorted(self.failures.items(), key=lambda kv: -kv[1])
        shown = [
            f"    {kind} ×{n}: {clip(one, 160)}{refusal_advice(kind)}"
            for kind, n in kinds
            for one in self.samples.get(kind, [])[:1]
        ]
        return ["  failures by kind:", *shown[:5]] if self.failures else []

    def _attempt_lines(self) -> list[str]:
        """What attempts that gave no label cost, and what clustered timeouts mean."""
        bound = f"; up to ${self.abandoned_cost_usd:.4f} of the cost" if self.abandoned_cost_usd else ""
        holding = "the server (or a gateway in front of it) stalled or held requests: paused, slowed, no retry used"
        if self.gateway == "litellm":
            holding = "the gateway is holding requests: set `num_retries: 0` in its router settings (429 at once)"
        return [line for show, line in (
                (self.unusable_replies, f"  {self.unusable_replies:,} unusable replies, billed too: their "
                 f"{short_number(self.unusable_tokens)} tokens are in the totals above"),
                (self.abandoned, f"  {self.abandoned:,} attempts abandoned without a reply (may still be billed{bound}"
                 ", counted at their prompt and max_tokens as an upper bound)"),
                (self.held, f"  {self.held:,} attempts timed out in clusters: {holding}"),
            ) if show
        ]  # fmt: skip

    def _hedge_lines(self) -> list[str]:
        if not self.hedged:
            return []
        return [f"  {self.hedged:,} hedged: the last stragglers got a second request (the first reply won)"]

    def _confidence_lines(self) -> list[str]:
        if not self.logprobs_unread:
            return []
        return [
            f"  {self.logprobs_unread:,} rows have no confidence although their replies carried logprobs: the "
            "tokens do not spell the reply text (please report it with a sample reply)"
        ]

    def _batch_lines(self) -> list[str]:
        if self.engine not in ("batch", "auto"):
            return []
        lines = [
            f"  batches: {self.submitted:,} rows sent in {self.batches} new batches; {self.pending:,} rows still at "
            f"the provider; {self.in_batches:,} rows skipped because a running batch holds them"
        ]
        if self.unfinished:
            lines.append(
                f"  {self.unfinished:,} rows came back unprocessed (their batch expired or was cancelled); "
                "the next run sends them again"
            )
        if self.refused or self.refused_before:
            now = f"{self.refused:,} rows were refused as sent" if self.refused else ""
            before = f"{self.refused_before:,} rows left out, refused as sent before" if self.refused_before else ""
            lines.append(
                f"  {' and '.join(x for x in (now, before) if x)} (see failures and the dead letters): the same "
                "request fails the same way, so re-runs leave them out until it changes: shorten the text "
                "(max_chars in the task file), use a model with a longer context, or fix what the message names "
                "(after changing the server instead, re-run with --retry-refused)"
            )
        return lines


_SUMMED = (
    "labeled", "failed", "saved", "skipped_done", "duplicates", "conflicts", "changed", "truncated", "retries",
    "rate_limited", "prompt_tokens", "completion_tokens", "hedged", "timeouts", "held", "unusable_replies",
    "unusable_tokens", "abandoned", "copies", "cached_tokens", "unavailable", "logprobs_unread", "batches",
    "submitted", "in_batches", "pending", "unfinished", "refused", "refused_before",
)  # fmt: skip


def combine(
    parts: Sequence[Summary],
    *,
    output: str,
    dead_letters: str,
    resume: str,
    elapsed_s: float,
    max_cost: float | None = None,
) -> Summary:
    """One summary for the shards of one run (`--procs`): counts added up, the worst state, the first error;
    `max_cost` is the whole run's cap (each shard had its part of it)."""
    if not parts:
        raise ValueError("nothing to combine")

    def money(name: str) -> float | None:  # what the parts that know it add up to (None: no part has a price)
        known = [v for v in (getattr(p, name) for p in parts) if v is not None]
        return sum(known) if known else None

    totals = {name: sum(getattr(p, name) for p in parts) for name in _SUMMED}
    failures: dict[str, int] = {}
    samples: dict[str, list[str]] = {}
    servers: dict[str, dict[str, int]] = {}
    for part in parts:
        for kind, n in part.failures.items():
            failures[kind] = failures.get(kind, 0) + n
            samples.setdefault(kind, []).extend(part.samples.get(kind, [])[: 3 - len(samples.get(kind, []))])
        for url, counts in part.servers.items():
            into = servers.setdefault(url, {})
            for key, n in counts.items():
                into[key] = into.get(key, 0) + n
    return Summary(
        state=worst_state([p.state for p in parts]),
        max_cost=max_cost,
        input=parts[0].input,
        output=output,
        dead_letters=dead_letters,
        elapsed_s=round(elapsed_s, 2),
        model=parts[0].model,
        resume_command=resume,
        failures=failures,
        samples=samples,
        duplicate_samples=[x for p in parts for x in p.duplicate_samples][:5],
        conflict_samples=[x for p in parts for x in p.conflict_samples][:5],
        relabel_hint=parts[0].relabel_hint,
        error=next((p.error for p in parts if p.error), None),
        gateway=next((p.gateway for p in parts if p.gateway), None),
        servers=servers,
        cost_usd=money("cost_usd"),
        standard_cost_usd=money("standard_cost_usd"),
        abandoned_cost_usd=money("abandoned_cost_usd"),
        copy_saving_usd=money("copy_saving_usd"),
        **totals,
    )
