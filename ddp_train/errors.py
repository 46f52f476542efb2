"""How a run ends, for whoever started it: the exit codes, and the error that means "bad input".

Every ``UserError`` is reported as one line and ends the process with :data:`EXIT_USER_ERROR`;
a stop signal ends it with :data:`EXIT_CHECKPOINTED` once the checkpoint is written. Anything
else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad input or environment: config, data, out_dir, a checkpoint, a run folder in use
EXIT_HANG = 3  # the hang watchdog ended the job: no rank completed a step within dist.hang_timeout_s
EXIT_CHECKPOINTED = 75  # EX_TEMPFAIL: "stopped cleanly with a checkpoint; run again with resume=auto"


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code :data:`EXIT_USER_ERROR`."""

    exit_code = EXIT_USER_ERROR


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message ("" when it has none): what a one-line report quotes of it."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
