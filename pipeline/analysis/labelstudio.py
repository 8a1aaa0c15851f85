"""Label Studio round trip: tasks with the model's labels as predictions, the matching labeling config, and an
export's annotations read back as gold.

Formats, as Label Studio documents them for import and export (Basic Label Studio JSON):

- a task is `{"data": {...}, "predictions": [{"model_version", "score", "result": [region, ...]}]}`; a
  choices region is `{"from_name": CONTROL, "to_name": OBJECT, "type": "choices", "value": {"choices": [...]}}`,
  and `score` is what the Data Manager sorts tasks by (here: the label's confidence);
- the labeling config is XML: a `<Text name="text" value="$text"/>` object and a `<Choices>` control named
  `label` over it, `choice="single-radio"` or `"multiple"`, one `<Choice value=...>` per label;
- a JSON export is the list of tasks with `annotations` (each with `result` regions like the predictions',
  `was_cancelled`, `updated_at`), and `data` as imported, so `data.labelstream_id` leads back to the sink's id.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from xml.sax.saxutils import quoteattr

import orjson

from pipeline.analysis.export import input_reader
from pipeline.errors import InputError, SinkError, StorageError, UsageError
from pipeline.input.ids import IdMap
from pipeline.sinks import Manifest, open_shards
from pipeline.task.config import TaskConfig

CONTROL: Final = "label"  # the <Choices> control's name: from_name of every region
OBJECT: Final = "text"  # the <Text> object's name and its data key: to_name of every region
ID_KEY: Final = "labelstream_id"  # data key that carries the sink's row id there and back
_SHOWN: Final = 10


def labeling_config(config: TaskConfig) -> str:
    """The Label Studio labeling config (XML) for a task file's labels, single- or multi-label."""
    kind = "multiple" if config.multi_label else "single-radio"
    lines = [
        "<View>",
        f'  <Text name="{OBJECT}" value="${OBJECT}"/>',
        f'  <Choices name="{CONTROL}" toName="{OBJECT}" choice="{kind}" showInline="true">',
    ]
    for label, description in zip(config.labels, config.label_descriptions, strict=True):
        hint = f" hint={quoteattr(description)}" if description else ""
        lines.append(f"    <Choice value={quoteattr(label)}{hint}/>")
    lines += ["  </Choices>", "</View>"]
    return "\n".join(lines)


def task(row_id: str, text: str, prediction: tuple[Any, float | None, str] | None) -> dict[str, Any]:
    """One task: the text and id, and the model's label as a prediction scored by its confidence (if labeled)."""
    item: dict[str, Any] = {"data": {OBJECT: text, ID_KEY: row_id}}
    if prediction is not None:
        label, confidence, model = prediction
        choices = list(label) if isinstance(label, list | tuple) else [label]
        region = {"from_name": CONTROL, "to_name": OBJECT, "type": "choices", "value": {"choices": choices}}
        made: dict[str, Any] = {"model_version": model, "result": [region]}
        if confidence is not None:
            made["score"] = round(float(confidence), 6)
        item["predictions"] = [made]
    return item


@dataclass(frozen=True, slots=True)
class TasksWritten:
    """What a tasks file holds: tasks, of which some carry a prediction."""

    path: Path
    tasks: int
    predicted: int


def write_tasks(sink_path: Path, input_path: str | Path, to: Path, *, below: float | None = None) -> TasksWritten:
    """Write Label Studio tasks for the input's rows (only those labeled with confidence under `below`, if given)."""
    sinks = open_shards(sink_path)
    manifest = next((m for sink in sinks if (m := sink.meta.read_manifest()) is not None), None)
    if manifest is None or manifest.identity is None:
        raise SinkError(f"{sink_path} has no manifest; label something into it before exporting tasks.")
    slots, values = IdMap(), list[tuple[Any, float | None, str]]()
    for sink in sinks:
        for item in sink.iter_records(columns=["id", "label", "confidence", "model"]):
            confidence = item.get("confidence")
            if below is not None and (confidence is None or confidence >= below):
                continue
            slots.set(str(item["id"]), len(values))
            values.append((item["label"], confidence, str(item.get("model") or manifest.identity.model)))
    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")
    tasks = predicted = 0
    try:
        with input_reader(manifest, input_path) as source, tmp.open("wb") as handle:
            handle.write(b"[")
            for _fields, row in source.records():
                slot = slots.get(row.id) if not row.problem else None
                if slot is None and (below is not None or row.problem):
                    continue
                handle.write(b",\n" if tasks else b"\n")
                handle.write(orjson.dumps(task(row.id, row.text, None if slot is None else values[slot])))
                tasks += 1
                predicted += slot is not None
            handle.write(b"\n]\n")
        tmp.replace(to)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {to}: {exc.strerror or exc}.") from None
    return TasksWritten(to, tasks, predicted)


def export_gold(path: Path, manifest: Manifest, control: str = CONTROL) -> Iterator[tuple[str, str]]:
    """(id, gold cell) from a Label Studio JSON export, as `eval` reads a gold CSV's rows.

    A task's gold is its latest annotation that was not cancelled; a multi-label gold cell is a JSON list.
    Choices that are not labels of the sink's task mean the export comes from another project: an error.
    """
    identity = manifest.identity
    labels = list(identity.labels) if identity else []
    multi = bool(identity and identity.multi_label)
    out: list[tuple[str, str]] = []
    unknown: dict[str, int] = {}
    for number, item in enumerate(_tasks(path)):
        data = item.get("data") if isinstance(item, dict) else None
        if not isinstance(data, dict) or ID_KEY not in data:
            raise InputError(
                f"{path}: task {number + 1} has no data.{ID_KEY}; eval reads exports of projects whose tasks came "
                "from `labelstream export --format label-studio`."
            )
        chosen = _annotated(item.get("annotations"), control)
        for choice in chosen:
            if choice not in labels:
                unknown[choice] = unknown.get(choice, 0) + 1
        if chosen:
            out.append((str(data[ID_KEY]), orjson.dumps(chosen).decode() if multi else chosen[0]))
    if unknown:
        shown = ", ".join(f"{k!r} ×{v}" for k, v in sorted(unknown.items(), key=lambda kv: -kv[1])[:_SHOWN])
        raise InputError(
            f"{path} holds annotations with choices that are not labels of this sink's task: {shown}. The task's "
            f"labels are {labels}: the export seems to come from another project's label set. Export the project "
            "made with `labelstream label-studio-config` for this task."
        )
    return iter(out)


def _tasks(path: Path) -> list[Any]:
    try:
        value = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"gold file {path} not found.") from None
    except OSError as exc:
        raise InputError(f"cannot read gold file {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON ({exc}); export the Label Studio project as JSON.") from None
    if not isinstance(value, list):
        raise InputError(f"{path} is not a Label Studio JSON export (a list of tasks); export the project as JSON.")
    return value


def _annotated(annotations: Any, control: str) -> list[str]:
    """The choices of the latest annotation not cancelled (empty: none)."""
    kept = [a for a in annotations or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    kept.sort(key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
    for annotation in reversed(kept):
        regions = [r for r in annotation.get("result") or [] if isinstance(r, dict) and r.get("type") == "choices"]
        named = [r for r in regions if r.get("from_name") == control] or regions
        choices = [str(c) for r in named for c in (r.get("value") or {}).get("choices") or []]
        if choices:
            return list(dict.fromkeys(choices))
    return []


def check_tasks_target(to: Path, below: float | None, kind: str) -> None:
    """Refuse export flags that do not go together, saying what to do instead."""
    if below is not None and kind != "label-studio":
        raise UsageError("--below picks rows for Label Studio tasks; add --format label-studio (or --to NAME.json).")
    if kind == "label-studio" and to.suffix.lower() != ".json":
        raise UsageError(f"--to {to}: Label Studio imports tasks from JSON; use a name ending in .json.")
