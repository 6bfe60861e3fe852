"""Writing a file whole or not at all, and never over what is being read."""
from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from deepcnn.errors import UserError


class OutputError(UserError):
    """An output cannot be written where it was asked for."""


def refuse_output_over_inputs(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is one of the inputs (through a link too), lies inside an input folder, or
    holds an input: writing it would replace or change what is being read."""
    target = Path(output).resolve()
    for source in map(Path, inputs):
        resolved = source.resolve()
        if target == resolved or (target.exists() and source.exists() and target.samefile(source)):
            problem = "is the input"
        elif target.is_relative_to(resolved):
            problem = "lies inside the input folder"
        elif resolved.is_relative_to(target):
            problem = "holds the input"
        else:
            continue
        raise OutputError(f"{output}: {problem} {source}; writing it would change the input, choose another output")


@contextmanager
def replaced_on_success(path: str | Path):
    """Yield a temporary path beside `path`; when the block succeeds it is renamed over `path` in one
    step, and when it fails it is removed, so readers only ever see the old file or the new one.
    A missing folder is created."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; name a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path}: {path.parent} is a file, not a folder") from None
    except OSError as err:
        raise OutputError(f"{path}: cannot create its folder {path.parent} ({err.strerror})") from None
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
