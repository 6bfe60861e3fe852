"""Runs never share or overwrite a directory, resume and init_from do what they say, a signal in any
phase ends with deepcnn's message, and messages say what is true."""
import json
import os

import pytest
import torch

from hydra.core.hydra_config import HydraConfig

from conftest import make_classifier, run_cli
from deepcnn import cli, reports
from deepcnn.checkpoints import load_classifier
from deepcnn.errors import CheckpointError
from deepcnn.module import accuracies

TINY = ("data.batch_size=16", "data.eval_batch_size=16", "data.val_size=32", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "trainer.precision=32", "data.download=false",
        "model.channels=8", "model.hidden=[16,8]")


def train(tiny_data, run_dir, *extra, env=None):
    return run_cli("train.py", f"data.data_dir={tiny_data}", f"hydra.run.dir={run_dir}", *TINY, *extra, env=env)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))  # as when Hydra picks a run's folder
    path = str(tmp_path / "runs" / "2026-11-29")
    claimed = []
    for _ in range(3):  # three processes: each starts with nothing claimed
        monkeypatch.setattr(cli, "_claimed", {})
        claimed.append(cli.unique_dir(path))
        assert cli.unique_dir(path) == claimed[-1]  # resolved again in the same process: the same folder
    assert claimed == [str(tmp_path / "runs" / name) for name in ("2026-11-29", "2026-11-29_1", "2026-11-29_2")]
    assert all(os.path.isdir(p) for p in claimed)


def test_a_directory_holding_a_run_is_reused_only_by_a_resume(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert train(tiny_data, run_dir).returncode == 0
    before = (run_dir / "results.json").read_bytes()
    again = train(tiny_data, run_dir)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1] == (f"deepcnn: error: {run_dir}: already holds a run; choose another "
                                                      "hydra.run.dir, or resume it with ckpt_path=auto")
    assert (run_dir / "results.json").read_bytes() == before


def test_ckpt_path_auto_starts_fresh_then_resumes_in_the_same_directory(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    first = train(tiny_data, run_dir, "ckpt_path=auto")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4
    longer = train(tiny_data, run_dir, "ckpt_path=auto", "trainer.max_steps=6")
    assert longer.returncode == 0, longer.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 6
    # it trained the 2 steps left, not 6 again
    assert round(results["images_per_second"] * results["train_seconds"]) == 2 * 16
    assert [line.split()[1] for line in longer.stdout.splitlines() if line.startswith("step ") and "/" in line] \
        == ["5/6", "6/6"]


def test_init_from_starts_a_new_run_from_the_weights_only(tiny_data, tmp_path):
    source = tmp_path / "source"
    assert train(tiny_data, source).returncode == 0
    start = source / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "new"
    result = train(tiny_data, run_dir, f"init_from={start}", "trainer.max_steps=2", "optimizer.lr=1e-12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 2
    new, old = load_classifier(run_dir / "checkpoints" / "last.ckpt"), load_classifier(start)
    for name, tensor in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[name], tensor, rtol=0, atol=1e-6)
    assert new.hparams.optimizer["lr"] == 1e-12 and [s for s, _ in new.history["loss"]] == [1, 2]
    assert not list((source / "checkpoints").glob("*.partial"))


def test_a_signal_during_the_final_test_pass_finishes_the_results_and_says_so(tiny_data, tmp_path):
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "signal_on_test.py").write_text(
        "import os, signal\nimport pytorch_lightning as pl\n\n\nclass SignalOnTest(pl.Callback):\n"
        "    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx):\n"
        "        if batch_idx == 0:\n            os.kill(os.getpid(), signal.SIGTERM)\n")
    run_dir = tmp_path / "run"
    result = train(tiny_data, run_dir, "+callbacks.signal._target_=signal_on_test.SignalOnTest",
                   env={"PYTHONPATH": str(helpers)})
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"deepcnn: a signal came during the final evaluation; training had finished and its results are in {run_dir}")
    assert json.loads((run_dir / "results.json").read_text())["status"] == "done"


def test_a_class_without_test_images_has_no_accuracy_rather_than_zero():
    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 4]])
    overall, per_class = accuracies(confusion, ["cat", "dog", "ship"])
    assert overall == pytest.approx(7 / 9)
    assert per_class == {"cat": pytest.approx(0.75), "dog": None, "ship": pytest.approx(0.8)}
    table = reports.accuracy_table({"val_accuracy": None, "test_accuracy": overall, "per_class_accuracy": per_class})
    assert table.splitlines() == ["test accuracy: 77.78% (whole test set)", "  cat    75.00%", "  dog       n/a",
                                  "  ship   80.00%"]


def test_a_checkpoint_whose_model_cannot_be_built_says_so(tmp_path):
    module = make_classifier()
    hparams = {**dict(module.hparams), "model": {"_target_": "deepcnn.models.NoSuchNet"}}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: the model it names cannot be built \("):
        load_classifier(path)


def test_divergence_before_any_checkpoint_does_not_claim_one_is_kept(tiny_data, tmp_path):
    result = train(tiny_data, tmp_path / "run", "optimizer.lr=1e30", "trainer.max_steps=20",
                   "trainer.val_check_interval=20")
    assert result.returncode == 3
    assert "no checkpoint had been written yet (lower optimizer.lr)" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
