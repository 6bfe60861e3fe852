"""Settings a run cannot use stop it before any work: one line naming the key and what it may be, exit
code 2; Hydra's own findings (an unknown key or option) end the same way."""
import importlib.util

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from conftest import ROOT, run_cli
from deepcnn import cli, settings  # noqa: F401  (cli registers the config resolvers)
from deepcnn.errors import SettingsError

# (override, the message's key and what it got, what the message says the key may be)
BAD = [
    ("data.batch_size=0", "data.batch_size: got 0", "an integer >= 1"),
    ("data.batch_size=-8", "data.batch_size: got -8", "an integer >= 1"),
    ("data.batch_size=abc", "data.batch_size: got 'abc'", "an integer >= 1"),
    ("data.batch_size=12.5", "data.batch_size: got 12.5", "an integer >= 1"),
    ("data.eval_batch_size=0", "data.eval_batch_size: got 0", "an integer >= 1"),
    ("data.crop_size=40", "data.crop_size: got 40", "an integer from 8 to 32"),
    ("data.crop_size=4", "data.crop_size: got 4", "an integer from 8 to 32"),
    ("data.prefetch=0", "data.prefetch: got 0", "an integer >= 1"),
    ("data.prefetch=-1", "data.prefetch: got -1", "an integer >= 1"),
    ("data.val_size=-5", "data.val_size: got -5", "an integer >= 0"),
    ("data.download=maybe", "data.download: got 'maybe'", "true or false"),
    ("data.augment.flip_prob=1.5", "data.augment.flip_prob: got 1.5", "a number in [0, 1]"),
    ("data.augment.pad=-1", "data.augment.pad: got -1", "an integer from 0 to 31"),
    ("data.augment.max_brightness=-3", "data.augment.max_brightness: got -3", "a number >= 0"),
    ("data.augment.contrast=[1.8,0.2]", "data.augment.contrast: got [1.8, 0.2]", "null or [low, high]"),
    ("trainer.max_steps=0", "trainer.max_steps: got 0", "an integer >= 1"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps: got 0", "an integer >= 1"),
    ("trainer.val_check_interval=30000", "trainer.val_check_interval: got 30000",
     "an integer from 1 to trainer.max_steps (20000)"),
    ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches: got 2", "1 (deepcnn counts optimizer"),
    ("optimizer.lr=0", "optimizer.lr: got 0", "a number > 0"),
    ("optimizer.lr=-0.1", "optimizer.lr: got -0.1", "a number > 0"),
    ("optimizer.momentum=1", "optimizer.momentum: got 1", "a number in [0, 1)"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay: got -1", "a number >= 0"),
    ("scheduler.decay_rate=0", "scheduler.decay_rate: got 0", "a number > 0"),
    ("scheduler.decay_steps=0", "scheduler.decay_steps: got 0", "an integer >= 1"),
    ("loss.label_smoothing=1.2", "loss.label_smoothing: got 1.2", "a number in [0, 1)"),
    ("model.channels=0", "model.channels: got 0", "an integer >= 1"),
    ("model.hidden=[384,0]", "model.hidden: got [384, 0]", "a non-empty list of integers >= 1"),
    ("tta=3", "tta: got 3", "an integer from 0 to 2"),
    ("seed=-1", "seed: got -1", "an integer >= 0"),
    ("+scheduler.warmup=10", "scheduler.warmup: unknown key",
     "deepcnn.schedules.Exponential takes decay_rate, decay_steps, staircase"),
    ("+optimizer.betas=[0.9,0.99]", "optimizer.betas: unknown key", "torch.optim.SGD takes"),
    ("+model.input_size=32", "model.input_size: set by deepcnn from data.crop_size", "leave it out"),
    ("+data.augment.hue=0.1", "data.augment.hue: unknown distortion", "data.augment takes random_crop, pad"),
    ("+callbacks.best_checkpoint.montior=val/loss", "callbacks.best_checkpoint.montior: unknown key",
     "pytorch_lightning.callbacks.ModelCheckpoint takes auto_insert_metric_name"),
]


def composed(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=unused", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("override,named,allowed", BAD, ids=[case[0] for case in BAD])
def test_bad_setting_is_named_with_what_it_may_be(override, named, allowed):
    cfg = composed(override)
    with pytest.raises(SettingsError) as err:
        settings.check(cfg)
        from deepcnn.datamodule import CifarDataModule  # the augment keys are the data module's to refuse
        CifarDataModule(**{k: v for k, v in cfg.data.items() if not k.startswith("_")})
    assert str(err.value).startswith(named) and allowed in str(err.value)


def test_presets_pass_the_checks():
    presets = sorted(path.stem for path in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert {"recipe", "recipe_tuned", "deep", "fast"} <= set(presets)
    for experiment in presets:
        settings.check(composed(f"experiment={experiment}"))


def test_recipe_tuned_is_the_recipe_with_another_optimizer_and_schedule():
    # The search behind it changed optimizer and schedule settings alone (README, "Searching").
    recipe, tuned = ({key: value for key, value in composed(f"experiment={name}").items()
                      if key not in ("hydra", "run_name")}
                     for name in ("recipe", "recipe_tuned"))
    assert {key for key in recipe.keys() | tuned.keys() if recipe.get(key) != tuned.get(key)} == {"optimizer",
                                                                                                 "scheduler"}
    assert tuned["optimizer"]["_target_"] == recipe["optimizer"]["_target_"] == "torch.optim.SGD"
    assert tuned["scheduler"]["_target_"] == recipe["scheduler"]["_target_"]


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", "deepcnn: error: data.batch_size: got 0; it must be an integer >= 1"),
    ("+seeed=1", "deepcnn: error: seeed: unknown setting (added by +seeed=1)"),
    ("+callbacks.best_checkpoint.every_n_step=10", "deepcnn: error: callbacks.best_checkpoint.every_n_step: unknown "
                                                    "key; pytorch_lightning.callbacks.ModelCheckpoint takes"),
    ("+callbacks.early_stopping.patience=3", "deepcnn: error: callbacks.early_stopping: not a chosen callback (it has "
                                             "no _target_); choose callbacks with callbacks=[default,early_stopping]"),
    ("data.bogus=1", "deepcnn: error: Could not override 'data.bogus'."),
    ("scheduler=steps", "deepcnn: error: In 'train': Could not find 'scheduler/steps'; Available options in "
                        "'scheduler':; constant; cosine; deep; exponential; linear; multistep; recipe_tuned; triangle; "
                        "wide_resnet"),
])
def test_command_line_mistakes_exit_2_with_one_line_before_reading_data(override, message, tmp_path):
    result = run_cli("train.py", override, f"data.data_dir={tmp_path / 'no-data'}", "data.download=false",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "no-data" not in result.stderr  # stopped before looking for the data


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="the sweep extra is installed")
def test_a_search_without_optuna_names_its_extra_before_any_run(tmp_path):
    result = run_cli("train.py", "-m", "hparams_search=recipe_optuna", f"data.data_dir={tmp_path / 'no-data'}",
                     f"hydra.sweep.dir={tmp_path / 'search'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "deepcnn: error: hparams_search needs Optuna, which comes with the sweep extra: pip install -e '.[sweep]'"]


@pytest.mark.parametrize("key,value,message", [
    ("accelerator", "foo", "trainer: You selected an invalid accelerator name: `accelerator='foo'`"),
    ("precision", "abc", "trainer: Precision 'abc' is invalid."),
    ("strategy", "nope", "trainer: You selected an invalid strategy name: `strategy='nope'`"),
])
def test_a_trainer_setting_lightning_refuses_is_one_line(key, value, message, tmp_path):
    from deepcnn.experiment import build_trainer

    cfg = composed(f"trainer.{key}={value}")
    with pytest.raises(SettingsError) as err:
        build_trainer(cfg.trainer, tmp_path, [], [])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("width", [16, 32])
def test_the_fast_network_takes_only_the_whitening_width_its_filters_fill(width):
    from deepcnn.models import whitening_filters, whitening_width

    assert whitening_width() == len(whitening_filters(torch.rand(8, 3, 8, 8), size=2))
    settings.check(composed("experiment=fast"))
    with pytest.raises(SettingsError) as err:
        settings.check(composed("experiment=fast", f"model.whiten_width={width}"))
    assert str(err.value) == (f"model.whiten_width: got {width}; it must be {whitening_width()}, the filters the fast "
                              "network's 2x2 whitening of 3 channels gives")


@pytest.mark.parametrize("overrides,message", [
    (["+seeed=1"], "seeed: unknown setting (added by +seeed=1); nothing reads it. The settings are listed by: "
                   "python src/train.py --cfg job"),
    (["init_from=a.ckpt", "ckpt_path=b.ckpt"], "init_from=a.ckpt and ckpt_path=b.ckpt: choose one; ckpt_path resumes "
                                               "a run where it stopped, init_from starts a new run from a "
                                               "checkpoint's weights"),
    (["trainer.precision=64"], "trainer.precision: got 64; it must be auto, 32-true, bf16-mixed or 16-mixed "
                               "(deepcnn's data and layers are float32: it does not train in 64 bits)"),
    (["trainer.precision=64-true"], "trainer.precision: got '64-true'; it must be auto"),
])
def test_settings_that_would_be_ignored_or_fail_later_are_refused(overrides, message):
    with pytest.raises(SettingsError) as err:
        settings.check(composed(*overrides), overrides)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("overrides", [["init_from=a.ckpt", "ckpt_path=auto"],
                                       ["++seed=3"], ["+trainer.accumulate_grad_batches=1"]])
def test_what_the_added_key_checks_leave_alone(overrides):
    settings.check(composed(*overrides), overrides)


def test_an_empty_data_dir_is_refused_rather_than_the_current_folder_filled(tmp_path):
    result = run_cli("train.py", "data.data_dir=", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "deepcnn: error: data.data_dir: empty; name the folder that holds cifar-10-batches-bin/ (or leave it out for "
        "$DEEPCNN_DATA, else ~/.cache/deepcnn)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
