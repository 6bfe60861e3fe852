"""Fetching the official CIFAR-10 archive: verified, extracted safely, moved into place whole."""
from __future__ import annotations

import fcntl
import hashlib
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from deepcnn.errors import DownloadError

CHUNK = 1 << 20


def fetch(url: str, target: Path, md5: str, timeout: float = 60.0) -> None:
    """Download url to target (through a temporary file) and check its md5."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                _progress(done, total)
            if total and done != total:
                raise DownloadError(f"{url}: connection closed after {done:,} of {total:,} bytes")
    except (urllib.error.URLError, OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{url}: download failed ({err})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        print(file=sys.stderr)
    if digest.hexdigest() != md5:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{url}: md5 is {digest.hexdigest()}, expected {md5}; the download was removed")
    partial.replace(target)


def _progress(done: int, total: int) -> None:
    if total:
        width = 30
        filled = width * done // total
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done / 2**20:6.1f} / {total / 2**20:.1f} MiB",
              end="", file=sys.stderr, flush=True)
    else:
        print(f"\r{done / 2**20:6.1f} MiB", end="", file=sys.stderr, flush=True)


def extract(archive: Path, member: str, dest: Path) -> Path:
    """Extract the folder `member` of a tar archive to dest/member, all or nothing.

    Extraction goes to a temporary folder beside dest with tarfile's 'data' filter, which refuses
    members that would land outside it (absolute paths, '..', links out), then one rename.
    """
    final = dest / member
    with tempfile.TemporaryDirectory(dir=dest, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise DownloadError(f"{archive}: cannot be extracted safely ({err})") from None
        extracted = Path(tmp) / member
        if not extracted.is_dir():
            raise DownloadError(f"{archive}: has no folder {member}/")
        if final.exists():
            shutil.rmtree(final)
        extracted.replace(final)
    return final


def download_dataset(url: str, md5: str, dest: Path, member: str) -> Path:
    """Fetch, verify and extract into dest; the archive is removed once extracted.

    Processes that start together (torchrun's, a sweep's) take turns on a lock file: the first downloads,
    the others find its folder in place, instead of writing the same files at once.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        final = dest / member
        if final.is_dir():
            return final
        archive = dest / Path(url).name
        print(f"deepcnn: downloading {url} to {dest}", file=sys.stderr)
        fetch(url, archive, md5)
        try:
            return extract(archive, member, dest)
        finally:
            archive.unlink(missing_ok=True)
