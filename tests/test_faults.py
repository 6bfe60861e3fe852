"""Bad input stops a run before training: one line naming the file and the problem, a non-zero exit,
no traceback. Data faults go through the command line as a user meets them; checkpoint faults through
load_classifier, which every entry script uses to open a checkpoint."""
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import make_classifier, run_cli, write_dataset, write_records
from deepcnn.datamodule import CifarDataModule
from deepcnn.module import Classifier
from deepcnn.errors import CheckpointError, DataError
from deepcnn.checkpoints import load_classifier
from deepcnn.records import RECORD_SIZE, open_dataset

TINY_RUN = ("data.batch_size=16", "data.eval_batch_size=16", "trainer.max_steps=4", "trainer.val_check_interval=2",
            "trainer.precision=32", "data.download=false", "data.val_size=0")


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def append(path, data: bytes):
    with open(path, "ab") as f:
        f.write(data)


# fault name -> (damage done to a good dataset folder, the file named, what the message must say)
DATA_FAULTS = {
    "truncated mid-record": (lambda d: truncate(d / "data_batch_2.bin", 10 * RECORD_SIZE + 1000), "data_batch_2.bin",
                             "31,730 bytes is not a whole number of 3,073-byte records "
                             "(10 records and 1,000 bytes over: truncated or extra bytes)"),
    "extra bytes": (lambda d: append(d / "test_batch.bin", b"\0" * 5), "test_batch.bin",
                    "98,341 bytes is not a whole number of 3,073-byte records "
                    "(32 records and 5 bytes over: truncated or extra bytes)"),
    "empty file": (lambda d: truncate(d / "data_batch_1.bin", 0), "data_batch_1.bin", "file is empty"),
    "label outside the classes": (lambda d: write_records(d / "data_batch_1.bin", [0, 1, 2, 2, 1, 3, 0, 9]),
                                  "data_batch_1.bin",
                                  "record 5 has label 3, outside the 3 classes named in the class-name file "
                                  "(2 such records)"),
    "missing test_batch.bin": (lambda d: (d / "test_batch.bin").unlink(), "test_batch.bin", "file is missing"),
    "missing batches.meta.txt": (lambda d: (d / "batches.meta.txt").unlink(), "batches.meta.txt",
                                 "class-name file is missing"),
    "malformed batches.meta.txt": (lambda d: (d / "batches.meta.txt").write_bytes(b"cat\n\xffdog\n"),
                                   "batches.meta.txt", "class-name file is not UTF-8 text (invalid start byte at "
                                                       "byte 4)"),
}


@pytest.mark.parametrize("fault", DATA_FAULTS)
def test_bad_data_stops_before_training(fault, tmp_path):
    damage, filename, problem = DATA_FAULTS[fault]
    folder = write_dataset(tmp_path / "data")
    damage(folder)
    run_dir = tmp_path / "run"
    result = run_cli("train.py", f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", *TINY_RUN)
    assert result.returncode == 2
    assert f"deepcnn: error: {folder / filename}: {problem}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "step " not in result.stdout
    assert not (run_dir / "checkpoints").exists()


def test_missing_data_folder_stops_before_training(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = run_cli("train.py", f"data.data_dir={missing}", f"hydra.run.dir={tmp_path / 'run'}", *TINY_RUN)
    assert result.returncode == 2
    assert f"deepcnn: error: {missing}: folder does not exist, and data.download=false" in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists()


@pytest.mark.parametrize("content, problem", [
    (b"", "class-name file names no classes"),
    (b"\n \n\n", "class-name file names no classes"),
    (b"cat\n\n", "class-name file names 1 class (cat); a classifier needs at least 2"),
    (b"cat\ndog\ncat\nship\ndog\n", "class-name file repeats cat, dog"),
    ("\n".join(f"c{i}" for i in range(257)).encode(), "class-name file names 257 classes; a label byte holds at most "
                                                       "256"),
])
def test_malformed_class_names(content, problem, tmp_path):
    folder = write_dataset(tmp_path)
    (folder / "batches.meta.txt").write_bytes(content)
    with pytest.raises(DataError) as err:
        open_dataset(tmp_path)
    assert str(err.value) == f"{folder / 'batches.meta.txt'}: {problem}"


def test_data_folder_that_is_a_file(tmp_path):
    not_a_folder = write_dataset(tmp_path) / "data_batch_1.bin"
    with pytest.raises(DataError) as err:
        CifarDataModule(data_dir=str(not_a_folder)).prepare_data()
    assert str(err.value) == f"{not_a_folder}: is a file, not a folder of CIFAR binary batches"


def tiny_classifier(model=None) -> Classifier:
    return make_classifier(model=model)


def lightning_checkpoint(classifier: Classifier) -> dict:
    """The parts of a Lightning checkpoint that load_classifier reads."""
    return {"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams),
            "deepcnn_history": {"loss": [(1, 2.5)], "accuracy": []}}


def test_good_checkpoint_loads_with_its_weights(tmp_path):
    original = tiny_classifier()
    torch.save(lightning_checkpoint(original), tmp_path / "good.ckpt")
    loaded = load_classifier(tmp_path / "good.ckpt")
    assert not loaded.training
    assert loaded.history == {"loss": [(1, 2.5)], "accuracy": []}
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def write_text(path):
    path.write_text("step 1/10  loss 2.3\n")


def write_garbage(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def write_cut_checkpoint(path):
    torch.save(lightning_checkpoint(tiny_classifier()), path)
    truncate(path, path.stat().st_size // 2)


def write_plain_state_dict(path):
    torch.save(tiny_classifier().state_dict(), path)


def write_tensor(path):
    torch.save(torch.zeros(3), path)


def write_other_architecture(path):
    # Settings of one network with the weights of another: what swapping checkpoints between runs gives.
    checkpoint = lightning_checkpoint(tiny_classifier())
    checkpoint["hyper_parameters"]["model"] = {"_target_": "deepcnn.models.DeepCNN", "widths": [8],
                                               "convs_per_block": 1}
    torch.save(checkpoint, path)


def write_other_class_count(path):
    checkpoint = lightning_checkpoint(tiny_classifier())
    checkpoint["hyper_parameters"]["classes"] = ["cat", "dog"]
    torch.save(checkpoint, path)


@pytest.mark.parametrize("write, problem", [
    (write_text, "not a readable PyTorch checkpoint"),
    (write_garbage, "not a readable PyTorch checkpoint"),
    (write_cut_checkpoint, "not a readable PyTorch checkpoint"),
    (write_plain_state_dict, "not a deepcnn checkpoint (no deepcnn model settings in it)"),
    (write_tensor, "not a checkpoint (it holds a Tensor, not a dict)"),
    (write_other_architecture, "its weights do not fit the model it names"),
    (write_other_class_count, "its weights do not fit the model it names"),
])
def test_unusable_checkpoint_is_refused(write, problem, tmp_path):
    path = tmp_path / "model.ckpt"
    write(path)
    with pytest.raises(CheckpointError) as err:
        load_classifier(path)
    assert str(err.value).startswith(f"{path}: {problem}")


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_classifier(tmp_path / "gone.ckpt")
    assert str(err.value) == f"{tmp_path / 'gone.ckpt'}: checkpoint file does not exist"


def start_from_a_narrower_network(setting: str, tiny_data, tmp_path):
    """train.py for an 8-channel recipe network, `setting` (ckpt_path or init_from) a 4-channel one's checkpoint:
    the checkpoint's path and the run."""
    path = tmp_path / "model.ckpt"
    narrow = {"_target_": "deepcnn.models.RecipeCNN", "channels": 4, "hidden": [16, 8]}
    torch.save(lightning_checkpoint(tiny_classifier(narrow)), path)
    return path, run_cli("train.py", f"data.data_dir={tiny_data}", f"hydra.run.dir={tmp_path / 'run'}",
                         f"{setting}={path}", "model.channels=8", "model.hidden=[16,8]", *TINY_RUN)


def test_train_refuses_to_resume_from_another_network(tiny_data, tmp_path):
    path, result = start_from_a_narrower_network("ckpt_path", tiny_data, tmp_path)
    assert result.returncode == 2
    assert (f"deepcnn: error: {path}: was trained with model.channels=4, but this run has model.channels=8; resume "
            "with the settings it was trained with") in result.stderr
    assert "Traceback" not in result.stderr
    assert "step " not in result.stdout


def test_init_from_another_network_names_both_in_one_line(tiny_data, tmp_path):
    path, result = start_from_a_narrower_network("init_from", tiny_data, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"deepcnn: error: init_from={path}: holds the weights of RecipeCNN(channels=4, hidden=[16, 8]) for 3 classes, "
        "which do not fit this run's RecipeCNN(channels=8, hidden=[16, 8]) for 3 classes")
    assert "Traceback" not in result.stderr and "size mismatch" not in result.stderr


class RunsAShellCommand:
    """Unpickles as os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("save", [
    lambda obj, path: torch.save(obj, path),
    lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=4)),  # a plain pickle, as if renamed .ckpt
], ids=["torch.save", "pickle"])
def test_a_checkpoint_that_would_run_a_shell_command_names_it(save, tmp_path):
    made = tmp_path / "made-by-loading"
    path = tmp_path / "model.ckpt"
    save({"state_dict": {}, "hyper_parameters": RunsAShellCommand(f"touch {made}")}, path)
    with pytest.raises(CheckpointError) as err:
        load_classifier(path)
    assert str(err.value) == (f"{path}: refused: loading it would call posix.system, and a checkpoint holds only "
                              "tensors and plain values (this file could run code)")
    assert not made.exists()


def test_eval_reads_the_test_set_whatever_the_training_split(tiny_data, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(lightning_checkpoint(tiny_classifier()), path)
    # 128 training records, fewer than data.val_size's 5,000: a training run would refuse them.
    result = run_cli("eval.py", f"ckpt_path={path}", f"data.data_dir={tiny_data}", "data.download=false",
                     f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test accuracy: " in result.stdout and "(whole test set)" in result.stdout


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_64_bit_precision_is_one_line(script, tiny_data, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(lightning_checkpoint(tiny_classifier()), path)
    result = run_cli(script, f"ckpt_path={path}" if script == "eval.py" else "trainer.max_steps=2",
                     f"data.data_dir={tiny_data}", "data.download=false", "trainer.precision=64",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "deepcnn: error: trainer.precision: got 64; it must be auto, 32-true, bf16-mixed or 16-mixed (deepcnn's data "
        "and layers are float32: it does not train in 64 bits)"]
