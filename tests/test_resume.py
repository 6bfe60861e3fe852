"""Interruptions and faults during training never lose work: a signal writes a checkpoint that resumes
to exactly the uninterrupted run, a cut-off checkpoint write keeps the previous one, a diverging loss
stops with the last good checkpoint kept, and the same seed gives the same run (CPU, float32)."""
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli, write_dataset
from deepcnn import augment
from deepcnn.checkpoints import AtomicCheckpointIO, CheckpointWriteError
from deepcnn.datamodule import CifarDataModule
from deepcnn.checkpoints import load_classifier

MAX_STEPS, LR, DECAY_RATE, DECAY_STEPS = 30, 0.1, 0.9, 5
# 96 training records (128, 32 held out) in batches of 16: epochs of 6 steps, so a run of 30 steps crosses epoch
# boundaries, learning-rate decays (every 5 steps) and validations (every 10) both before and after a resume.
SETTINGS = ("data.batch_size=16", "data.eval_batch_size=16", "data.download=false", f"trainer.max_steps={MAX_STEPS}",
            "trainer.val_check_interval=10", "trainer.log_every_n_steps=1", "trainer.precision=32",
            "model.channels=8", "model.hidden=[32,16]", f"optimizer.lr={LR}", f"scheduler.decay_rate={DECAY_RATE}",
            f"scheduler.decay_steps={DECAY_STEPS}", "seed=7", "data.val_size=32")


def train_args(data, run_dir, *extra):
    return (f"data.data_dir={data}", f"hydra.run.dir={run_dir}", *SETTINGS, *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run: its run directory and its progress lines."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = run_cli("train.py", *train_args(data, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, progress(result.stdout)


def progress(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("step ")]


def step_of(line: str) -> int:
    return int(line.split()[1].split("/")[0])


def checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_run(run_dir, reference_dir, skip_accuracy_at: int | None = None):
    """Same test results, same loss history, and bit-identical final weights."""
    got, want = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference_dir))
    assert got["steps"] == want["steps"] == MAX_STEPS
    assert got["test_accuracy"] == want["test_accuracy"]
    assert got["per_class_accuracy"] == want["per_class_accuracy"]
    got, want = checkpoint(run_dir), checkpoint(reference_dir)
    assert got["global_step"] == want["global_step"] == MAX_STEPS
    assert got["deepcnn_history"]["loss"] == want["deepcnn_history"]["loss"]
    assert [step for step, _ in want["deepcnn_history"]["loss"]] == list(range(1, MAX_STEPS + 1))
    # Periodic checkpoints are written before that step's validation, so a run resumed from a
    # checkpoint at an evaluation step lacks that one point of the accuracy curve.
    assert ([p for p in got["deepcnn_history"]["accuracy"] if p[0] != skip_accuracy_at]
            == [p for p in want["deepcnn_history"]["accuracy"] if p[0] != skip_accuracy_at])
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name


def interrupt(args, signum, after_line: str, stderr_path):
    """Run train.py, send signum once it prints a line starting with after_line; (returncode, stderr)."""
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(ROOT / "src" / "train.py"), *args], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            if line.startswith(after_line):
                process.send_signal(signum)
                break
        process.communicate(timeout=300)
    return process.returncode, stderr_path.read_text()


def run_files(run_dir) -> set[str]:
    """Every file of a run folder, TensorBoard's events files by their folder only (their names hold a time)."""
    names = set()
    for path in run_dir.rglob("*"):
        if path.is_file():
            relative = path.relative_to(run_dir)
            names.add(str(relative.parent / "EVENTS") if path.name.startswith("events.out.tfevents.") else str(relative))
    return names


def logged_steps(run_dir, tag="train/loss") -> list[int]:
    """The steps at which TensorBoard has `tag`, over every events file of the run's one TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (run_dir / "tensorboard").iterdir()
    steps = []
    for events in sorted(version.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        steps += [event.step for event in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []
    return sorted(steps)


@pytest.mark.slow
@pytest.mark.parametrize("signum, resume", [(signal.SIGTERM, "printed"), (signal.SIGINT, "auto")],
                         ids=["SIGTERM, the printed command", "SIGINT, ckpt_path=auto"])
def test_signal_checkpoints_and_resume_equals_uninterrupted_run(signum, resume, data, reference, tmp_path):
    reference_dir, reference_lines = reference
    run_dir = tmp_path / "run"
    returncode, stderr = interrupt(train_args(data, run_dir), signum, "step 3/", tmp_path / "stderr")
    assert returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"deepcnn: {signal.Signals(signum).name} received; stopping after this step" in stderr
    found = re.search(r"deepcnn: stopped at step (\d+); resume with (python src/train.py .*)", stderr)
    stopped, command = int(found.group(1)), shlex.split(found.group(2))
    # The command repeats the run's own settings (its data folder among them) and names the checkpoint.
    assert f"data.data_dir={data}" in command and "optimizer.lr=0.1" in command
    assert command[-1] == f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    assert not any(arg.startswith("hydra.") for arg in command)
    assert 3 <= stopped < MAX_STEPS
    assert not (run_dir / "results.json").exists()
    saved = checkpoint(run_dir)
    assert saved["global_step"] == stopped
    assert [step for step, _ in saved["deepcnn_history"]["loss"]] == list(range(1, stopped + 1))
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(
        LR * DECAY_RATE ** (stopped // DECAY_STEPS), rel=1e-12)
    config = (run_dir / ".hydra" / "overrides.yaml").read_bytes()

    # As a user runs it, from wherever they are: any folder Hydra made for the command would land here.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if resume == "auto":
        command = [*command[2:-1], f"hydra.run.dir={run_dir}", "ckpt_path=auto"]
    else:
        command = command[2:]
    resumed = run_cli("train.py", *command, cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The resumed run carries on at the next step with the same losses and learning rates that the
    # uninterrupted run printed from there on: same step count, LR schedule, data order and distortions.
    assert progress(resumed.stdout) == [line for line in reference_lines if step_of(line) > stopped]
    assert_same_run(run_dir, reference_dir, skip_accuracy_at=stopped)

    # One run, in one folder: the same files as the uninterrupted run (one last.ckpt, the same best
    # checkpoint unless the stop came at a validation step, which the resumed run does not repeat).
    assert list(elsewhere.iterdir()) == []
    files = run_files(run_dir)
    assert {f for f in files if not f.startswith("checkpoints/best-")} == {
        f for f in run_files(reference_dir) if not f.startswith("checkpoints/best-")}
    if stopped % 10:
        assert files == run_files(reference_dir)
    # TensorBoard's curve carries on in the run's one TensorBoard folder, every step once.
    assert logged_steps(run_dir) == logged_steps(reference_dir)
    # train.log holds the first part, then the resumed one; the run's config is the one it was made with.
    logged = [int(n) for n in re.findall(rf"step (\d+)/{MAX_STEPS} ", (run_dir / "train.log").read_text())]
    assert logged == list(range(1, MAX_STEPS + 1))
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == config


@pytest.mark.parametrize("setting, saved, now", [("data.batch_size", 16, 8), ("seed", 7, 8), ("optimizer.lr", 0.1, 0.2),
                                                 ("scheduler.decay_steps", 5, 6), ("loss.label_smoothing", 0.0, 0.1),
                                                 ("data.augment.pad", 0, 2)])
def test_resume_refuses_another_data_order(setting, saved, now, data, reference, tmp_path):
    copy = tmp_path / "run" / "checkpoints" / "last.ckpt"
    copy.parent.mkdir(parents=True)
    copy.write_bytes((reference[0] / "checkpoints" / "last.ckpt").read_bytes())
    result = run_cli("train.py", *train_args(data, tmp_path / "run"), f"{setting}={now}", f"ckpt_path={copy}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (f"deepcnn: error: {copy}: was trained with {setting}={saved}, but this run has {setting}={now}; resume "
            f"with the settings it was trained with, or start a new run from its weights with init_from={copy}"
            ) in result.stderr
    # A refused resume leaves nothing behind: no config, log or TensorBoard events beside the checkpoint.
    assert run_files(tmp_path / "run") == {"checkpoints/last.ckpt"}


def copy_run(source, target):
    shutil.copytree(source, target)
    return {path: path.read_bytes() for path in target.rglob("*") if path.is_file()}


def test_a_resume_into_another_run_folder_is_refused_and_touches_neither(data, reference, tmp_path):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    before = copy_run(reference[0], run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    result = run_cli("train.py", *train_args(data, other), f"ckpt_path={last}", "trainer.max_steps=40", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"deepcnn: error: hydra.run.dir={other}: is not the run folder of {last} ({run_dir}); a resumed run carries "
        f"on in its own folder: leave hydra.run.dir out, or start a new run in {other} from its weights with "
        f"init_from={last}"]
    assert not other.exists()
    assert all(path.read_bytes() == content for path, content in before.items())
    assert set(before) == {path for path in run_dir.rglob("*") if path.is_file()}


def test_a_missing_checkpoint_is_refused_before_any_folder_is_made(data, tmp_path):
    missing = tmp_path / "gone" / "checkpoints" / "last.ckpt"
    result = run_cli("train.py", f"data.data_dir={data}", *SETTINGS, f"ckpt_path={missing}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"deepcnn: error: {missing}: checkpoint file does not exist"]
    assert list(tmp_path.iterdir()) == []


def test_a_finished_run_is_final(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    before = copy_run(reference[0], run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    for resume in ([f"ckpt_path={last}"], [f"hydra.run.dir={run_dir}", "ckpt_path=auto"]):
        result = run_cli("train.py", f"data.data_dir={data}", *SETTINGS, *resume, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"deepcnn: error: {run_dir}: finished at step {MAX_STEPS} ({run_dir / 'results.json'}); a finished run is "
            f"final: evaluate it with python src/eval.py ckpt_path={last}, extend it with a larger trainer.max_steps (a "
            f"step-based schedule), or start a new run from its weights with init_from={last}")
        assert all(path.read_bytes() == content for path, content in before.items())
        assert set(before) == {path for path in run_dir.rglob("*") if path.is_file()}
        assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_earlier_checkpoint_of_a_run_is_refused_naming_init_from(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(reference[0], run_dir)
    earlier = run_dir / "checkpoints" / "best-000010.ckpt"
    saved = checkpoint(run_dir)
    torch.save({**saved, "global_step": 10}, earlier)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    result = run_cli("train.py", f"data.data_dir={data}", *SETTINGS, f"ckpt_path={earlier}", cwd=tmp_path)
    assert result.returncode == 2
    last = run_dir / "checkpoints" / "last.ckpt"
    assert result.stderr.strip().splitlines() == [
        f"deepcnn: error: {earlier}: is at step 10, but its run went on to step {MAX_STEPS} ({last}); resuming it "
        f"would rewind the run: resume from {last}, or start a new run from its weights with init_from={earlier}"]
    assert all(path.read_bytes() == content for path, content in before.items())
    assert set(before) == {path for path in run_dir.rglob("*") if path.is_file()}


def test_same_seed_same_run(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *train_args(data, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert progress(result.stdout) == reference[1]
    assert_same_run(run_dir, reference[0])


def test_checkpoint_round_trip(data, reference):
    """load_classifier gives back the trained network: its weights, history and test-set results."""
    reference_dir = reference[0]
    saved = checkpoint(reference_dir)
    classifier = load_classifier(reference_dir / "checkpoints" / "last.ckpt")
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(classifier.state_dict()[name], tensor), name
    assert classifier.history == saved["deepcnn_history"]

    datamodule = CifarDataModule(data_dir=str(data), eval_batch_size=16, val_size=0, download=False)
    datamodule.setup()
    labels, predictions = [], []
    with torch.no_grad():
        for images, batch_labels in datamodule.test_dataloader():
            predictions.append(classifier(augment.preprocess(images, classifier.hparams.input_size)).argmax(1))
            labels.append(batch_labels)
    labels, predictions = torch.cat(labels), torch.cat(predictions)
    results = json.loads((reference_dir / "results.json").read_text())
    assert results["test_accuracy"] == pytest.approx((predictions == labels).float().mean().item(), abs=1e-7)
    for index, name in enumerate(datamodule.classes):
        of_class = labels == index
        assert results["per_class_accuracy"][name] == pytest.approx(
            (predictions[of_class] == index).float().mean().item(), abs=1e-7), name


@pytest.mark.parametrize("fault, raised", [(OSError(28, "No space left on device"), CheckpointWriteError),
                                           (KeyboardInterrupt(), KeyboardInterrupt)], ids=["disk full", "interrupted"])
def test_checkpoint_write_cut_off_keeps_previous_checkpoint(fault, raised, tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 10, "weights": torch.arange(1000.0)}, path)
    before = path.read_bytes()

    def cut_off(obj, out):
        out.write(before[: len(before) // 2])
        raise fault

    monkeypatch.setattr(torch, "save", cut_off)
    with pytest.raises(raised):
        AtomicCheckpointIO().save_checkpoint({"global_step": 20, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path)["global_step"] == 10
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_divergence_stops_naming_the_step_and_keeps_last_good_checkpoint(data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *train_args(data, run_dir, "optimizer.lr=1e30", "checkpoint_every_n_steps=1"))
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    found = re.search(r"deepcnn: error: loss became (nan|inf|-inf) at step (\d+); stopped, the last checkpoint "
                      rf"\({re.escape(str(run_dir / 'checkpoints' / 'last.ckpt'))}\) is kept \(lower optimizer.lr\)",
                      result.stderr)
    assert found, result.stderr[-3000:]
    diverged = int(found.group(2))
    lines = progress(result.stdout)
    assert [step_of(line) for line in lines] == list(range(1, diverged))
    assert all(math.isfinite(float(line.split("loss ")[1].split()[0])) for line in lines)
    assert not (run_dir / "results.json").exists()
    kept = checkpoint(run_dir)
    assert kept["global_step"] == diverged - 1
    assert all(math.isfinite(loss) for _, loss in kept["deepcnn_history"]["loss"])
    classifier = load_classifier(run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(tensor).all() for tensor in classifier.state_dict().values())


def test_a_staircase_run_is_extended_by_a_larger_max_steps(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(reference[0], run_dir)
    config = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    last = run_dir / "checkpoints" / "last.ckpt"
    longer = MAX_STEPS + 10
    result = run_cli("train.py", f"data.data_dir={data}", *SETTINGS, f"trainer.max_steps={longer}", f"ckpt_path={last}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # The staircase carries on where it was: lr * decay_rate^floor(step / decay_steps), steps 31 to 40 only.
    assert [(step_of(line), line.split("lr ")[1]) for line in progress(result.stdout) if " lr " in line] == [
        (step, f"{LR * DECAY_RATE ** (step // DECAY_STEPS):.3g}") for step in range(MAX_STEPS + 1, longer + 1)]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == longer
    assert checkpoint(run_dir)["global_step"] == longer
    # Still one run: its one TensorBoard folder holds every step once, its config is the one it started with.
    # (Lightning numbers the points after a finished run's final checkpoint from one further on: 31 to 40.)
    steps = logged_steps(run_dir)
    assert steps[:MAX_STEPS] == logged_steps(reference[0]) and len(set(steps)) == len(steps) == longer
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == config
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("scheduler", ["triangle", "linear", "cosine"])
def test_max_steps_cannot_move_a_schedule_that_spans_the_run(scheduler, data, tmp_path):
    run_dir = tmp_path / "run"
    staircase = ("scheduler.decay_rate", "scheduler.decay_steps")
    args = [arg for arg in train_args(data, run_dir) if not arg.startswith(staircase)]
    short = ("trainer.max_steps=4", "trainer.val_check_interval=2", f"scheduler={scheduler}")
    first = run_cli("train.py", *args, *short)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    last = run_dir / "checkpoints" / "last.ckpt"
    target = {"triangle": "Triangle", "linear": "Triangle", "cosine": "Cosine"}[scheduler]
    result = run_cli("train.py", *args, *short, "trainer.max_steps=6", "ckpt_path=auto")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"deepcnn: error: {last}: was trained with trainer.max_steps=4, which its schedule "
        f"(deepcnn.schedules.{target}) spans, but this run has trainer.max_steps=6; resume with "
        "trainer.max_steps=4 (only a step-based schedule, scheduler=exponential or constant, may be extended), or "
        f"start a new run from its weights with init_from={last}"]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_max_steps_below_the_checkpoints_step_is_refused(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    before = copy_run(reference[0], run_dir)
    (run_dir / "results.json").unlink()  # as a run stopped after its last step, before its results
    del before[run_dir / "results.json"]
    last = run_dir / "checkpoints" / "last.ckpt"
    result = run_cli("train.py", f"data.data_dir={data}", *SETTINGS, "trainer.max_steps=20", f"ckpt_path={last}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"deepcnn: error: {last}: is at step {MAX_STEPS}, past trainer.max_steps=20; resume with "
        f"trainer.max_steps={MAX_STEPS} or more, or start a new run from its weights with init_from={last}"]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_a_refused_resume_from_a_checkpoint_outside_any_run_leaves_no_folder(data, reference, tmp_path):
    kept = tmp_path / "model.ckpt"
    kept.write_bytes((reference[0] / "checkpoints" / "last.ckpt").read_bytes())
    result = run_cli("train.py", f"data.data_dir={data}", *SETTINGS, "seed=8", f"ckpt_path={kept}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"deepcnn: error: {kept}: was trained with seed=7, but this run has seed=8")
    # Hydra made a run folder for the command; the refusal took it back.
    assert list((tmp_path / "outputs" / "runs").iterdir()) == []
