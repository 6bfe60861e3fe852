"""Measures the fast preset's table of budgets again: each row's settings trained once, seed 42, on the
5,000-image validation split, wall time from the command to the final accuracy, printed as the rows
that conf/experiment/fast.yaml holds (copy them there to make `budget_s` choose by this machine's speed).

    .venv/bin/python bench/budget_table.py
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from runs import DATA, compose_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    rows = compose_config(["experiment=fast"]).budgets
    with tempfile.TemporaryDirectory() as tmp:
        for number, row in enumerate(rows):
            settings = [f"{key}={value}".replace(" ", "") for key, value in row.settings.items()]
            result, wall = train(Path(tmp) / f"row{number}", ["experiment=fast", *settings], args.data)
            print(f"  - seconds: {wall:.0f}\n    val_accuracy: {result['val_accuracy']:.4f}\n"
                  f"    settings: {{{', '.join(f'{k}: {v}' for k, v in row.settings.items())}}}", flush=True)


if __name__ == "__main__":
    main()
