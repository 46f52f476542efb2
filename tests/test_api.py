"""The Python API (ddp_train.api.train): the CLI's run from a plain process and inside a process group the
caller formed (as Ray Train and notebooks do), with the CLI's run folder, weights and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from .helpers import ROOT, TINY, assert_ok, clean_env, last_weights, rel_diff, run_cli

pytestmark = pytest.mark.slow  # trains through the CLI and in spawned process groups

# fp64, so that the 1-process CLI run and the 2-rank API run (SyncBN) agree whatever the CPU.
FP64 = [*TINY, "data.synthetic_size=160", "train.precision=fp64", "train.lr=0.05"]
JOIN_S = 300  # a hung rank fails the test instead of blocking it


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """The reference: the same config through ``python -m ddp_train``, one process."""
    out = tmp_path_factory.mktemp("api")
    assert_ok(run_cli([*FP64, f"out_dir={out}", "run_name=cli"]))
    return out


PLAIN = """
import json, sys
import ddp_train
from ddp_train.api import RunError
overrides = json.loads(sys.argv[1])
result = ddp_train.train({"train": {"epochs": 2}}, overrides)
try:  # the same folder again, without resume: the CLI's one-line refusal, as an exception
    ddp_train.train({"train": {"epochs": 2}}, overrides)
    again = None
except RunError as e:
    again = [str(e), e.exit_code]
print(json.dumps({"run_dir": str(result.run_dir), "test": result.test, "again": again}))
"""


def test_api_from_a_plain_process_equals_the_cli(cli_run):
    """A dict config plus overrides in a plain process: the CLI's run folder and weights; a second call on the
    finished folder raises RunError whose str is the CLI's one line, with its exit code."""
    overrides = [*FP64, f"out_dir={cli_run}", "run_name=plain"]
    res = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(overrides)], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert_ok(res)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    run_dir = Path(out["run_dir"])
    assert run_dir == cli_run / "plain"
    assert out["test"] == json.loads((run_dir / "metrics.json").read_text())["test"]
    assert rel_diff(last_weights(run_dir), last_weights(cli_run / "cli")) < 1e-12
    line, code = out["again"]
    assert line.startswith("ddp_train: error: run folder ") and "resume=auto" in line and "\n" not in line
    assert code == 2


def _rank(rank: int, world: int, yaml_path: str, overrides: list[str], out: str) -> None:
    """One rank of a group this process formed itself: train through the API, then a bad override, then use
    the group again (the API must have left it initialised)."""
    import torch
    import torch.distributed as dist

    from ddp_train.api import RunError, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.pg", rank=rank, world_size=world)
    result = train(yaml_path, overrides)
    try:
        train(yaml_path, [*overrides, "run_name=bad", "train.lr=fast"])
        bad = None
    except RunError as e:
        bad = [str(e), e.exit_code]
    still = torch.tensor([float(rank + 1)])
    dist.all_reduce(still)  # the caller's group still works after both calls
    torch.save({"run_dir": str(result.run_dir), "test": result.test, "bad": bad, "sum": still.item(),
                "initialized": dist.is_initialized()}, f"{out}.{rank}")
    dist.destroy_process_group()


def spawn_with_deadline(world: int, *args: Any) -> list[dict[str, Any]]:
    """``_rank`` in ``world`` spawned processes; fails (and kills them) when they do not all end in JOIN_S."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result"
        procs = mp.start_processes(_rank, args=(world, *args, out), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + JOIN_S
        try:
            while not procs.join(timeout=5):
                assert time.monotonic() < deadline, f"the ranks did not end within {JOIN_S} s (a hang)"
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def test_api_in_the_callers_process_group(cli_run, tmp_path):
    """Two processes that formed their own gloo group: the API joins it (YAML path + overrides), the weights
    equal the 1-process CLI run in fp64, a bad override raises the same one line on every rank with no hang,
    and the group is still usable afterwards."""
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text("train:\n  epochs: 2\n")
    results = spawn_with_deadline(2, str(yaml_path), [*FP64, f"out_dir={cli_run}", "run_name=group"])
    run_dir = cli_run / "group"
    assert [Path(r["run_dir"]) for r in results] == [run_dir, run_dir]
    assert results[0]["test"] == results[1]["test"] == json.loads((run_dir / "metrics.json").read_text())["test"]
    diff = rel_diff(last_weights(run_dir), last_weights(cli_run / "cli"))
    assert diff < 1e-9, f"API in the caller's 2-rank group vs the CLI's 1 process: weights differ by {diff}"
    for r in results:
        line, code = r["bad"]
        assert line.startswith("ddp_train: error: train.lr") and "\n" not in line, line
        assert code == 2
        assert r["initialized"] and r["sum"] == 3.0
    assert results[0]["bad"] == results[1]["bad"], "every rank raises the same line"
    assert not (cli_run / "bad").exists(), "a bad config writes nothing"
