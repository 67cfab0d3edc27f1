"""The one error type a user can cause: its message says what is wrong and what to do."""

import re
import warnings


class SegtrainError(ValueError):
    """A user-caused problem (bad flag, gin binding, data, or a diverged run).

    The CLI prints its message alone, without a traceback, and exits with ``exit_code``.

    Attributes:
      exit_code: the command's exit status.
      prefix: what the CLI prints before the message.
      hard_exit: end the process at once after the message (``os._exit``): after a lost
        cluster peer, TensorFlow's own teardown can wait for that peer forever.
    """

    exit_code = 1
    prefix = "error: "
    hard_exit = False


class Interrupted(SegtrainError):
    """Training stopped on a signal after saving a checkpoint; a rerun resumes from it.

    The exit status is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), which
    schedulers read as "killed by that signal" and may retry (Kubeflow's ExitCode policy does).
    """

    prefix = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class SegtrainWarning(UserWarning):
    """Works, but not as the user probably hopes (e.g. a precision that is slow here).

    The CLI prints it as one ``warning: ...`` line.
    """


def warn(message: str) -> None:
    warnings.warn(message, SegtrainWarning, stacklevel=3)


def user_message(error: Exception) -> str:
    """The message of a user error without the call context gin appends to it."""
    lines = str(error).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("In call to configurable")).strip()


# Data checks run inside tf.data; their messages start with this marker so the trainer can
# turn the framework's InvalidArgumentError back into a SegtrainError with just our text.
DATA_ERROR_MARKER = "segtrain data error: "


class data_errors:  # noqa: N801 (used as a context manager, reads like a statement)
    """Turns a failed in-pipeline data check back into a SegtrainError with just its message.

    The check runs inside tf.data, so it surfaces as an InvalidArgumentError wrapped in
    framework context, with quotes escaped; other errors pass through unchanged.

    Args:
      damaged: ``damaged(error) -> message or None`` for an error that may come from damaged
        data files (a DataLossError, a missing record file): the message replaces the error.
    """

    def __init__(self, damaged=None):
        self.damaged = damaged

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        import tensorflow as tf

        if self.damaged is not None and exc_type is not None and issubclass(exc_type, tf.errors.OpError):
            message = self.damaged(exc)
            if message:
                raise SegtrainError(message) from None

        if exc_type is not None and issubclass(exc_type, tf.errors.InvalidArgumentError):
            text = exc.message
            if DATA_ERROR_MARKER in text:
                message = text.split(DATA_ERROR_MARKER, 1)[1].split("\n", 1)[0].rstrip("]").strip()
                message = message.replace("\\'", "'").replace('\\"', '"')
                raise SegtrainError(message[0].upper() + message[1:]) from None
        return False


def xla_reason(message: str) -> str:
    """The line of a TensorFlow error that says why XLA failed, without node decorations."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Graph execution error", "Detected at node", "<stack"))]
    reason = next((line for line in useful if "unsupported operations" in line or "XLA" in line),
                  useful[0] if useful else "unknown error")
    return re.sub(r"\{\{node [^}]*\}\}", "", reason).strip()[:400]
