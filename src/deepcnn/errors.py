"""Errors a user can act on, and how entry scripts report them: one line, no traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class DataError(UserError):
    """The dataset on disk is missing or malformed."""


class ImageError(UserError):
    """An image file cannot be read as an image."""


class DownloadError(UserError):
    """The dataset could not be fetched or did not verify."""


class CheckpointError(UserError):
    """A file is not a usable deepcnn checkpoint."""


class DivergenceError(UserError):
    """Training produced a non-finite loss."""

    exit_code = 3


def refuse_changed_settings(path, saved: dict, current: dict) -> None:
    """A resumed run keeps the settings its checkpoint was trained with: name the first one that differs.
    Keys the checkpoint does not hold (written by an older version) are not compared."""
    for key, now in current.items():
        if key in saved and saved[key] != now:
            raise CheckpointError(f"{path}: was trained with {key} {saved[key]}, but this run has {now}; "
                                  "resume with the settings it was trained with")


def report(err: UserError) -> None:
    print(f"deepcnn: error: {err}", file=sys.stderr)


@contextmanager
def reported_errors():
    try:
        yield
    except UserError as err:
        report(err)
        sys.exit(err.exit_code)
