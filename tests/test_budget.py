"""`budget_s`: the fast preset's measured table chooses the settings of the longest budget that fits,
which then flow into everything computed from them; budgets it cannot meet, presets without a table
and settings given twice are refused by name."""
import pytest
from omegaconf import OmegaConf

from deepcnn import settings
from deepcnn.budget import apply_budget
from deepcnn.errors import SettingsError
from test_config import composed


def table(tmp_path):
    return OmegaConf.to_container(composed(tmp_path, "experiment=fast").budgets)


def test_the_table_is_measured_and_buys_accuracy_with_time(tmp_path):
    rows = table(tmp_path)
    assert len(rows) >= 3
    seconds = [row["seconds"] for row in rows]
    accuracies = [row["val_accuracy"] for row in rows]
    assert seconds == sorted(seconds) and len(set(seconds)) == len(seconds)
    assert accuracies == sorted(accuracies) and len(set(accuracies)) == len(accuracies)


@pytest.mark.parametrize("offset", [0, 1, -1])
def test_the_longest_budget_that_fits_decides_the_settings(tmp_path, offset):
    rows = table(tmp_path)
    for number, row in enumerate(rows):
        budget = row["seconds"] + offset
        if budget < rows[0]["seconds"]:
            continue
        expected = row if offset >= 0 else rows[number - 1]
        cfg = composed(tmp_path, "experiment=fast", f"budget_s={budget}")
        assert apply_budget(cfg, [f"budget_s={budget}"]) == expected
        for key, value in expected["settings"].items():
            assert OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"] == value
        # What is computed from the chosen steps follows them.
        steps = expected["settings"]["trainer.max_steps"]
        assert cfg.trainer.val_check_interval == cfg.scheduler.total_steps == steps
        settings.check(cfg)


def test_without_a_budget_the_preset_is_unchanged(tmp_path):
    cfg = composed(tmp_path, "experiment=fast")
    before = OmegaConf.to_container(cfg, resolve=False)
    assert apply_budget(cfg, []) is None
    assert OmegaConf.to_container(cfg, resolve=False) == before


def test_budgets_it_cannot_meet_and_settings_given_twice_are_refused(tmp_path):
    shortest = table(tmp_path)[0]["seconds"]
    cfg = composed(tmp_path, "experiment=fast", f"budget_s={shortest - 1}")
    with pytest.raises(SettingsError, match=rf"budget_s={shortest - 1}: the shortest measured budget is {shortest} s"):
        apply_budget(cfg, [])
    cfg = composed(tmp_path, "experiment=fast", "budget_s=100000", "trainer.max_steps=7")
    with pytest.raises(SettingsError, match=r"trainer.max_steps: chosen by budget_s=100000; set one or the other"):
        apply_budget(cfg, ["budget_s=100000", "trainer.max_steps=7"])
    cfg = composed(tmp_path, "budget_s=600")
    with pytest.raises(SettingsError, match=r"budget_s=600: this preset has no table of budgets; experiment=fast"):
        apply_budget(cfg, [])
    cfg = composed(tmp_path, "experiment=fast", "budget_s=-5")
    with pytest.raises(SettingsError, match=r"budget_s: got -5; it must be null or a number of seconds > 0"):
        settings.check(cfg)


def test_the_preset_as_shipped_is_a_measured_row(tmp_path):
    cfg = composed(tmp_path, "experiment=fast")
    shipped = {key: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}), resolve=True)["v"]
               for key in ("trainer.max_steps", "model.widths", "data.early_steps")}
    assert shipped in [row["settings"] for row in table(tmp_path)]
