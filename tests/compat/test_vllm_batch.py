"""`labelstream batch prepare` → vLLM's own `run_batch` → `labelstream batch ingest`, with a row run_batch fails."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from ..helpers import cli, dead_letters, sink_ids
from .common import CONFIG, LABELS, long_row, records, sample_csv
from .servers import COMPAT_VENV, MAX_MODEL_LEN, MODEL_DIR, SERVED_NAME, server_env

ROWS = 12


class Batch:
    """What one prepare → run_batch → ingest round left behind."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.inp = sample_csv(folder / "in.csv", ROWS, extra=[long_row()])
        self.out = folder / "out.jsonl"
        self.requests = folder / "requests"
        self.prepared = subprocess.CompletedProcess[str]([], 0, "", "")
        self.ran = subprocess.CompletedProcess[str]([], 0, "", "")
        self.ingested = subprocess.CompletedProcess[str]([], 0, "", "")

    def printed_run_batch(self) -> list[str]:
        """The run_batch command line that `batch prepare` printed."""
        line = next(x for x in self.prepared.stdout.splitlines() if "vllm.entrypoints.openai.run_batch" in x)
        return shlex.split(line.strip())


def run_batch_argv(requests: Path, results: Path) -> list[str]:
    """vLLM's offline batch runner over one request file: the model FOLDER plus the alias the requests name."""
    return [
        str(COMPAT_VENV / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(requests),
        "-o",
        str(results),
        "--model",
        str(MODEL_DIR),
        "--served-model-name",
        SERVED_NAME,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--dtype",
        "float32",
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    """One full round: prepare, vLLM's run_batch (its own engine, ~1-2 min here), ingest."""
    done = Batch(tmp_path_factory.mktemp("vllm-batch"))
    done.prepared = cli(
        "batch", "prepare", "--input", str(done.inp), "--config", str(CONFIG), "--model", SERVED_NAME,
        "--to", str(done.requests), "--output", str(done.out),
    )  # fmt: skip
    assert done.prepared.returncode == 0, done.prepared.stderr
    (requests,) = sorted(done.requests.glob("requests-*.jsonl"))
    results = done.requests / requests.name.replace("requests-", "results-")
    env = server_env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1")
    done.ran = subprocess.run(
        run_batch_argv(requests, results), capture_output=True, text=True, timeout=900, env=env, check=False
    )
    assert done.ran.returncode == 0, done.ran.stderr[-4000:]
    done.ingested = cli(
        "batch", "ingest", str(done.out), str(results), "--input", str(done.inp), "--config", str(CONFIG),
        "--model", SERVED_NAME, timeout=300,
    )  # fmt: skip
    return done


def test_batch_round_labels_every_row_run_batch_answered(batch: Batch) -> None:
    """Every row that vLLM's run_batch answered is in the sink once with a task label; the too-long row is not."""
    ids = sink_ids(batch.out)
    assert len(ids) == ROWS == len(set(ids)), batch.ingested.stdout + batch.ingested.stderr
    assert "too-long" not in ids
    assert {r["label"] for r in records(batch.out)} <= LABELS


def test_batch_ingest_keeps_vllm_error_text(batch: Batch) -> None:
    """vLLM 0.32's error line (`response.body` null, text under `error.error.message`) reaches the dead letter."""
    (letter,) = [x for x in dead_letters(batch.out) if x["id"] == "too-long"]
    assert "maximum context length" in letter["message"], letter


def test_batch_results_carry_confidence(batch: Batch) -> None:
    """Batch results from vLLM end their logprobs with `</s>` too; confidence is still read for every row."""
    rows = records(batch.out)
    assert len(rows) == ROWS
    assert all(r["confidence"] is not None for r in rows)


def test_batch_prepare_prints_a_runnable_run_batch_command(batch: Batch) -> None:
    """The printed run_batch command names a model PATH plus --served-model-name (an alias alone is downloaded)."""
    argv = batch.printed_run_batch()
    assert "--served-model-name" in argv, argv
    assert argv[argv.index("--served-model-name") + 1] == SERVED_NAME
    assert argv[argv.index("--model") + 1] != SERVED_NAME, argv
