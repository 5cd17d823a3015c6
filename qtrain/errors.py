"""User-facing error types.

Every message should name what went wrong *where* (file, record, option) and how to fix it,
so a user can act on it without reading a traceback.
"""


class QtrainError(Exception):
    """Base class for errors caused by user input (files, options, environment)."""


class DataError(QtrainError):
    """A corpus, dataset or tokenizer input is malformed or missing."""


class ConfigError(QtrainError):
    """An option or configuration value is invalid or inconsistent."""


class CheckpointError(QtrainError):
    """A checkpoint is missing, incomplete or incompatible."""


class UsageError(ConfigError):
    """The command line itself is wrong: an unknown or unsupported option, a missing one, a value
    of the wrong type or not among the choices. Exit status 2, as argparse and Unix tools use."""


class Interrupted(BaseException):
    """A signal stopped the run where there was nothing to finish (e.g. SIGTERM without --save).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it;
    `qtrain.cli.main` prints the message as one line and exits with `exit_code` (128 + signal).
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
