"""Outputs are written whole or not at all where that is possible, and into as they are where it is not:
a device, a FIFO or stdout is never replaced by a file, a link keeps pointing at what it names, and a full
device is one line."""
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import onnx
import pytest
import torch

from conftest import ROOT, run_cli
from deepcnn.export import export_onnx


def in_place(path: str) -> bool:
    """Checked before a test writes to a device: code that would replace it must fail here, not on the machine."""
    from deepcnn.files import written_in_place

    return written_in_place(Path(path))


def test_a_fifo_output_is_written_into_and_stays_a_fifo(small_checkpoint, tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    assert in_place(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    export_onnx(small_checkpoint, fifo)
    reader.join(timeout=60)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert onnx.load_from_string(received[0]).graph.input[0].name == "images"


def test_a_linked_output_writes_its_target_and_keeps_the_link(small_checkpoint, tmp_path):
    target = tmp_path / "models" / "model.onnx"
    target.parent.mkdir()
    target.write_text("an old model")
    link = tmp_path / "latest.onnx"
    link.symlink_to(target)
    export_onnx(small_checkpoint, link)
    assert link.is_symlink() and link.resolve() == target
    assert onnx.load(target).graph.input[0].name == "images"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]


def test_dev_null_stays_a_device(small_checkpoint, tmp_path):
    assert in_place("/dev/null")
    result = run_cli("export.py", f"ckpt_path={small_checkpoint}", "output=/dev/null", f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_full_device_is_one_line_and_stays_a_device(small_checkpoint, tmp_path):
    assert in_place("/dev/full")
    result = run_cli("export.py", f"ckpt_path={small_checkpoint}", "output=/dev/full", f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("deepcnn: error: /dev/full: cannot be written (No space left on "
                                                      "device)")
    assert "Traceback" not in result.stderr
    assert "wrote" not in result.stdout + result.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_model_exported_to_stdout_is_all_that_stdout_holds(small_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "src" / "export.py"), f"ckpt_path={small_checkpoint}",
                             "output=/dev/stdout", f"hydra.run.dir={tmp_path / 'h'}"], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert onnx.load_from_string(result.stdout).graph.input[0].name == "images"
    assert b"wrote /dev/stdout" in result.stderr


def test_predictions_to_stdout_by_name_or_to_a_full_stdout(small_checkpoint, tmp_path):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert in_place("/dev/stdout")
    named = run_cli("predict.py", f"ckpt_path={small_checkpoint}", f"input={image}", "output=/dev/stdout",
                    f"hydra.run.dir={tmp_path / 'h1'}")
    assert named.returncode == 0, named.stderr[-2000:]
    assert named.stdout.splitlines()[0] == "path,class,probability" and named.stdout.splitlines()[1].startswith(str(image))
    assert os.path.islink("/dev/stdout")
    assert in_place("/dev/full")
    full = run_cli("predict.py", f"ckpt_path={small_checkpoint}", f"input={image}", "output=/dev/full",
                   f"hydra.run.dir={tmp_path / 'h3'}")
    assert full.returncode == 2
    assert full.stderr.strip().splitlines() == ["deepcnn: error: /dev/full: cannot be written (No space left on device)"]
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(ROOT / "src" / "predict.py"), f"ckpt_path={small_checkpoint}",
                                 f"input={image}", f"hydra.run.dir={tmp_path / 'h2'}"], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["deepcnn: error: stdout: cannot be written (No space left on device)"]


def test_a_checkpoint_write_that_runs_out_of_space_names_the_file_and_the_room_left(tmp_path, monkeypatch):
    import errno
    import shutil

    from deepcnn import checkpoints

    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoints.AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)

    def full_disk(obj, out):
        out.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(2**30, 2**30 - 2**19, 2**19))
    with pytest.raises(checkpoints.CheckpointWriteError) as err:
        checkpoints.AtomicCheckpointIO().save_checkpoint({"global_step": 4}, path)
    assert str(err.value) == f"{path}: no space left on the device (0.5 MiB free)"
    assert torch.load(path, weights_only=True) == {"global_step": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


# src/train.py with a disk that fills at the run's second checkpoint write.
FILLS_AT_THE_SECOND_CHECKPOINT = """
import errno, os, runpy, sys
import torch
real_save, saves = torch.save, []
def save(obj, out, *args, **kwargs):
    saves.append(out)
    if len(saves) == 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_save(obj, out, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_run_whose_disk_fills_stops_in_one_line_with_its_resume_command(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", FILLS_AT_THE_SECOND_CHECKPOINT, str(ROOT / "src" / "train.py"),
         f"data.data_dir={tiny_data}", "data.download=false", "data.batch_size=16", "data.val_size=32",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.best_checkpoint=null",
         f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 2
    last = run_dir / "checkpoints" / "last.ckpt"
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"deepcnn: error: {last}: no space left on the device (") and line.endswith(
        f" MiB free); the previous checkpoint is kept: once there is room, resume with python src/train.py "
        f"data.data_dir={tiny_data} data.download=false data.batch_size=16 data.val_size=32 trainer.max_steps=4 "
        f"trainer.val_check_interval=2 callbacks.best_checkpoint=null ckpt_path={last}")
    assert "Traceback" not in result.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("script", ["eval.py", "train.py"])
def test_a_folder_where_the_run_folder_cannot_be_made_is_one_line(script, tmp_path):
    """Tests run as root, whom permission bits do not stop; no folder can be created in /proc by anyone."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    result = run_cli(script, *([f"ckpt_path={tmp_path / 'model.ckpt'}"] if script == "eval.py" else []),
                     cwd=Path("/proc"))
    assert result.returncode == 2
    group = "eval" if script == "eval.py" else "runs"
    assert result.stderr.strip().splitlines() == [
        f"deepcnn: error: /proc/outputs/{group}: the run's folder cannot be created there (No such file or directory); "
        "run from a folder you can write to, or name one with hydra.run.dir=FOLDER"]
