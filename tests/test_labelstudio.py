"""Label Studio round trip: tasks with predictions scored by confidence, the labeling config, an export read back
as gold by `eval`, the review file in the same format, and (where the package is installed) a real Label Studio."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli as cli_module
from pipeline.task.config import TaskConfig, load_config

from .helpers import ROOT, SENTIMENT, label, wait_for, write_csv

TOPICS = dataclasses.replace(load_config(ROOT / "configs" / "topics.toml"), template=None, id_column="id")
ROWS = [
    ("r1", "en", "Love it: quiet, well made, great value, would buy again"),
    ("r2", "en", "Broken after a week, refund please, very disappointed"),
    ("r3", "en", "When will it arrive? Which sizes does it come in?"),
    ("r4", "ko", "배송이 빠르고 포장도 꼼꼼했어요. 추천해요"),
]


def labeled(sim: Any, tmp_path: Path, config: TaskConfig = SENTIMENT) -> tuple[Path, Path]:
    """A small input labeled by the simulator; returns (input, sink)."""
    data = write_csv(tmp_path / "in.csv", ROWS)
    out = tmp_path / "out.jsonl"
    label(sim, data, out, config=config)
    return data, out


def records(out: Path) -> dict[str, dict[str, Any]]:
    """The sink's records by id."""
    return {r["id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}


def test_export_writes_tasks_with_predictions_scored_by_confidence(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """Each task holds the text and id in `data` and the model's label as a choices prediction with the model as
    `model_version` and the confidence as `score`, in Label Studio's documented import shape."""
    data, out = labeled(sim, tmp_path)
    to = tmp_path / "tasks.json"
    assert cli_module.main(["export", str(out), "--input", str(data), "--to", str(to), "--format", "label-studio"]) == 0
    assert "4 Label Studio tasks" in capsys.readouterr().out
    tasks = json.loads(to.read_text(encoding="utf-8"))
    done = records(out)
    assert [t["data"]["labelstream_id"] for t in tasks] == ["r1", "r2", "r3", "r4"]
    for item, (row_id, _, text) in zip(tasks, ROWS, strict=True):
        assert item["data"]["text"] == text
        (prediction,) = item["predictions"]
        assert prediction["model_version"] == "gpt-4o-mini"
        assert prediction["score"] == pytest.approx(done[row_id]["confidence"], abs=1e-6)
        assert prediction["result"] == [
            {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [done[row_id]["label"]]}}
        ]


def test_below_keeps_only_doubtful_rows(sim: Any, tmp_path: Path) -> None:
    """--below P exports only the rows whose confidence is under P."""
    data, out = labeled(sim, tmp_path)
    to = tmp_path / "review.json"
    assert cli_module.main(["export", str(out), "--input", str(data), "--to", str(to), "--below", "0.9999"]) == 0
    tasks = json.loads(to.read_text(encoding="utf-8"))
    doubtful = {i for i, r in records(out).items() if r["confidence"] < 0.9999}
    assert {t["data"]["labelstream_id"] for t in tasks} == doubtful
    assert all(t["predictions"][0]["score"] < 0.9999 for t in tasks)


def test_multi_label_tasks_and_config(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """A multi-label task's predictions carry every chosen label, and its config lets reviewers pick several."""
    data, out = labeled(sim, tmp_path, TOPICS)
    to = tmp_path / "tasks.json"
    assert cli_module.main(["export", str(out), "--input", str(data), "--to", str(to)]) == 0
    tasks = json.loads(to.read_text(encoding="utf-8"))
    done = records(out)
    for item in tasks:
        choices = item["predictions"][0]["result"][0]["value"]["choices"]
        assert choices == done[item["data"]["labelstream_id"]]["label"]
    capsys.readouterr()
    assert cli_module.main(["label-studio-config", str(ROOT / "configs" / "topics.toml")]) == 0
    view = ET.fromstring(capsys.readouterr().out)  # noqa: S314 - our own output, parsed to check its shape
    control = view.find("Choices")
    assert control is not None and control.get("choice") == "multiple"
    assert [c.get("value") for c in control.iter("Choice")] == list(TOPICS.labels)


def test_labeling_config_matches_the_tasks(capsys: Any) -> None:
    """The config's Choices control and Text object carry the names every prediction's region refers to."""
    assert cli_module.main(["label-studio-config", str(ROOT / "configs" / "sentiment.toml")]) == 0
    view = ET.fromstring(capsys.readouterr().out)  # noqa: S314 - our own output, parsed to check its shape
    text, control = view.find("Text"), view.find("Choices")
    assert text is not None and (text.get("name"), text.get("value")) == ("text", "$text")
    assert control is not None and (control.get("name"), control.get("toName")) == ("label", "text")
    assert control.get("choice") == "single-radio"
    assert [c.get("value") for c in control.iter("Choice")] == ["positive", "negative", "neutral"]


def annotated(tasks: list[dict[str, Any]], gold: dict[str, str]) -> list[dict[str, Any]]:
    """Tasks as a Label Studio JSON export returns them: ids, annotations (one cancelled), predictions kept."""
    out = []
    for n, item in enumerate(tasks):
        choice = gold[item["data"]["labelstream_id"]]
        region = {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [choice]}}
        cancelled = {"id": 100 + n, "result": [], "was_cancelled": True, "updated_at": "2026-12-04T10:00:00Z"}
        kept = {"id": n, "result": [region], "was_cancelled": False, "updated_at": "2026-12-03T10:00:00Z"}
        out.append({"id": n + 1, "data": item["data"], "annotations": [kept, cancelled], **item})
    return out


def test_eval_reads_a_label_studio_export_as_gold(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """`eval --gold export.json` scores the sink against the reviewers' annotations (cancelled ones ignored)."""
    data, out = labeled(sim, tmp_path)
    to = tmp_path / "tasks.json"
    assert cli_module.main(["export", str(out), "--input", str(data), "--to", str(to)]) == 0
    done = records(out)
    gold = {i: r["label"] for i, r in done.items()}
    gold["r1"] = next(x for x in SENTIMENT.labels if x != gold["r1"])  # the reviewer corrected one row
    export = tmp_path / "export.json"
    export.write_text(json.dumps(annotated(json.loads(to.read_text(encoding="utf-8")), gold)), encoding="utf-8")
    capsys.readouterr()
    assert cli_module.main(["eval", str(out), "--gold", str(export), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["gold_rows"], result["labeled"], result["accuracy"]) == (4, 4, 0.75)


def test_an_export_of_another_label_set_is_a_clear_error(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """An export whose annotations use labels the sink's task does not have names them and exits 2."""
    data, out = labeled(sim, tmp_path)
    to = tmp_path / "tasks.json"
    assert cli_module.main(["export", str(out), "--input", str(data), "--to", str(to)]) == 0
    other = {row[0]: "sports" for row in ROWS}
    export = tmp_path / "export.json"
    export.write_text(json.dumps(annotated(json.loads(to.read_text(encoding="utf-8")), other)), encoding="utf-8")
    capsys.readouterr()
    assert cli_module.main(["eval", str(out), "--gold", str(export)]) == 2
    err = capsys.readouterr().err
    assert "'sports' ×4" in err and "another project's label set" in err and "Traceback" not in err


def test_review_below_also_writes_label_studio_tasks(sim: Any, tmp_path: Path) -> None:
    """--review-below writes the doubtful rows as Label Studio tasks beside the review CSV."""
    data = write_csv(tmp_path / "in.csv", ROWS)
    out = tmp_path / "out.jsonl"
    label(sim, data, out, review_below=0.9999)
    tasks = json.loads((tmp_path / "out.review.json").read_text(encoding="utf-8"))
    doubtful = {i for i, r in records(out).items() if r["confidence"] < 0.9999}
    assert {t["data"]["labelstream_id"] for t in tasks} == doubtful


def test_export_flags_that_do_not_go_together(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """--below without Label Studio tasks, or Label Studio tasks to a non-JSON file, is a usage error."""
    data, out = labeled(sim, tmp_path)
    csv_to = str(tmp_path / "x.csv")
    assert cli_module.main(["export", str(out), "--input", str(data), "--to", csv_to, "--below", "0.5"]) == 2
    assert "--below picks rows for Label Studio tasks" in capsys.readouterr().err
    words = ["export", str(out), "--input", str(data), "--to", csv_to, "--format", "label-studio"]
    assert cli_module.main(words) == 2
    assert "ending in .json" in capsys.readouterr().err


LIVE_BIN = os.environ.get("LABEL_STUDIO_BIN", "")
TOKEN = "labelstream-test-token-0123456789"  # noqa: S105 - a throwaway token of a Label Studio the test starts


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def call(base: str, method: str, path: str, body: Any = None) -> Any:
    """One Label Studio API call with the test's token; the JSON reply."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, method=method)  # noqa: S310 - loopback only
    request.add_header("Authorization", f"Token {TOKEN}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:  # noqa: S310 - loopback only
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None


@pytest.mark.compat
@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    os.environ.get("LABELSTREAM_COMPAT") != "1" or not Path(LIVE_BIN).is_file(),
    reason="a real Label Studio: `make test-compat` installs one and runs this (or set LABELSTREAM_COMPAT=1 and "
    "LABEL_STUDIO_BIN to a label-studio executable in a venv of its own)",
)
def test_a_real_label_studio_imports_the_tasks_and_its_export_is_gold(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """Label Studio on loopback accepts the labeling config and the tasks, keeps every prediction's label and score,
    and its JSON export of the annotations made there is read by `eval` as gold."""
    data, out = labeled(sim, tmp_path)
    to = tmp_path / "tasks.json"
    assert cli_module.main(["export", str(out), "--input", str(data), "--to", str(to)]) == 0
    capsys.readouterr()
    assert cli_module.main(["label-studio-config", str(ROOT / "configs" / "sentiment.toml")]) == 0
    config = capsys.readouterr().out
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(tmp_path / "ls"),
        "LATEST_VERSION_CHECK": "false",  # it would ask PyPI for its latest version: the test stays on loopback
        "COLLECT_ANALYTICS": "false",
        # Label Studio 1.2x refuses legacy tokens unless this flag is off; a test has no browser for a JWT.
        "fflag__feature_develop__prompts__dia_1829_jwt_token_auth": "false",
    }
    words = [LIVE_BIN, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    words += ["--username", "tester@example.com", "--password", "labelstream-test", "--user-token", TOKEN]
    log = (tmp_path / "ls.log").open("wb")
    server = subprocess.Popen(words, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as reply:  # noqa: S310 - loopback only
                    return reply.status == 200
            except OSError:
                assert server.poll() is None, (tmp_path / "ls.log").read_text(errors="replace")[-2000:]
                return False

        wait_for(healthy, timeout=900, what="Label Studio to start")
        project = call(base, "POST", "/api/projects", {"title": "labelstream review", "label_config": config})
        imported = call(base, "POST", f"/api/projects/{project['id']}/import", to.read_bytes())
        assert (imported["task_count"], imported["prediction_count"]) == (4, 4)
        done = records(out)
        predictions = call(base, "GET", f"/api/predictions/?project={project['id']}")
        tasks = call(base, "GET", f"/api/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true")
        by_task = {t["id"]: t["data"]["labelstream_id"] for t in tasks}
        for made in predictions:
            row = done[by_task[made["task"]]]
            assert made["result"][0]["value"]["choices"] == [row["label"]]
            assert made["score"] == pytest.approx(row["confidence"], abs=1e-6)
            assert made["model_version"] == "gpt-4o-mini"
        for task_id, row_id in by_task.items():
            region = {"from_name": "label", "to_name": "text", "type": "choices"}
            choice = "neutral" if row_id == "r1" else done[row_id]["label"]  # a reviewer corrects one row
            call(
                base,
                "POST",
                f"/api/tasks/{task_id}/annotations/",
                {"result": [{**region, "value": {"choices": [choice]}}]},
            )
        export = tmp_path / "export.json"
        export.write_bytes(
            json.dumps(call(base, "GET", f"/api/projects/{project['id']}/export?exportType=JSON")).encode()
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    capsys.readouterr()
    assert cli_module.main(["eval", str(out), "--gold", str(export), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = 0.75 if done["r1"]["label"] != "neutral" else 1.0
    assert (result["gold_rows"], result["accuracy"]) == (4, expected)
