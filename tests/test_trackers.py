"""W&B and MLflow as trackers beside TensorBoard (docs/tracking.md), with the real packages.

- W&B offline: the run's ``.wandb`` files read back hold the values of metrics.json; a run stopped by
  SIGTERM and resumed continues the same W&B run id with its steps continuing.
- MLflow: a real ``mlflow server`` on 127.0.0.1 read back with its client (params, metrics, one run
  across a resume), then the server killed mid-run: the training still ends with 0 and one warning line.
- No secret from the environment (a fake API key) lands anywhere in the run folder or the params.
- A missing package or a bad tracker setting: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT, TINY, assert_ok, clean_env, free_port, run_cli, run_cli_without

FAKE_KEY = "fake-secret-0123456789abcdef0123456789abcdef"  # 40+ characters, as W&B keys are
SECRETS = {"WANDB_API_KEY": FAKE_KEY, "MLFLOW_TRACKING_PASSWORD": FAKE_KEY, "MLFLOW_TRACKING_TOKEN": FAKE_KEY}
# 5 steps an epoch (160 train images, batch 32), 3 epochs; a checkpoint and a logged loss at every step.
CFG = [*TINY, "train.epochs=3", "checkpoint.every_steps=1", "train.log_every_steps=1"]


def _history(run: Path) -> list[dict[str, Any]]:
    return json.loads((run / "metrics.json").read_text())["history"]


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddp_train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before " + str(path) + proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _stop_then_resume(args: list[str], run: Path, env: dict[str, str]) -> tuple[str, subprocess.CompletedProcess]:
    """Start, SIGTERM after the step-3 checkpoint (exit 75), then ``resume=auto`` to the end."""
    proc = _start(args, env)
    _wait_for(run / "checkpoints" / "step-00000003.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    res = run_cli([*args, "resume=auto"], env=env)
    assert_ok(res)
    assert "resumed from epoch" in res.stdout
    return err, res


def _assert_no_secret(run: Path) -> None:
    for path in run.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- W&B


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file (W&B's log format: a 7-byte header, then 32 KiB blocks of
    records, each with a 7-byte header: CRC, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pos, block, pieces = path.read_bytes(), [], 7, 32768, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_run(folder: Path) -> tuple[str, dict[str, Any], list[tuple[int, dict[str, Any]]]]:
    """(run id, config, [(step, values)]) of one offline run folder."""
    run_id, config, rows = "", {}, []
    for record in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "history":
            values = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            rows.append((record.history.step.num, {k: v for k, v in values.items() if not k.startswith("_")}))
    return run_id, config, rows


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_json_and_a_resume_continues_the_same_run(tmp_path):
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed here")
    run = tmp_path / "r"
    args = [*CFG, f"out_dir={tmp_path}", "run_name=r", "track.trackers=tensorboard,wandb"]
    _stop_then_resume(args, run, clean_env(**SECRETS))

    recorded = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, folders  # one per start, both of the same run (wandb sync merges them)
    runs = [wandb_run(f) for f in folders]
    assert [r[0] for r in runs] == [recorded, recorded]
    assert runs[0][1]["train.lr"] == 0.002 and runs[0][1]["model.name"] == "resnet10"
    steps = [step for r in runs for step, _ in r[2]]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 15, steps  # one continuous axis
    assert runs[1][2][0][0] == 4  # the resumed start goes on after the checkpoint's step 3
    logged = {step: values for r in runs for step, values in r[2]}
    assert set(logged[3]) >= {"train/loss"} and set(logged[15]) >= {"valid/acc", "test/acc", "memory/peak_mb/rank0"}
    for epoch in _history(run):  # the same values as metrics.json, at the epoch's last step
        row = logged[5 * epoch["epoch"]]
        for tag, key in (("valid/acc", "valid_acc"), ("valid/loss", "valid_loss"), ("train/loss_epoch", "train_loss")):
            assert row[tag] == pytest.approx(epoch[key], rel=1e-12), (tag, epoch)
    assert not (run / "profile").exists()  # the profiler window is off by default
    _assert_no_secret(run)


# --------------------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 with a SQLite store in tmp_path; yields (uri, process)."""
    pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed here")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root",
           str(tmp_path / "artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its gunicorn/uvicorn workers: killed as one group
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
    yield uri, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_mlflow_server_gets_params_and_metrics_a_resume_continues_and_a_lost_server_is_one_warning(
        mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, server = mlflow_server
    env = clean_env(**SECRETS)
    run = tmp_path / "r"
    args = [*CFG, f"out_dir={tmp_path}", "run_name=r", "track.trackers=mlflow", f"track.mlflow_uri={uri}",
            "track.mlflow_experiment=exp"]
    _stop_then_resume(args, run, env)

    client = MlflowClient(tracking_uri=uri)
    recorded = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    experiment = client.get_experiment_by_name("exp")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [recorded]  # one run
    got = client.get_run(recorded)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.lr"] == "0.002" and got.data.params["model.name"] == "resnet10"
    assert FAKE_KEY not in json.dumps(got.data.params)
    losses = client.get_metric_history(recorded, "train/loss")
    assert [m.step for m in losses] == list(range(1, 16))  # 1-3 before the stop, 4-15 after: one axis
    accs = {m.step: m.value for m in client.get_metric_history(recorded, "valid/acc")}
    assert accs == {5 * e["epoch"]: pytest.approx(e["valid_acc"], rel=1e-12) for e in _history(run)}
    assert not (run / "tb").exists()  # trackers=mlflow alone: no TensorBoard
    _assert_no_secret(run)

    # The server killed mid-run: the training ends normally, with one warning line.
    proc = _start([*args[:-3], "run_name=lost", *args[-2:]], env)
    _wait_for(tmp_path / "lost" / "checkpoints" / "step-00000002.pt", proc)
    os.killpg(server.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "warning: the mlflow tracker failed" in line]
    assert len(warnings) == 1, err[-3000:]
    assert "training goes on without it" in warnings[0]
    assert len(_history(tmp_path / "lost")) == 3 and "test | loss" in out


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("override, missing, expected", [
    ("track.trackers=tensorboard,wandb", "wandb", "track.trackers: wandb is chosen but the wandb package is not installed"),
    ("track.trackers=mlflow", "mlflow", "track.trackers: mlflow is chosen but the mlflow package is not installed"),
    ("track.trackers=tensorboard,neptune", "", "track.trackers: expected comma-separated names"),
    ("track.mlflow_uri=ftp://host/x", "", "track.mlflow_uri: expected"),
])
def test_a_missing_package_or_a_bad_tracker_setting_is_one_line_and_nothing_is_written(
        tmp_path, override, missing, expected):
    args = [*TINY, f"out_dir={tmp_path / 'out'}", override]
    res = run_cli_without(missing, args) if missing else run_cli(args)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddp_train: error: " + expected), res.stderr
    assert not (tmp_path / "out").exists()
