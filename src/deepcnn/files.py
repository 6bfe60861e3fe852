"""Writing a file whole or not at all, and never over what is being read."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from deepcnn.errors import UserError


class OutputError(UserError):
    """An output cannot be written where it was asked for."""


# Paths that name this process's own open files (stdout, ...) or devices.
OPEN_FILE_ROOTS = ("/dev/", "/proc/")


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


def written_in_place(path: Path) -> bool:
    """Whether an output must be written into as it is rather than replaced: a device, a FIFO or a socket
    (a file renamed over /dev/null would replace it for the whole machine), or one of this process's own
    open files (/dev/stdout, /dev/fd/N, /proc/self/fd/N), which the caller reads where it is."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) or str(path.absolute()).startswith(OPEN_FILE_ROOTS)


def no_space_message(path: Path) -> str:
    """What a write that ran out of space says: the file and the room left where it was going."""
    folder = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    return f"{path}: no space left on the device ({shutil.disk_usage(folder).free / 2**20:,.1f} MiB free)"


@contextmanager
def reported_write_errors(path: Path, only_no_space: bool = False):
    """An OSError while writing `path` becomes one line naming it: the disk full, or (unless only_no_space,
    where the block does more than write) what else the system said."""
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC and not written_in_place(path):
            raise OutputError(no_space_message(path)) from None
        if only_no_space and err.errno != errno.ENOSPC:
            raise
        raise OutputError(f"{path}: cannot be written ({err.strerror or err})") from None


@contextmanager
def replaced_on_success(path: str | Path):
    """Yield a temporary path beside `path`; when the block succeeds it is renamed over `path` in one
    step, and when it fails it is removed, so readers only ever see the old file or the new one.
    A missing folder is created; a link keeps its place and its target is replaced. What is not a regular
    file (a device, a FIFO, stdout) is written into once the block succeeds, from a scratch copy."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; name a file to write")
    if written_in_place(path):
        with tempfile.TemporaryDirectory(prefix="deepcnn-") as scratch:
            partial = Path(scratch) / path.name
            with reported_write_errors(path, only_no_space=True):
                yield partial
            with reported_write_errors(path), open(partial, "rb") as source, open(path, "wb") as out:
                shutil.copyfileobj(source, out)
        return
    target = Path(os.path.realpath(path))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path}: {target.parent} is a file, not a folder") from None
    except OSError as err:
        raise OutputError(f"{path}: cannot create its folder {target.parent} ({err.strerror})") from None
    partial = target.with_name(f".{target.name}.partial")
    try:
        with reported_write_errors(path, only_no_space=True):
            yield partial
        with reported_write_errors(path):
            os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
