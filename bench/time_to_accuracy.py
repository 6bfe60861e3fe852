"""Time to accuracy of the fast preset: whole-test-set accuracy and wall time from the command to the
final accuracy (start-up, data loading and test-time augmentation included), one fresh process a seed.
It trains on all 50,000 training images (data.val_size=0), as the record-holding peer does.

    .venv/bin/python bench/time_to_accuracy.py --seeds 0 1 2
    .venv/bin/python bench/time_to_accuracy.py --seeds 0 1 2 --peer /tmp/airbench94_muon_cpu.py
    .venv/bin/python bench/time_to_accuracy.py --seeds 0 -- trainer.max_steps=150 tta=1
    .venv/bin/python bench/time_to_accuracy.py --precision-steps 30

--peer runs the record-holding peer (airbench94_muon.py ported to the CPU, its own 8 epochs) after the
first seed, so that drift in the machine's speed falls on both sides, and prints deepcnn's mean wall time
as a fraction of the peer's.

--precision-steps N instead times N training steps in bf16 mixed precision and in float32, alternating,
twice each, and prints the training loop's images/s for both.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from runs import DATA, run_peer, train

PEER_EPOCHS = 8  # the record's own setting


def time_to_accuracy(seeds: list[int], overrides: list[str], data: Path, tmp: Path, peer: Path | None) -> None:
    print("| seed | test accuracy | wall s | train s | train images/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    accuracies, walls = [], []
    peer_result = None
    for number, seed in enumerate(seeds):
        if peer and number == 1:
            peer_result = run_peer(peer, PEER_EPOCHS, data)
            print(f"| peer | {100 * peer_result[0]:.2f}% | {peer_result[1]:.0f} | | |", flush=True)
        result, wall = train(tmp / f"seed{seed}", ["experiment=fast", "data.val_size=0", f"seed={seed}", *overrides], data)
        accuracies.append(result["test_accuracy"])
        walls.append(wall)
        print(f"| {seed} | {100 * result['test_accuracy']:.2f}% | {wall:.0f} | {result['train_seconds']:.0f} | "
              f"{result['images_per_second']:,.0f} |", flush=True)
    print(f"mean over {len(seeds)} seed(s): {100 * statistics.mean(accuracies):.2f}% in {statistics.mean(walls):.0f} s "
          f"(slowest {max(walls):.0f} s)")
    if peer:
        accuracy, wall = peer_result or run_peer(peer, PEER_EPOCHS, data)
        print(f"peer (airbench94_muon, {PEER_EPOCHS} epochs): {100 * accuracy:.2f}% in {wall:.0f} s; deepcnn's mean "
              f"wall time is {statistics.mean(walls) / wall:.2f} of the peer's")


def precision_throughput(steps: int, overrides: list[str], data: Path, tmp: Path) -> None:
    rates: dict[str, list[float]] = {"bf16-mixed": [], "32-true": []}
    for round_ in range(2):
        for precision, seen in rates.items():
            result, _ = train(tmp / f"{precision}{round_}", ["experiment=fast", f"trainer.precision={precision}",
                                                             f"trainer.max_steps={steps}", "tta=0", *overrides], data)
            seen.append(result["images_per_second"])
    for precision, seen in rates.items():
        print(f"{precision}: {' / '.join(f'{r:,.0f}' for r in seen)} training images/s")
    ratio = statistics.mean(rates["bf16-mixed"]) / statistics.mean(rates["32-true"])
    print(f"bf16 mixed precision is {ratio:.2f}x float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precision-steps", type=int, help="time this many steps in bf16 and float32 instead")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--peer", type=Path, help="the ported airbench94_muon.py, to run in the same sitting")
    parser.add_argument("overrides", nargs="*", help="extra overrides for experiment=fast")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.precision_steps:
            precision_throughput(args.precision_steps, args.overrides, args.data, Path(tmp))
        else:
            time_to_accuracy(args.seeds, args.overrides, args.data, Path(tmp), args.peer)


if __name__ == "__main__":
    main()
