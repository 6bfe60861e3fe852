"""Writing a file whole or not at all."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_on_success(path: str | Path):
    """Yield a temporary path beside `path`; when the block succeeds it is renamed over `path` in one
    step, and when it fails it is removed, so readers only ever see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
