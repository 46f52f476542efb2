"""ddp_train: a distributed training launcher for image classifiers (torchrun, SLURM, one process)."""

__version__ = "0.1.0"
