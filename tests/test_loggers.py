"""Each logger writes what it should on a short run: TensorBoard events with the HPARAMS of the run's
overrides and final accuracies, a CSV of metrics, an MLflow run readable through MLflow's own client,
a W&B offline run folder. The optional ones skip, saying which extra, where it is not installed."""
import csv
import json

import pytest

from conftest import run_cli

SHORT = ("data.batch_size=16", "data.val_size=32", "trainer.max_steps=4", "trainer.val_check_interval=2",
         "trainer.log_every_n_steps=1", "trainer.precision=32", "data.download=false", "optimizer.lr=0.05")


def train(tiny_data, run_dir, *extra):
    result = run_cli("train.py", f"data.data_dir={tiny_data}", f"hydra.run.dir={run_dir}", *SHORT, *extra,
                     env={"WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def test_tensorboard_and_csv_record_the_curves_and_the_runs_hparams(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tmp_path / "run"
    results = train(tiny_data, run_dir, "logger=[tensorboard,csv]")
    (version,) = (run_dir / "tensorboard").iterdir()
    assert "optimizer.lr=0.05" in version.name
    scalars, hparams = {}, {}
    for events in sorted(version.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [e.value for e in accumulator.Scalars(tag)]
        try:
            contents = accumulator.PluginTagToContent("hparams").values()
        except KeyError:  # an events file without the HPARAMS summary
            contents = []
        for content in contents:
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                hparams.update({k: v.string_value or v.number_value for k, v in data.session_start_info.hparams.items()})
    assert len(scalars["train/loss"]) == 4 and len(scalars["val/accuracy"]) >= 2
    assert scalars["final/val_accuracy"] == pytest.approx([results["val_accuracy"]])
    assert scalars["final/test_accuracy"] == pytest.approx([results["test_accuracy"]])
    assert hparams["optimizer.lr"] in ("0.05", 0.05) and hparams["trainer.max_steps"] in ("4", 4)

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4
    finals = [float(r["final/test_accuracy"]) for r in rows if r.get("final/test_accuracy")]
    assert finals == pytest.approx([results["test_accuracy"]])


def test_mlflow_run_is_readable_through_mlflows_client(tiny_data, tmp_path):
    pytest.importorskip("mlflow", reason="logger=mlflow needs the optional extra: pip install -e '.[mlflow]'")
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = train(tiny_data, tmp_path / "run", "logger=mlflow", f"logger.mlflow.tracking_uri={store}")
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("deepcnn").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.05"
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4


def test_wandb_writes_an_offline_run_without_network(tiny_data, tmp_path):
    pytest.importorskip("wandb", reason="logger=wandb needs the optional extra: pip install -e '.[wandb]'")
    run_dir = tmp_path / "run"
    train(tiny_data, run_dir, "logger=wandb")
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_a_logger_whose_extra_is_missing_says_which_to_install(tiny_data, tmp_path):
    try:
        import mlflow  # noqa: F401
        pytest.skip("the mlflow extra is installed here")
    except ImportError:
        pass
    result = run_cli("train.py", f"data.data_dir={tiny_data}", f"hydra.run.dir={tmp_path / 'run'}", *SHORT,
                     "logger=mlflow")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("install it with: pip install -e '.[mlflow]'")


def test_without_a_logger_the_run_trains_and_drops_the_learning_rate_monitor(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", f"data.data_dir={tiny_data}", f"hydra.run.dir={run_dir}", *SHORT, "logger=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logger=none: lr_monitor would have nothing to write to and is off" in result.stdout + result.stderr
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4
    assert not (run_dir / "tensorboard").exists()
