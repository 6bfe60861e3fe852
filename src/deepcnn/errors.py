"""Errors a user can act on, and how entry scripts report them: one line, no traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2
    prefix = "deepcnn: error: "


class DataError(UserError):
    """The dataset on disk is missing or malformed."""


class ImageError(UserError):
    """An image file cannot be read as an image."""


class DownloadError(UserError):
    """The dataset could not be fetched or did not verify."""


class CheckpointError(UserError):
    """A file is not a usable deepcnn checkpoint."""


class SettingsError(UserError):
    """A configuration value is out of range, of the wrong type, or unknown."""


class DivergenceError(UserError):
    """Training produced a non-finite loss."""

    exit_code = 3


class Interrupted(UserError):
    """A signal stopped the run; its checkpoint resumes it."""

    prefix = "deepcnn: "

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def print_error(err: UserError) -> None:
    print(f"{err.prefix}{err}", file=sys.stderr)


@contextmanager
def reported_errors():
    """Inside an entry script's task: a UserError ends the process with its one line and exit code.
    (Raised out of the task instead, Hydra would print its own report around it.)"""
    try:
        yield
    except UserError as err:
        print_error(err)
        sys.exit(err.exit_code)
