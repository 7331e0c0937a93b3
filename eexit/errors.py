"""User-facing errors: one line, exit code 2, no traceback (see `eexit.cli`)."""


class EexitError(Exception):
    """Bad input from the user: the message says what is wrong and what is allowed."""

    exit_code = 2


class TrainingDiverged(EexitError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


class Interrupted(EexitError):
    """Ctrl-C: the message says where the run stopped and how to go on; exit code 130."""

    exit_code = 130
