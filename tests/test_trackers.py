"""W&B and MLflow as trackers beside TensorBoard (docs/tracking.md), with the real packages.

- W&B offline: the run's ``.wandb`` files read back hold the values of metrics.json; a run stopped by
  SIGTERM on an epoch's last step and resumed continues the same W&B run id, each step once, W&B's row
  numbers growing across the starts (W&B ignores a lower one).
- MLflow: a real ``mlflow server`` on 127.0.0.1 read back with its client (params, metrics, one run
  across a resume), then the server killed mid-run: the training still ends with 0 and one warning line.
- No secret from the environment (a fake API key) lands anywhere in the run folder or the params.
- In process: the rows the sinks get (a step's training values, then its epoch end's); a failing sink is
  one warning line while the other gets every row.
- A missing package or a bad tracker setting (a password in the MLflow URI): one line, exit 2, nothing written.
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


# ddp_train's CLI that sends itself a real SIGTERM (through ddp_train's own handler) once global step N is done:
# test scaffolding that only times the signal, so that the stop lands on the chosen step every time.
STOP_AT = """
import os, signal, sys
from ddp_train.cli import main
from ddp_train.training import trainer
after_step = trainer.StepHook._after_step
def stop_at(self, *args):
    if self.state.global_step == int(os.environ["STOP_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)
    after_step(self, *args)
trainer.StepHook._after_step = stop_at
sys.exit(main())
"""


def _start(args: list[str], env: dict[str, str], stop_at: int | None = None) -> subprocess.Popen:
    cmd = ["-m", "ddp_train"] if stop_at is None else ["-c", STOP_AT]
    return subprocess.Popen([sys.executable, *cmd, *args], cwd=ROOT, env={**env, "STOP_AT_STEP": str(stop_at)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before " + str(path) + proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _stop_then_resume(args: list[str], run: Path, env: dict[str, str], stop: int) -> None:
    """Start, stop by SIGTERM at global step ``stop`` (its checkpoint, exit 75), then ``resume=auto`` to the end."""
    proc = _start(args, env, stop_at=stop)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    assert f"stopped by SIGTERM; checkpoint {run / 'checkpoints' / f'step-{stop:08d}.pt'}" in err, err[-3000:]
    res = run_cli([*args, "resume=auto"], env=env)
    assert_ok(res)
    assert "resumed from epoch" in res.stdout


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
    """(run id, config, [(W&B's row number, values)]) of one offline run folder."""
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
    # Stopped on epoch 1's last step, before its validation: the resumed start validates epoch 1 at that same
    # global step, after the stop's row (W&B would ignore it otherwise, online).
    stop = 5
    _stop_then_resume(args, run, clean_env(**SECRETS), stop)

    recorded = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, folders  # one per start, both of the same run (wandb sync merges them)
    runs = [wandb_run(f) for f in folders]
    assert [r[0] for r in runs] == [recorded, recorded]
    assert runs[0][1]["train.lr"] == 0.002 and runs[0][1]["model.name"] == "resnet10"
    rows = [row for r in runs for row in r[2]]
    # W&B ignores a row numbered below the run's last one (a resumed online run): the numbers grow across starts.
    assert [n for n, _ in rows] == sorted({n for n, _ in rows}), rows
    points = [(values["global_step"], key) for _, values in rows for key in values if key != "global_step"]
    assert len(points) == len(set(points)), points  # no value logged twice at one global step
    # One continuous axis, no gap: the first start up to its stop checkpoint's step (that step's loss, logged just
    # before the stop, included), the resumed start from the next step on (and, after a stop on an epoch's last
    # step, that epoch's validation first).
    losses = [[values["global_step"] for _, values in r[2] if "train/loss" in values] for r in runs]
    assert losses == [list(range(1, stop + 1)), list(range(stop + 1, 16))], (stop, losses)
    logged: dict[int, dict[str, Any]] = {}
    for _, values in rows:
        logged.setdefault(values["global_step"], {}).update(values)
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
    mlflow_only = ["track.trackers=mlflow", f"track.mlflow_uri={uri}", "track.mlflow_experiment=exp"]
    args = [*CFG, f"out_dir={tmp_path}", "run_name=r", *mlflow_only]
    stop = 3  # mid-epoch
    _stop_then_resume(args, run, env, stop)

    client = MlflowClient(tracking_uri=uri)
    recorded = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    experiment = client.get_experiment_by_name("exp")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [recorded]  # one run
    got = client.get_run(recorded)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.lr"] == "0.002" and got.data.params["model.name"] == "resnet10"
    assert FAKE_KEY not in json.dumps(got.data.params)
    losses = client.get_metric_history(recorded, "train/loss")
    assert [m.step for m in losses] == list(range(1, 16)), stop  # 1..stop before the stop, the rest after: one axis
    accs = {m.step: m.value for m in client.get_metric_history(recorded, "valid/acc")}
    assert accs == {5 * e["epoch"]: pytest.approx(e["valid_acc"], rel=1e-12) for e in _history(run)}
    assert not (run / "tb").exists()  # trackers=mlflow alone: no TensorBoard
    _assert_no_secret(run)

    # The server killed mid-run: the training ends normally, with one warning line.
    proc = _start([*CFG, f"out_dir={tmp_path}", "run_name=lost", *mlflow_only], env)
    _wait_for(tmp_path / "lost" / "checkpoints" / "step-00000002.pt", proc)
    os.killpg(server.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "warning: the mlflow tracker failed" in line]
    assert len(warnings) == 1, err[-3000:]
    assert "training goes on without it" in warnings[0]
    assert len(_history(tmp_path / "lost")) == 3 and "test | loss" in out


# --------------------------------------------------------------------------- rows and failures, in process


class RecordingSink:
    """A sink that keeps what it is sent (the real W&B and MLflow sinks are tested above)."""

    def __init__(self, name: str, fail_at: int | None = None) -> None:
        self.name, self.fail_at = name, fail_at
        self.rows: list[tuple[int, bool, dict[str, float]]] = []
        self.closed: bool | None = None

    def scalars(self, values: dict[str, float], step: int, epoch_end: bool) -> None:
        if step == self.fail_at:
            raise ConnectionError("server down\nsecond line")
        self.rows.append((step, epoch_end, dict(values)))

    def close(self, finished: bool) -> None:
        self.closed = finished


def _epoch(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "train_loss": 1.0, "valid_loss": 0.5, "valid_acc": 0.75, "lr": 0.1, "img_per_s": 100.0,
            "epoch_s": 1.0}


def test_each_step_is_one_row_then_its_epoch_end_one_more_and_a_resume_goes_on_after_the_checkpoint(tmp_path):
    from ddp_train.trackers import Sinks
    from ddp_train.tracking import Tracker

    sink = RecordingSink("rec")
    tracker = Tracker(tmp_path, tensorboard=False, sinks=Sinks([sink]))
    for step in (1, 2):
        tracker.scalar("train/loss", 0.1 * step, step)
        tracker.scalar("train/grad_norm", 1.0, step)
    tracker.history.append(_epoch(1))
    tracker.log_epoch(_epoch(1), 2, {"peak_mem_mb": [10.0, 12.0], "gflop_per_s": 3.0})
    tracker.scalar("time/valid_s", 0.2, 2)  # after the epoch end, at its step: joins its row
    tracker.scalar("train/loss", 0.3, 3)
    tracker.log_test({"loss": 0.4, "acc": 0.9, "count": 8, "per_class_acc": {"a": 0.9}})
    tracker.log_hparams({"train.lr": 0.1}, {"hparam/test_acc": 0.9})
    tracker.close()
    assert [(step, end, sorted(values)) for step, end, values in sink.rows] == [
        (1, False, ["train/grad_norm", "train/loss"]), (2, False, ["train/grad_norm", "train/loss"]),
        (2, True, ["lr", "memory/peak_mb/rank0", "memory/peak_mb/rank1", "throughput/gflop_per_s",
                   "throughput/img_per_s", "time/valid_s", "train/loss_epoch", "valid/acc", "valid/loss"]),
        (3, False, ["train/loss"]), (3, True, ["hparam/test_acc", "test/acc", "test/loss"])]
    assert sink.rows[2][2]["memory/peak_mb/rank1"] == 12.0 and sink.closed is True

    # Stopped at step 2 before its epoch end, resumed (purge_step 3): the epoch end of step 2 comes first.
    resumed = RecordingSink("rec")
    tracker = Tracker(tmp_path, tensorboard=False, purge_step=3, sinks=Sinks([resumed]))
    tracker.log_epoch(_epoch(1), 2)
    tracker.scalar("train/loss", 0.3, 3)
    tracker.end()  # a stop: the pending point is sent, the run marked unfinished
    assert [(step, end) for step, end, _ in resumed.rows] == [(2, True), (3, False)] and resumed.closed is False
    # Resumed with every epoch done (step 10): the test's values go to step 10's epoch end, not to step 0.
    last = RecordingSink("rec")
    tracker = Tracker(tmp_path, tensorboard=False, purge_step=11, sinks=Sinks([last]))
    tracker.log_test({"loss": 0.4, "acc": 0.9, "count": 8, "per_class_acc": {"a": 0.9}})
    tracker.close()
    assert [(step, end) for step, end, _ in last.rows] == [(10, True)]


def test_a_failing_sink_is_one_warning_line_and_the_others_get_every_row(tmp_path, capsys):
    from ddp_train.trackers import Sinks
    from ddp_train.tracking import Tracker

    failing, other = RecordingSink("mlflow", fail_at=2), RecordingSink("wandb")
    tracker = Tracker(tmp_path, tensorboard=False, sinks=Sinks([failing, other]))
    for step in range(1, 6):
        tracker.scalar("train/loss", 1.0, step)
    tracker.close()
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "ddp_train: warning: the mlflow tracker failed logging step 2 (ConnectionError: server down); training goes "
        "on without it (metrics.json, the checkpoints and the other trackers are unaffected)"]
    assert [step for step, _, _ in failing.rows] == [1] and failing.closed is None  # dropped: never called again
    assert [step for step, _, _ in other.rows] == [1, 2, 3, 4, 5] and other.closed is True


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("override, missing, expected", [
    ("track.trackers=tensorboard,wandb", "wandb", "track.trackers: wandb is chosen but the wandb package is not installed"),
    ("track.trackers=mlflow", "mlflow", "track.trackers: mlflow is chosen but the mlflow package is not installed"),
    ("track.trackers=tensorboard,neptune", "", "track.trackers: expected comma-separated names"),
    ("track.mlflow_uri=ftp://host/x", "", "track.mlflow_uri: expected"),
    (f"track.mlflow_uri=http://me:{FAKE_KEY}@127.0.0.1:5000", "",
     "track.mlflow_uri: expected a URI without a password (it would be written into the run folder): set "
     "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for a server, PGPASSWORD or ~/.pgpass for a database, "
     "got 'http://me:***@127.0.0.1:5000'"),
])
def test_a_missing_package_or_a_bad_tracker_setting_is_one_line_and_nothing_is_written(
        tmp_path, override, missing, expected):
    args = [*TINY, f"out_dir={tmp_path / 'out'}", override]
    res = run_cli_without(missing, args) if missing else run_cli(args)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddp_train: error: " + expected), res.stderr
    assert FAKE_KEY not in res.stderr + res.stdout  # not even in the refusal
    assert not (tmp_path / "out").exists()
