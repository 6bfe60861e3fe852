"""Fetching the dataset from a local HTTP server: a failed download leaves nothing behind where data is
looked for, says what went wrong, and a retry succeeds."""
import hashlib
import io
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_cli, write_dataset
from deepcnn import download
from deepcnn.datamodule import CifarDataModule
from deepcnn.download import DEFAULT_CACHE
from deepcnn.errors import DataError
from deepcnn.records import CIFAR10


class Handler(BaseHTTPRequestHandler):
    """Serves server.files: path -> (body, bytes actually sent before the connection is closed)."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path not in self.server.files:
            self.send_error(404)
            return
        body, sent = self.server.files[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:sent])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests = {}, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def archive(tmp_path, extra: tarfile.TarInfo | None = None) -> bytes:
    """A .tar.gz holding a small cifar-10-batches-bin/ folder, and the extra member if given."""
    folder = write_dataset(tmp_path / "source", test_records=8)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=CIFAR10.folder)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"evil" * (extra.size // 4)))
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve(server, name: str, body: bytes, sent: int | None = None) -> str:
    server.files[f"/{name}"] = (body, len(body) if sent is None else sent)
    return f"{server.url}/{name}"


def datamodule(data_dir, url, checksum) -> CifarDataModule:
    data_dir.mkdir(parents=True, exist_ok=True)  # a download goes into an empty folder named for it
    return CifarDataModule(data_dir=str(data_dir), url=url, md5=checksum, batch_size=4, eval_batch_size=4, val_size=0)


def assert_nothing_left(data_dir):
    """Nothing but the (empty) lock file that serialises downloads."""
    assert sorted(p.name for p in data_dir.iterdir()) == [".download.lock"]
    assert (data_dir / ".download.lock").stat().st_size == 0


def assert_retry_succeeds(server, data_dir, body):
    url = serve(server, "cifar-10-binary.tar.gz", body)
    module = datamodule(data_dir, url, md5(body))
    module.prepare_data()
    module.setup()
    assert module.classes == ["cat", "dog", "ship"]
    assert (len(module.dataset.train), len(module.dataset.test)) == (128, 8)
    assert sorted(p.name for p in data_dir.iterdir()) == [".download.lock", CIFAR10.folder]


def test_download_extracts_and_opens(server, tmp_path):
    assert_retry_succeeds(server, tmp_path / "data", archive(tmp_path))


def test_processes_starting_together_download_once(server, tmp_path):
    body = archive(tmp_path)
    url = serve(server, "cifar-10-binary.tar.gz", body)
    data_dir = tmp_path / "data"
    modules = [datamodule(data_dir, url, md5(body)) for _ in range(4)]
    with ThreadPoolExecutor(len(modules)) as pool:
        list(pool.map(CifarDataModule.prepare_data, modules))
    assert server.requests == ["/cifar-10-binary.tar.gz"]
    for module in modules:
        module.setup()
        assert len(module.dataset.test) == 8


def test_connection_cut_halfway(server, tmp_path):
    body = archive(tmp_path)
    url = serve(server, "cut.tar.gz", body, sent=len(body) // 2)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as err:
        datamodule(data_dir, url, md5(body)).prepare_data()
    assert f"downloading them failed: {url}: connection closed after {len(body) // 2:,} of {len(body):,} bytes" \
        in str(err.value)
    assert_nothing_left(data_dir)
    assert_retry_succeeds(server, data_dir, body)


def test_wrong_md5(server, tmp_path):
    body = archive(tmp_path)
    url = serve(server, "cifar-10-binary.tar.gz", body)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as err:
        datamodule(data_dir, url, md5(b"something else")).prepare_data()
    assert (f"{url}: md5 is {md5(body)}, expected {md5(b'something else')}; the download was removed"
            in str(err.value))
    assert_nothing_left(data_dir)
    assert_retry_succeeds(server, data_dir, body)


def outside_file(name):
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


def outside_link(name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def without_data_filter(monkeypatch):
    """tarfile as Python 3.10.0-3.10.11 and 3.11.0-3.11.3 have it: no data_filter, and an extractall that
    takes no filter and extracts every member as it is."""
    monkeypatch.delattr(tarfile, "data_filter")
    extractall = tarfile.TarFile.extractall

    def unfiltered(self, path=".", members=None, *, numeric_owner=False):
        return extractall(self, path, members, numeric_owner=numeric_owner, filter="fully_trusted")

    monkeypatch.setattr(tarfile.TarFile, "extractall", unfiltered)


@pytest.fixture(params=["data filter", "fallback"])
def extraction(request, monkeypatch):
    """Both ways of extracting: tarfile's 'data' filter, and the checks used where Python lacks it."""
    if request.param == "fallback":
        without_data_filter(monkeypatch)
    return request.param


def special_file(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize("member, problem, fallback_problem", [
    (outside_file("../evil.txt"), "'../evil.txt' would be extracted to", None),
    (outside_file(f"{CIFAR10.folder}/../../evil.txt"), "would be extracted to", None),
    (outside_link(f"{CIFAR10.folder}/passwd", "/etc/passwd"), "is a link to an absolute path",
     f"'{CIFAR10.folder}/passwd' is a link; only files and folders are extracted"),
    (outside_link(f"{CIFAR10.folder}/up", "../../evil.txt"), "which is outside the destination",
     f"'{CIFAR10.folder}/up' is a link; only files and folders are extracted"),
    (special_file(f"{CIFAR10.folder}/null"), f"'{CIFAR10.folder}/null' is a special file",
     f"'{CIFAR10.folder}/null' is a special file; only files and folders are extracted"),
])
def test_member_outside_the_target_is_refused(member, problem, fallback_problem, extraction, server, tmp_path):
    body = archive(tmp_path, member)
    url = serve(server, "cifar-10-binary.tar.gz", body)
    data_dir = tmp_path / "box" / "data"
    with pytest.raises(DataError) as err:
        datamodule(data_dir, url, md5(body)).prepare_data()
    assert f"{data_dir / 'cifar-10-binary.tar.gz'}: cannot be extracted safely (" in str(err.value)
    assert (fallback_problem if extraction == "fallback" and fallback_problem else problem) in str(err.value)
    assert_nothing_left(data_dir)
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["data"]
    assert_retry_succeeds(server, data_dir, archive(tmp_path))


def test_absolute_member_never_lands_outside_the_target(extraction, server, tmp_path):
    # tarfile's 'data' filter strips the leading '/', so the member lands in the temporary folder and goes
    # with it; the fallback refuses the archive.
    target = tmp_path / "absolute-evil.txt"
    body = archive(tmp_path, outside_file(str(target)))
    data_dir = tmp_path / "data"
    if extraction == "fallback":
        with pytest.raises(DataError) as err:
            datamodule(data_dir, serve(server, "cifar-10-binary.tar.gz", body), md5(body)).prepare_data()
        assert f"cannot be extracted safely (member '{target}' has an absolute path)" in str(err.value)
        assert_nothing_left(data_dir)
        body = archive(tmp_path)
    assert_retry_succeeds(server, data_dir, body)
    assert not target.exists()


def test_fallback_extracts_files_and_folders_only_as_plain_files(monkeypatch, server, tmp_path):
    without_data_filter(monkeypatch)
    folder = write_dataset(tmp_path / "source", test_records=8)
    (folder / "test_batch.bin").chmod(0o4777)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=CIFAR10.folder)
    data_dir = tmp_path / "data"
    assert_retry_succeeds(server, data_dir, buffer.getvalue())
    extracted = data_dir / CIFAR10.folder
    for path in folder.iterdir():
        assert (extracted / path.name).read_bytes() == path.read_bytes()
    # written afresh: no set-user-id or world-writable bit comes from the archive
    assert (extracted / "test_batch.bin").stat().st_mode & 0o4002 == 0


# Tests run as root, whom permission bits do not stop: a regular file standing where a folder is needed, and
# /proc, a folder in which no file can be created, refuse writes to every user. Only the default cache is
# created for a download, so that is where these stand.
@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_data_folder_that_cannot_be_written_is_named(where, server, tmp_path, monkeypatch):
    if where == "under a file":
        (tmp_path / "file").write_text("in the way")
        data_dir, reason = tmp_path / "file" / "data", "Not a directory"
    else:
        data_dir, reason = Path(where) / "deepcnn", "No such file or directory"
        if not data_dir.parent.is_dir():
            pytest.skip("no /proc here")
    monkeypatch.setattr(download, "DEFAULT_CACHE", data_dir)
    body = archive(tmp_path)
    url = serve(server, "cifar-10-binary.tar.gz", body)
    with pytest.raises(DataError) as err:
        CifarDataModule(data_dir=str(data_dir), url=url, md5=md5(body), val_size=0).prepare_data()
    assert str(err.value).startswith(
        f"no CIFAR binary batches in {data_dir}, and downloading them failed: {data_dir}: cannot be written "
        f"({reason}); the download needs a folder it can write to.")
    assert server.requests == []


def test_failed_download_is_reported_without_traceback(server, tmp_path):
    body = archive(tmp_path)
    url = serve(server, "cifar-10-binary.tar.gz", body)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    result = run_cli("train.py", f"data.data_dir={data_dir}", f"data.url={url}", f"data.md5={md5(b'other')}",
                     f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=2")
    assert result.returncode == 2
    assert (f"deepcnn: error: no CIFAR binary batches in {data_dir}, and downloading them failed: {url}: md5 is "
            f"{md5(body)}, expected {md5(b'other')}; the download was removed") in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_left(data_dir)


def refused_download(server, tmp_path, data_dir) -> str:
    body = archive(tmp_path)
    url = serve(server, "cifar-10-binary.tar.gz", body)
    module = CifarDataModule(data_dir=str(data_dir), url=url, md5=md5(body), val_size=0)
    with pytest.raises(DataError) as err:
        module.prepare_data()
    assert server.requests == []
    return str(err.value)


NO_RECORDS = "no CIFAR binary batches (cifar-10-batches-bin/data_batch_*.bin, test_batch.bin, batches.meta.txt)"
ONLY_INTO = f"data.download=true downloads CIFAR-10 only into {DEFAULT_CACHE} or an empty folder"


def test_a_mistyped_data_dir_is_neither_created_nor_downloaded_into(server, tmp_path):
    mistyped = tmp_path / "cifra10"
    assert refused_download(server, tmp_path, mistyped) == (
        f"{mistyped}: {NO_RECORDS}: folder does not exist. {ONLY_INTO}")
    assert not mistyped.exists()


def test_a_folder_of_images_is_not_filled_with_cifar10(server, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    for split in ("train", "test"):
        (images / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(images / split / "cat" / "1.png")
    assert refused_download(server, tmp_path, images) == (
        f"{images}: {NO_RECORDS}: holds image folders: convert them with src/convert.py input={images} "
        f"output=NEW_FOLDER. {ONLY_INTO}")
    assert sorted(p.name for p in images.iterdir()) == ["test", "train"]


def test_a_folder_of_other_files_is_not_filled_with_cifar10(server, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (other / name).write_text("mine")
    assert refused_download(server, tmp_path, other) == (
        f"{other}: {NO_RECORDS}: holds other files (a.txt, b.txt, c.txt, ...). {ONLY_INTO}")
    assert len(list(other.iterdir())) == 4


def test_the_default_cache_is_made_and_downloaded_into(server, tmp_path, monkeypatch):
    cache = tmp_path / "home" / ".cache" / "deepcnn"
    monkeypatch.setattr(download, "DEFAULT_CACHE", cache)
    body = archive(tmp_path)
    module = CifarDataModule(data_dir=str(cache), url=serve(server, "cifar-10-binary.tar.gz", body), md5=md5(body),
                             val_size=0)
    module.prepare_data()
    module.setup()
    assert module.classes == ["cat", "dog", "ship"]
