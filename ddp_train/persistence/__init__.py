"""A run's files, in both directions: the run folder and its lock (``rundir``, ``runlock``), the
run's identity (``runrecord``), checkpoint files and their format (``checkpoint``), what goes into
a checkpoint and comes back out of it (``state``), choosing and loading the checkpoint to continue
from (``resume``) and plain weights for fine-tuning, eval and predict (``weights``)."""
