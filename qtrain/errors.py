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
