"""The ready-to-run scheduler jobs: the Kubernetes Indexed Job and the Slurm array parse, agree with themselves,
name flags labelstream has, and, run as the scheduler would run them, label every row exactly once."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
import yaml

from pipeline.analysis.status import sink_status
from pipeline.cli import build_parser

from .helpers import ROOT, cli, cli_env, reviews, write_csv
from .s3 import Bucket
from .s3 import bucket as bucket  # noqa: PLC0414 - the fixtures, re-exported by the names tests ask for
from .s3 import s3_server as s3_server  # noqa: PLC0414

K8S = ROOT / "deploy" / "k8s" / "indexed-job.yaml"
SLURM = ROOT / "deploy" / "slurm" / "label.sbatch"
LABELSTREAM = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "labelstream"

# The fields of the Kubernetes API this manifest may use (a typo in a field name is silently ignored by
# `kubectl apply` with a warning, so a misspelt backoffLimitPerIndex would quietly turn the feature off).
JOB_SPEC = {
    "completionMode",
    "completions",
    "parallelism",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
    "podFailurePolicy",
    "template",
    "backoffLimit",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
}
POD_SPEC = {"restartPolicy", "terminationGracePeriodSeconds", "containers", "volumes"}
CONTAINER = {"name", "image", "command", "args", "env", "resources", "volumeMounts"}


def k8s_documents() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(K8S.read_text()) if doc}


def test_the_indexed_job_is_a_valid_indexed_job_that_retries_a_shard_in_place() -> None:
    """Indexed completion, per-index retries with Never restarts, a shared RWX claim, and consistent shard counts."""
    docs = k8s_documents()
    assert set(docs) == {"Job", "PersistentVolumeClaim"}
    job, claim = docs["Job"], docs["PersistentVolumeClaim"]
    assert job["apiVersion"] == "batch/v1" and claim["apiVersion"] == "v1"
    spec = job["spec"]
    assert set(spec) <= JOB_SPEC
    assert spec["completionMode"] == "Indexed"
    assert spec["backoffLimitPerIndex"] >= 1
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert set(pod) <= POD_SPEC
    assert pod["restartPolicy"] == "Never"  # backoffLimitPerIndex requires it
    (container,) = pod["containers"]
    assert set(container) <= CONTAINER
    env = {e["name"]: e for e in container["env"]}
    assert int(env["LABELSTREAM_SHARDS"]["value"]) == spec["completions"]
    assert "value" not in env["OPENAI_API_KEY"] and env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailIndex", "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                    "values": [2]}} in rules  # fmt: skip
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    args = container_args()
    assert args[args.index("--output") + 1].startswith(mount["mountPath"] + "/")
    assert args[args.index("--shard") + 1] == "auto"
    assert pod["terminationGracePeriodSeconds"] > float(args[args.index("--grace") + 1])


def container_args() -> list[str]:
    (container,) = k8s_documents()["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "labelstream"
    return [*container["command"][1:], *container["args"]]


def test_the_job_and_the_array_name_only_flags_labelstream_has() -> None:
    """The commands of both jobs parse with labelstream's own parser."""
    args = build_parser().parse_args(container_args())
    assert args.shard == "auto" and args.rpm == 5000
    words = slurm_command()
    args = build_parser().parse_args(words)
    assert args.shard == "auto" and args.no_progress


def slurm_command() -> list[str]:
    """The labelstream arguments of the sbatch script's last command (its variables left as placeholders)."""
    text = SLURM.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("exec srun"))
    words = re.sub(r'"\$[A-Z]+"', "X", line).split()
    assert words[:3] == ["exec", "srun", "--ntasks=1"] and words[-1] == '"$@"'
    return words[4:-1]  # after "$LABELSTREAM", before the pass-through "$@"


def sbatch_options() -> dict[str, str]:
    found = {}
    for line in SLURM.read_text().splitlines():
        if match := re.match(r"^#SBATCH\s+--([a-z-]+)(?:=(\S+))?", line):
            found[match.group(1)] = match.group(2) or ""
    return found


def test_the_sbatch_script_is_valid_bash_with_an_array_of_all_shards() -> None:
    """`bash -n` passes; the array runs 0 … N-1 with N = LABELSTREAM_SHARDS; SIGTERM comes before the time limit."""
    subprocess.run(["bash", "-n", str(SLURM)], check=True)
    options = sbatch_options()
    low, high = map(int, options["array"].split("-"))
    shards = int(re.search(r"LABELSTREAM_SHARDS:-(\d+)", SLURM.read_text()).group(1))  # type: ignore[union-attr]
    assert (low, high) == (0, shards - 1)
    assert options["signal"].startswith("TERM@")
    assert "OPENAI_API_KEY=" not in SLURM.read_text().replace("export OPENAI_API_KEY=...", "")


@pytest.mark.slow
def test_the_slurm_array_labels_every_row_once(sim: Any, tmp_path: Path) -> None:
    """Every task of the array, run as Slurm would (its task id in the environment), together label each row once."""
    rows = reviews(160)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "labels.parquet"
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    (shim / "srun").chmod(0o755)
    options = sbatch_options()
    low, high = map(int, options["array"].split("-"))
    env = cli_env({"INPUT": str(source), "OUTPUT": str(out), "CONFIG": str(ROOT / "configs" / "sentiment.toml"),
                   "LABELSTREAM": str(LABELSTREAM), "PATH": f"{shim}:{os.environ['PATH']}",
                   "SLURM_ARRAY_TASK_COUNT": str(high - low + 1)})  # fmt: skip
    tasks = [
        subprocess.Popen(
            ["bash", str(SLURM), "--base-url", sim.base_url, "--concurrency", "4"],
            env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for task in range(low, high + 1)
    ]
    for task in tasks:
        _, stderr = task.communicate(timeout=120)
        assert task.returncode == 0, stderr
    assert sorted(ds.dataset(out).to_table(columns=["id"]).column("id").to_pylist()) == sorted(r[0] for r in rows)
    report = sink_status(out)
    assert report["shard_count"] == high - low + 1 and list(report["shards_by_state"]) == ["done"]


@pytest.mark.slow
def test_the_indexed_job_labels_every_row_once(sim: Any, tmp_path: Path) -> None:
    """The Job's container command, run once per completion index with the manifest's env, labels each row once."""
    rows = reviews(160)
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "in.csv", rows)
    shutil.copy(ROOT / "configs" / "sentiment.toml", data / "sentiment.toml")
    job = k8s_documents()["Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = [a.replace("/data/", f"{data}/") for a in container_args()]
    env = cli_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    run_pods(sim, args, env, job["spec"]["completions"])
    out = data / "labels.parquet"
    assert sorted(ds.dataset(out).to_table(columns=["id"]).column("id").to_pylist()) == sorted(r[0] for r in rows)
    assert sink_status(out)["shard_count"] == job["spec"]["completions"]


def run_pods(sim: Any, args: list[str], env: dict[str, str], completions: int) -> None:
    """Run the Job's container command once per completion index, all at once, as Kubernetes would; all exit 0."""
    pods = [
        subprocess.Popen(
            [str(LABELSTREAM), *args, "--base-url", sim.base_url, "--concurrency", "4"],
            env={**env, "JOB_COMPLETION_INDEX": str(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(completions)
    ]
    for pod in pods:
        _, stderr = pod.communicate(timeout=120)
        assert pod.returncode == 0, stderr


K8S_S3 = ROOT / "deploy" / "k8s" / "indexed-job-s3.yaml"
CONTAINER_S3 = {*CONTAINER, "envFrom"}


def s3_job() -> dict[str, Any]:
    (job,) = [doc for doc in yaml.safe_load_all(K8S_S3.read_text()) if doc]
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    return dict(job)


def test_the_s3_indexed_job_needs_no_shared_volume_and_keeps_credentials_in_secrets() -> None:
    """The bucket variant: Indexed, retried per index, input and output in a bucket, keys from Secrets only."""
    spec = s3_job()["spec"]
    assert set(spec) <= JOB_SPEC and spec["completionMode"] == "Indexed" and spec["backoffLimitPerIndex"] >= 1
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert set(pod) <= POD_SPEC and pod["restartPolicy"] == "Never"
    (volume,) = pod["volumes"]
    assert set(volume) == {"name", "configMap"}  # the task file only: no data volume shared between nodes
    (container,) = pod["containers"]
    assert set(container) <= CONTAINER_S3
    env = {e["name"]: e for e in container["env"]}
    assert int(env["LABELSTREAM_SHARDS"]["value"]) == spec["completions"]
    assert "value" not in env["OPENAI_API_KEY"]
    assert [source["secretRef"]["name"] for source in container["envFrom"]] == ["labelstream-bucket"]
    assert not [e for e in container["env"] if e["name"].startswith("AWS_") and "KEY" in e["name"]]
    args = s3_args()
    assert args[args.index("--input") + 1].startswith("s3://")
    assert args[args.index("--output") + 1].startswith("s3://")
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"] and args[args.index("--config") + 1].startswith(mount["mountPath"] + "/")
    assert args[args.index("--shard") + 1] == "auto"
    assert pod["terminationGracePeriodSeconds"] > float(args[args.index("--grace") + 1])
    assert build_parser().parse_args(args).shard == "auto"


def s3_args() -> list[str]:
    (container,) = s3_job()["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "labelstream"
    return [*container["command"][1:], *container["args"]]


@pytest.mark.slow
def test_the_s3_indexed_job_labels_every_row_once_into_the_bucket(sim: Any, tmp_path: Path, bucket: Bucket) -> None:
    """Run as Kubernetes would (one pod per index, input and output in a loopback S3 bucket): each row once."""
    rows = reviews(160)
    job = s3_job()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    (mount,) = container["volumeMounts"]
    prefix = "s3://your-bucket/"
    args = s3_args()
    source = args[args.index("--input") + 1].removeprefix(prefix)  # what the user uploads before applying the Job
    bucket.client.upload_file(str(write_csv(tmp_path / "in.csv", rows)), bucket.name, source)
    task = tmp_path / "task"  # the ConfigMap, as mounted
    task.mkdir()
    shutil.copy(ROOT / "configs" / "sentiment.toml", task / "sentiment.toml")
    args = [a.replace(mount["mountPath"] + "/", f"{task}/").replace(prefix, f"s3://{bucket.name}/") for a in args]
    env = cli_env({**bucket.env, **{e["name"]: e["value"] for e in container["env"] if "value" in e}})
    run_pods(sim, args, env, job["spec"]["completions"])
    output = args[args.index("--output") + 1]
    key = output.removeprefix(f"s3://{bucket.name}/")
    assert sorted(bucket.ids(key)) == sorted(r[0] for r in rows)
    status = cli("status", output, "--json", env=bucket.env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["shard_count"] == job["spec"]["completions"]
