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
# Where data.data_dir points unless told otherwise (conf/data/cifar10.yaml, through the data_cache resolver).
DEFAULT_CACHE = Path.home() / ".cache" / "deepcnn"
# Image-folder datasets (train/<class>/*, test/<class>/*) that src/convert.py turns into records.
IMAGE_SPLITS = ("train", "test")


MISSING_FOLDER = "folder does not exist"
# Processes downloading into one folder take turns on this file (see download_dataset).
LOCK = ".download.lock"


class DownloadRefused(DownloadError):
    """The folder is not one to download into (see download_refusal); the message says why."""


def download_refusal(folder: Path) -> str | None:
    """Why CIFAR-10 must not be downloaded into `folder` (which holds no records), or None. It goes into the
    default cache, or a folder that exists and is empty (hidden files aside, such as an earlier download's
    lock): never into a path that may be mistyped, nor beside other data."""
    if folder.resolve() == DEFAULT_CACHE.resolve():
        return None
    if not folder.is_dir():
        return MISSING_FOLDER
    entries = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
    if not entries:
        return None
    if all((folder / split).is_dir() and any(p.is_dir() for p in (folder / split).iterdir()) for split in IMAGE_SPLITS):
        return f"holds image folders: convert them with src/convert.py input={folder} output=NEW_FOLDER"
    return f"holds other files ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})"


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

    Extraction goes to a temporary folder beside dest, refusing members that would land outside it
    (absolute paths, '..', links out), then one rename.
    """
    final = dest / member
    with tempfile.TemporaryDirectory(dir=dest, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                extract_safely(tar, Path(tmp))
        except (tarfile.TarError, OSError) as err:
            raise DownloadError(f"{archive}: cannot be extracted safely ({err})") from None
        extracted = Path(tmp) / member
        if not extracted.is_dir():
            raise DownloadError(f"{archive}: has no folder {member}/")
        if final.exists():
            shutil.rmtree(final)
        extracted.replace(final)
    return final


def extract_safely(tar: tarfile.TarFile, target: Path) -> None:
    """Every member into target with tarfile's 'data' filter. Pythons older than 3.10.12 and 3.11.4 lack
    it: there, only regular files and folders whose names stay inside target are accepted, and their
    bytes are written afresh, so no link, device, owner or permission bit comes from the archive."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(target, filter="data")
        return
    root = target.resolve()
    for info in tar:
        if Path(info.name).is_absolute():
            raise tarfile.ExtractError(f"member {info.name!r} has an absolute path")
        path = (root / info.name).resolve()
        if not path.is_relative_to(root):
            raise tarfile.ExtractError(f"{info.name!r} would be extracted to {str(path)!r}, "
                                       "which is outside the destination")
        if info.isdir():
            path.mkdir(parents=True, exist_ok=True)
        elif info.isfile():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(info) as source, open(path, "wb") as out:
                shutil.copyfileobj(source, out)
        else:
            kind = "link" if info.issym() or info.islnk() else "special file"
            raise tarfile.ExtractError(f"{info.name!r} is a {kind}; only files and folders are extracted")


def download_dataset(url: str, md5: str, dest: Path, member: str) -> Path:
    """Fetch, verify and extract into dest; the archive is removed once extracted.

    Processes that start together (torchrun's, a sweep's) take turns on a lock file: the first downloads,
    the others find its folder in place, instead of writing the same files at once.
    """
    try:
        dest.mkdir(parents=True, exist_ok=True)
        lock = open(dest / LOCK, "w")
    except OSError as err:
        raise DownloadError(f"{dest}: cannot be written ({err.strerror}); the download needs a folder "
                            "it can write to") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        final = dest / member
        if final.is_dir():
            return final
        # Checked under the lock: the files of a download another process is making are not "other files".
        refusal = download_refusal(dest)
        if refusal:
            raise DownloadRefused(refusal)
        archive = dest / Path(url).name
        print(f"deepcnn: downloading {url} to {dest}", file=sys.stderr)
        fetch(url, archive, md5)
        try:
            return extract(archive, member, dest)
        finally:
            archive.unlink(missing_ok=True)
