"""The validation split: held out of the training files by its own seed, never trained on, the same for
every run of a sweep and after a resume; without one, the curve is test accuracy and says so."""
import json

import numpy as np
import pytest

from conftest import run_cli, write_dataset
from deepcnn.datamodule import CifarDataModule, TrainStream
from deepcnn.records import split_indices


def held_out_and_trained(data, seed, split_seed=0, steps=40):
    module = CifarDataModule(str(data), batch_size=16, val_size=40, split_seed=split_seed, seed=seed, download=False)
    module.setup()
    pixels = lambda records: {bytes(image) for image in records.batch(np.arange(len(records)))[0]}  # noqa: E731
    stream = TrainStream(module.train_records, 16, seed)
    trained = set()
    for step in range(steps):  # eight epochs of the 88 kept records
        trained |= {bytes(image) for image in stream.batch(step)[0].numpy()}
    return module, pixels(module.val_records), trained


def test_split_is_disjoint_fixed_by_its_own_seed_and_never_trained_on(tmp_path):
    data = write_dataset(tmp_path / "data", train_files=1, per_file=128).parent  # 128 distinct random images
    module, held_out, trained = held_out_and_trained(data, seed=1)
    assert len(held_out) == 40 and len(module.train_records) == 88
    assert held_out.isdisjoint(trained) and len(trained) == 88
    kept, out = split_indices(128, 40, 0)
    assert set(kept).isdisjoint(out) and sorted([*kept, *out]) == list(range(128))
    np.testing.assert_array_equal(module.val_records.indices, out)
    for seed in (2, 99):
        assert held_out_and_trained(data, seed=seed)[1] == held_out  # whatever the run's seed
    assert held_out_and_trained(data, seed=1, split_seed=5)[1] != held_out


def test_split_is_the_same_after_resume_and_results_name_both_accuracies(tmp_path):
    data = write_dataset(tmp_path / "data").parent
    run_dir = tmp_path / "run"
    common = (f"data.data_dir={data}", "data.batch_size=16", "data.val_size=40", "trainer.val_check_interval=2",
              "trainer.precision=32", "data.download=false", f"hydra.run.dir={run_dir}")
    assert run_cli("train.py", *common, "trainer.max_steps=2").returncode == 0
    resumed = run_cli("train.py", *common, "trainer.max_steps=4", "ckpt_path=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    changed = run_cli("train.py", *common, "trainer.max_steps=6", "ckpt_path=auto", "data.split_seed=3")
    assert changed.returncode == 2 and "was trained with data.split_seed=0, but this run has data.split_seed=3" \
        in changed.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["objective"] == "val_accuracy" and results["steps"] == 4
    assert 0 <= results["val_accuracy"] <= 1 and 0 <= results["test_accuracy"] <= 1
    assert "validation accuracy: " in resumed.stdout and "test accuracy: " in resumed.stdout


def test_without_a_split_the_curve_is_test_accuracy_and_the_run_says_so(tmp_path):
    data = write_dataset(tmp_path / "data").parent
    run_dir = tmp_path / "run"
    result = run_cli("train.py", f"data.data_dir={data}", "data.batch_size=16", "data.val_size=0",
                     "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.precision=32",
                     "data.download=false", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("data.val_size=0: no validation split to select on") == 1
    assert "step 2  test accuracy" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["objective"] == "test_accuracy" and results["val_accuracy"] is None
    assert not list((run_dir / "checkpoints").glob("best-*"))


@pytest.mark.parametrize("val_size", [128, 500])
def test_a_split_as_large_as_the_training_set_is_refused(val_size, tmp_path):
    data = write_dataset(tmp_path / "data").parent
    module = CifarDataModule(str(data), val_size=val_size, download=False)
    with pytest.raises(Exception, match=rf"data.val_size={val_size} would hold out all 128 training records"):
        module.setup()
