"""User-facing errors.

A `UserError` is a mistake the user can fix (a missing file, a bad value, a server that does not
answer). The CLI prints its message on one line and exits with code 2; a traceback only with `-v`.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave us; the message names the thing and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config file, key or value is wrong."""


class StorageError(UserError):
    """A storage URI cannot be reached, read or written."""


class TrackingError(UserError):
    """The MLflow tracking server or registry cannot be reached, or a model/run is missing."""


class ModelError(UserError):
    """A model preset, path or hub id cannot be resolved or loaded."""
