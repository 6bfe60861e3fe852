"""Training throughput of the recipe preset against the recipe as written (TensorFlow), side by side.

The TensorFlow script lives in ../shared/anchors (a measuring stick, never copied here). Runs
alternate between the two so that both see the same machine load; the ratio of medians is the figure.

    python3 -m venv .venv-tf && .venv-tf/bin/pip install tensorflow-cpu numpy
    .venv/bin/python bench/recipe_throughput.py --steps 1000 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from runs import DATA, ROOT, SHARED, train


def run_tf(python: str, data: Path, steps: int, out: Path) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([python, str(SHARED / "anchors" / "recipe_as_written_tf.py"), str(data), str(steps),
                           str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"the TensorFlow recipe failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--tf-python", default=str(ROOT / ".venv-tf" / "bin" / "python"))
    parser.add_argument("overrides", nargs="*", help="extra deepcnn overrides, e.g. trainer.precision=32")
    args = parser.parse_args()
    tf_rates, ours_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            tf = run_tf(args.tf_python, args.data, args.steps, Path(tmp) / f"tf{r}.json")
            ours, _ = train(Path(tmp) / f"run{r}", [f"trainer.max_steps={args.steps}", *args.overrides], args.data)
            tf_rates.append(tf["images_per_second"])
            ours_rates.append(ours["images_per_second"])
            print(f"round {r + 1}: recipe as written {tf['images_per_second']:8.1f} img/s "
                  f"(test {100 * tf['full_test_accuracy']:.1f}%)   deepcnn {ours['images_per_second']:8.1f} img/s "
                  f"(test {100 * ours['test_accuracy']:.1f}%)", flush=True)
    tf_median, ours_median = statistics.median(tf_rates), statistics.median(ours_rates)
    print(f"steps {args.steps}, rounds {args.rounds}: recipe as written {tf_median:.0f} img/s, "
          f"deepcnn {ours_median:.0f} img/s, ratio {ours_median / tf_median:.2f}x")


if __name__ == "__main__":
    main()
