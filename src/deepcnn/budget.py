"""`budget_s`: the settings a preset's measured table gives for a time budget.

A preset may carry `budgets`, rows of `seconds` (wall time from the command to the final accuracy,
measured on the machine bench/RESULTS.md names) and the `settings` that took that long. With
`budget_s=N` the row with the most seconds within N decides those settings, so that more minutes buy
more accuracy without tuning. A setting the row decides cannot also be given on the command line.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from deepcnn.cli import override_key
from deepcnn.errors import SettingsError


def apply_budget(cfg: DictConfig, overrides: list[str]) -> dict | None:
    """Writes the chosen row's settings into `cfg`; returns the row (None without a budget)."""
    budget = cfg.get("budget_s")
    if budget is None:
        return None
    table = cfg.get("budgets")
    rows = sorted(OmegaConf.to_container(table, resolve=True), key=lambda row: row["seconds"]) if table else []
    if not rows:
        raise SettingsError(f"budget_s={budget}: this preset has no table of budgets; experiment=fast has one")
    fitting = [row for row in rows if row["seconds"] <= budget]
    if not fitting:
        raise SettingsError(f"budget_s={budget}: the shortest measured budget is {rows[0]['seconds']} s; "
                            f"give at least that")
    row = fitting[-1]
    given = {override_key(override) for override in overrides}
    for key in row["settings"]:
        if key in given:
            raise SettingsError(f"{key}: chosen by budget_s={budget}; set one or the other")
    with open_dict(cfg):
        for key, value in row["settings"].items():
            OmegaConf.update(cfg, key, value, merge=False)
    return row
