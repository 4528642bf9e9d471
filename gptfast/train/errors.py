"""Errors of a training run: the ones the user can fix (printed without a traceback), a
diverged loss, and an evaluation stopped by Ctrl-C."""

class TrainError(RuntimeError):
    """A problem the user can fix (settings, data, checkpoint); the CLI prints it without a traceback."""


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite; the last good checkpoint was left in place."""


class EvaluationInterrupted(Exception):
    """Ctrl-C/SIGTERM arrived during an evaluation, which stops at its next batch."""

