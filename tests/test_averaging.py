"""Lookahead averaging ends with the averaged weights however training ends, and the run reports those."""
import json
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from conftest import run_cli
from deepcnn.averaging import Lookahead
from deepcnn.checkpoints import load_classifier
from deepcnn.datamodule import CifarDataModule


def test_training_that_stops_before_max_steps_ends_on_the_average():
    net = torch.nn.Linear(2, 1, bias=False)
    lookahead = Lookahead(every=5, max_decay=0.5, power=1.0)
    with torch.no_grad():
        net.weight.fill_(1.0)
    lookahead.on_train_batch_end(SimpleNamespace(global_step=5, max_steps=100), SimpleNamespace(model=net), None,
                                 None, 0)
    with torch.no_grad():
        net.weight.fill_(3.0)  # the steps after the last averaging
    lookahead.on_train_end(SimpleNamespace(global_step=7, max_steps=100), SimpleNamespace(model=net))
    torch.testing.assert_close(net.weight, torch.ones(1, 2))


def test_training_that_reaches_max_steps_is_not_swapped_again():
    net = torch.nn.Linear(2, 1, bias=False)
    lookahead = Lookahead(every=5)
    lookahead.on_train_batch_end(SimpleNamespace(global_step=10, max_steps=10), SimpleNamespace(model=net), None,
                                 None, 0)
    with torch.no_grad():
        net.weight.fill_(3.0)  # a resumed, finished run trains no step: its weights stay
    lookahead.on_train_end(SimpleNamespace(global_step=10, max_steps=10), SimpleNamespace(model=net))
    torch.testing.assert_close(net.weight, torch.full((1, 2), 3.0))


@pytest.mark.slow
def test_an_early_stopped_run_reports_its_averaged_weights(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # Early stopping once validation accuracy reaches 0: at the first validation, step 4, a step after the
    # last averaging (step 3).
    result = run_cli("train.py", "experiment=fast", "model.widths=[8,16,16]", "callbacks=[fast,early_stopping]",
                     "callbacks.lookahead.every=3", "+callbacks.early_stopping.stopping_threshold=0.0",
                     f"data.data_dir={tiny_data}", "data.download=false", "data.batch_size=16", "data.val_size=32",
                     "data.eval_batch_size=16", "trainer.max_steps=12", "trainer.val_check_interval=4",
                     "trainer.precision=32", "logger=none", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 4
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    average = next(state["average"] for key, state in saved["callbacks"].items() if "Lookahead" in key)
    for key, value in average.items():
        torch.testing.assert_close(saved["state_dict"][f"model.{key}"], value)
    module = load_classifier(last)
    datamodule = CifarDataModule(data_dir=str(tiny_data), eval_batch_size=16, crop_size=32, val_size=32,
                                 download=False)
    datamodule.setup()
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, datamodule=datamodule, verbose=False)
    assert module.validation_result["accuracy"] == pytest.approx(results["val_accuracy"])
