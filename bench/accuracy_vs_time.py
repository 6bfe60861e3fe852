"""The fast preset against the record-holding peer at several time budgets: one sitting, one machine.

    .venv/bin/python bench/accuracy_vs_time.py --peer /tmp/airbench94_muon_cpu.py

The peer is airbench94_muon.py ported to the CPU by ../shared/anchors/airbench/port.py (its code stays
out of this repository). The peer runs first, at 3, 5 and its own 8 epochs; then deepcnn at
`budget_s` 150, 330 and the peer's 8-epoch wall time, so that each budget is met on the machine as
it is in this sitting. Every point is one fresh process, seed 0, trained on all 50,000 images: its
whole-test-set accuracy and its wall time from the command to the final accuracy. Prints the table
and draws both curves into bench/accuracy_vs_time.png.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runs import DATA, ROOT, run_peer, train  # noqa: E402

PEER_EPOCHS = [3, 5, 8]
# deepcnn's budgets in seconds; the last is the peer's own (its 8 epochs), measured first.
BUDGETS = [150, 330]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, required=True, help="the ported airbench94_muon.py")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "accuracy_vs_time.png")
    parser.add_argument("--peer-measured", nargs="+", metavar="EPOCHS:ACCURACY:SECONDS",
                        help="the peer's points, measured earlier in this sitting (e.g. 8:0.9078:881): not rerun")
    args = parser.parse_args()
    points: dict[str, list[tuple[float, float, str]]] = {"deepcnn": [], "airbench94_muon": []}
    print("| who | setting | whole-test-set accuracy | wall s |")
    print("| --- | --- | ---: | ---: |")
    measured = {int(e): (float(a), float(w)) for e, a, w in (p.split(":") for p in args.peer_measured or [])}
    for epochs in PEER_EPOCHS:
        accuracy, wall = measured.get(epochs) or run_peer(args.peer, epochs, args.data)
        points["airbench94_muon"].append((wall, accuracy, f"{epochs} epochs"))
        print(f"| airbench94_muon (CPU port) | {epochs} epochs | {100 * accuracy:.2f}% | {wall:.0f} |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for budget in [*BUDGETS, int(wall)]:  # wall: the last peer run, its own 8 epochs
            label = f"budget_s={budget}"
            result, spent = train(Path(tmp) / f"budget{budget}", ["experiment=fast", "data.val_size=0", "seed=0", label],
                                  args.data)
            points["deepcnn"].append((spent, result["test_accuracy"], label))
            print(f"| deepcnn | `experiment=fast {label}` ({result['steps']} steps) | "
                  f"{100 * result['test_accuracy']:.2f}% | {spent:.0f} |", flush=True)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for who, seen in points.items():
        seen.sort()
        axes.plot([w for w, _, _ in seen], [100 * a for _, a, _ in seen], marker="o", label=who)
        for wall, accuracy, label in seen:
            axes.annotate(label, (wall, 100 * accuracy), fontsize=7, xytext=(4, -10), textcoords="offset points")
    axes.set_xlabel("wall seconds, command to final accuracy")
    axes.set_ylabel("whole-test-set accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
