"""Checkpoints are read as data: real ones load whole, and a file that would run code while loading is refused
before it runs."""
import builtins

import pytest
import torch

from conftest import run_cli, write_dataset
from deepcnn.checkpoints import read_checkpoint
from deepcnn.errors import CheckpointError

TINY_RUN = ("data.batch_size=16", "data.eval_batch_size=16", "data.val_size=32", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "data.download=false")
PRESETS = {"recipe": (), "fast": ("experiment=fast", "model.widths=[8,8,8]")}


@pytest.fixture(scope="module", params=list(PRESETS))
def trained(request, tmp_path_factory):
    """A checkpoint as training writes it, at this machine's default precision; the fast preset adds the
    lookahead average's state."""
    root = tmp_path_factory.mktemp(request.param)
    write_dataset(root / "data")
    result = run_cli("train.py", f"data.data_dir={root / 'data'}", *TINY_RUN, *PRESETS[request.param],
                     f"hydra.run.dir={root / 'run'}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, root / "run" / "checkpoints" / "last.ckpt"


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_a_real_checkpoint_reads_whole(trained):
    preset, path = trained
    checkpoint = read_checkpoint(path)
    assert same(checkpoint, torch.load(path, map_location="cpu", weights_only=False))
    assert checkpoint["global_step"] == 4
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters",
            "CifarDataModule", "deepcnn_history"} <= set(checkpoint)
    if preset == "fast":
        assert "average" in checkpoint["callbacks"]["Lookahead"]


class OpensAFile:
    """Unpickles as builtins.open(path, "w"): loading it with plain pickle creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path):
    made = tmp_path / "made-by-loading"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": OpensAFile(made)}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value) == (f"{path}: refused: loading it would call io.open, and a checkpoint holds only "
                              "tensors and plain values (this file could run code)")
    assert not made.exists()
    # What the refusal prevents: an unrestricted load runs the call.
    torch.load(path, weights_only=False)
    assert made.exists()


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("write, problem", [
    (lambda path: path.write_text("step 1/10  loss 2.3\n"), "not a readable PyTorch checkpoint ("),
    (lambda path: path.write_bytes(b""),
     "not a readable PyTorch checkpoint, damaged or cut short (the file ends early)"),
    (lambda path: (torch.save({"w": torch.zeros(1000)}, path), cut_in_half(path)),
     "not a readable PyTorch checkpoint, damaged or cut short (PytorchStreamReader failed reading zip archive"),
    (lambda path: torch.save(torch.zeros(3), path), "not a checkpoint (it holds a Tensor, not a dict)"),
    (lambda path: None, "checkpoint file does not exist"),
])
def test_a_file_that_is_no_checkpoint_is_named_with_its_problem(write, problem, tmp_path):
    path = tmp_path / "model.ckpt"
    write(path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(err.value)
