"""Data-parallel training: each process its own share, BatchNorm over all of them, rank 0 writes."""
import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import run_cli, write_dataset
from deepcnn.datamodule import TrainStream, step_seed
from deepcnn.records import open_dataset
from deepcnn.sync_batchnorm import SyncedBatchNorm, synchronised


def test_processes_share_out_the_single_process_batches(tmp_path):
    records = open_dataset(write_dataset(tmp_path, per_file=50, train_files=2)).train
    single = TrainStream(records, 8, seed=3)
    ranks = [TrainStream(records, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 12
    for step in (0, 5, 11, 12, 30):  # across epoch boundaries too
        shares = [stream.indices(step) for stream in ranks]
        np.testing.assert_array_equal(np.concatenate(shares), single.indices(step))
        assert not set(shares[0]) & set(shares[1])
    assert step_seed(3, 7, rank=0) != step_seed(3, 7, rank=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batchnorm_process(rank: int, port: int, x: torch.Tensor, weights: torch.Tensor, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = synchronised(nn.Sequential(nn.BatchNorm2d(x.shape[1])))[0]
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 2.0, x.shape[1]))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, x.shape[1]))
        share = x.chunk(2)[rank].clone().requires_grad_()
        y = layer(share)
        (y * weights.chunk(2)[rank]).sum().backward()
        # Sent by value: a tensor would be sent as a shared-memory handle that dies with this process.
        tensors = (y.detach(), share.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var)
        out.put((rank, type(layer).__name__, *(t.numpy().copy() for t in tensors)))
    finally:
        dist.destroy_process_group()


def test_synced_batchnorm_over_two_cpu_processes_equals_batchnorm_over_the_whole_batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=generator) * 3 + 2
    weights = torch.randn(6, 4, 5, 5, generator=generator)
    context = mp.get_context("spawn")
    out = context.Queue()
    port = free_port()
    processes = [context.Process(target=batchnorm_process, args=(r, port, x, weights, out)) for r in (0, 1)]
    for p in processes:
        p.start()
    results = sorted((out.get(timeout=120) for _ in processes), key=lambda r: r[0])
    results = [(rank, name, *map(torch.from_numpy, arrays)) for rank, name, *arrays in results]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0

    whole = nn.BatchNorm2d(4)
    with torch.no_grad():
        whole.weight.copy_(torch.linspace(0.5, 2.0, 4))
        whole.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    inputs = x.clone().requires_grad_()
    y = whole(inputs)
    (y * weights).sum().backward()

    assert {r[1] for r in results} == {"SyncedBatchNorm"}
    torch.testing.assert_close(torch.cat([r[2] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r[3] for r in results]), inputs.grad)
    # each process holds the gradient of its own share; DDP adds them up (and divides by 2)
    torch.testing.assert_close(results[0][4] + results[1][4], whole.weight.grad)
    torch.testing.assert_close(results[0][5] + results[1][5], whole.bias.grad)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][6], whole.running_mean)
        torch.testing.assert_close(results[rank][7], whole.running_var)


def test_synced_batchnorm_is_plain_batchnorm_outside_a_process_group():
    plain = nn.BatchNorm2d(3)
    synced = synchronised(nn.Sequential(plain))[0]
    assert isinstance(synced, SyncedBatchNorm) and synced.weight is plain.weight
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(synced(x), nn.BatchNorm2d(3)(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)


STEPS = 200
SMALL_RUN = (
    # A small BatchNorm network, so that the synchronised BatchNorm is part of the run.
    "model=deep", "model.widths=[16,32]",
    # The learning rate decays to a hundredth by the end, so the accuracy does not hinge on the last steps.
    "scheduler.decay_rate=0.1", "scheduler.decay_steps=100", "scheduler.staircase=false",
    # Validation once, at the end; the test set is read once too.
    "trainer.accelerator=cpu", "trainer.val_check_interval=200", "trainer.log_every_n_steps=50",
    "data.eval_batch_size=2000", "data.download=false", "callbacks=none",
)


@pytest.mark.slow
def test_two_processes_reach_the_accuracy_of_one_on_the_same_images_and_only_rank_zero_writes(
        tmp_path, shared_data):
    data = f"data.data_dir={shared_data}"
    # One intra-op thread, as Lightning gives each of the two DDP processes, so that each run fits two cores.
    one = run_cli("train.py", *SMALL_RUN, data, f"trainer.max_steps={STEPS}", "data.batch_size=64",
                  f"hydra.run.dir={tmp_path / 'one'}", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = ("trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=32")
    two = run_cli("train.py", *SMALL_RUN, *ddp, data, f"trainer.max_steps={STEPS}", f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]

    single = json.loads((tmp_path / "one" / "results.json").read_text())
    double = json.loads((tmp_path / "two" / "results.json").read_text())
    assert single["steps"] == double["steps"] == STEPS
    # 200 steps of 64 images reach about 34% (chance is 10%; over seeds 33-35%). The two runs differ
    # only in rounding and in the random distortions.
    assert single["test_accuracy"] > 0.25 and double["test_accuracy"] > 0.25
    assert abs(single["test_accuracy"] - double["test_accuracy"]) < 0.03
    print(f"1 process: {single['test_accuracy']:.4f} at {single['images_per_second']} images/s; "
          f"2 processes: {double['test_accuracy']:.4f} at {double['images_per_second']} images/s")

    run = tmp_path / "two"
    assert two.stdout.count("test accuracy:") == 1  # the table is printed by rank 0 alone
    for report in ("results.json", "per_class_accuracy.json", "confusion.png", "loss.png", "accuracy.png"):
        assert (run / report).is_file(), report
    assert set(json.loads((run / "per_class_accuracy.json").read_text())) == set(single["per_class_accuracy"])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and len({event.name.split(".")[-2] for event in events}) == 1  # one writer's pid

    resumed = run_cli("train.py", *SMALL_RUN, *ddp, data, f"trainer.max_steps={STEPS + 20}",
                      f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    carried_on = json.loads((run / "results.json").read_text())
    assert carried_on["steps"] == STEPS + 20
    # it trained the 20 steps left, not all 220 again
    assert abs(carried_on["images_per_second"] * carried_on["train_seconds"] - 20 * 64) < 64
