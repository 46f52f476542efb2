"""ddp_train under Ray Train: ``python launch/ray_train.py --workers N [--gpu] [--config PATH] [key=value ...]``.

Ray's ``TorchTrainer`` starts N workers and forms their process group; each worker calls
:func:`ddp_train.api.train` in that group. Restarts: ``--max-failures`` (Ray's ``FailureConfig``)
restarts the whole worker group after a worker dies, and the new group continues from the newest
checkpoint in the run folder (the driver fixes ``run_name`` and sets ``resume=auto``). So the run
folder (``out_dir``) must be on storage every worker reaches, as ``--storage`` must for Ray.

What is reported to Ray: one ``ray.train.report`` at the end of the run, with the test metrics and,
from rank 0, a ``Checkpoint`` of the run's ``checkpoints/`` folder (best.pt, last.pt, the step
files), which Ray copies under ``--storage``. Resuming does not need Ray's copy: ddp_train's own
checkpoints (every epoch, every ``checkpoint.every_steps``) are atomic, versioned and found by
``resume=auto``. See docs/engines.md: "Ray Train".

Exit codes: 0 finished; 2 a bad config or arguments (one line, checked here before any worker
starts); 1 the run failed after Ray's restarts (the workers' lines are in the log above).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_USER_ERROR = 2


def train_loop(config: dict[str, Any]) -> None:
    """What every Ray worker runs, in the group TorchTrainer formed: the run, then the one report to Ray."""
    import ray.train

    from ddp_train.api import train

    rank = ray.train.get_context().get_world_rank()
    if config.get("pid_dir"):  # which process is which rank, for whoever stops or kills one (tests/test_ray.py)
        Path(config["pid_dir"], f"rank{rank}-pid{os.getpid()}").write_text(f"{time.time()}\n")
    result = train(config["config"], config["overrides"])
    checkpoint = None
    if rank == 0:
        checkpoint = ray.train.Checkpoint.from_directory(str(result.run_dir / "checkpoints"))
    metrics = {f"test_{k}": v for k, v in result.test.items() if isinstance(v, (int, float))}
    ray.train.report({**metrics, "run_dir": str(result.run_dir)}, checkpoint=checkpoint)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/ray_train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (ranks); default 2")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU workers (gloo)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts Ray allows; default 3")
    p.add_argument("--storage", default="ray_results", help="Ray's storage_path (shared by all nodes)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (ray.init address); default: a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: Ray's count)")
    p.add_argument("--pid-dir", default=None, help="each worker writes rank<R>-pid<PID> here when it starts")
    p.add_argument("--config", metavar="PATH", help="YAML config file; defaults apply without one")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for python -m ddp_train")
    return p


def prepare(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The run folder's name and the overrides every worker (and every restart) uses; the config checked here,
    once, so a bad value is one line and no worker starts (Ray would otherwise retry it --max-failures times)."""
    from ddp_train.api import load

    cfg = load(args.config, args.overrides)
    name = cfg.run_name or f"{cfg.data.name}-{cfg.model.name}-ray-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    # A restarted group must find the same folder and continue from its newest checkpoint; Ray's workers
    # do not run in this directory, so the folder is named absolutely.
    out_dir = Path(cfg.out_dir).resolve()
    overrides = [*args.overrides, f"out_dir={out_dir}", f"run_name={name}", "resume=auto"]
    load(args.config, overrides)  # the worker's exact config is valid too
    return str(out_dir / name), overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        print("launch/ray_train.py: error: Ray Train is not installed; install it with: pip install -e '.[ray]'",
              file=sys.stderr)
        return EXIT_USER_ERROR
    from ddp_train.config import ConfigError

    if args.workers < 1 or args.max_failures < 0:
        print("launch/ray_train.py: error: --workers must be 1 or more and --max-failures 0 or more", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        run_dir, overrides = prepare(args)
    except ConfigError as e:
        print(f"ddp_train: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": args.config and str(Path(args.config).resolve()), "overrides": overrides, "pid_dir": args.pid_dir},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu),
        run_config=RunConfig(name=Path(run_dir).name, storage_path=str(Path(args.storage).resolve()),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray's TrainingFailedError: the workers' own lines are above
        print(f"launch/ray_train.py: the run failed after Ray's restarts ({type(e).__name__}); its run folder "
              f"{run_dir} keeps the newest checkpoint: run again with the same run_name to continue", file=sys.stderr)
        return EXIT_FAILED
    print(f"ray_train: finished: run folder {run_dir}; metrics {result.metrics}; Ray's checkpoint {result.checkpoint}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
