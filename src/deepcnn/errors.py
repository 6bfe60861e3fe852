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


def report(err: UserError) -> None:
    print(f"deepcnn: error: {err}", file=sys.stderr)


@contextmanager
def reported_errors():
    try:
        yield
    except UserError as err:
        report(err)
        sys.exit(err.exit_code)
