"""The LightningDataModule: streams record batches and distorts them on the training device."""
from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from deepcnn import augment
from deepcnn.download import DEFAULT_CACHE, LOCK, MISSING_FOLDER, DownloadRefused, download_dataset, download_refusal
from deepcnn.checkpoints import refuse_changed_settings
from deepcnn.errors import DataError, DownloadError, SettingsError
from deepcnn.records import CIFAR10, Dataset, find_records_dir, open_dataset, split_indices


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The augmentation seed of one process's step: a function of (seed, step, rank) alone, so resuming
    replays it, and the processes of a data-parallel run distort their shares of a batch independently."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class TrainStream:
    """Training batches for steps start, start+1, ... forever: (images uint8, labels, step, mirror).

    The step stays a Python int, so deriving a step's augmentation seed never waits on a GPU.

    Step s takes batch s of its epoch's seeded permutation of every record; with several
    processes each takes its own slice of that batch position. A background thread reads
    ahead so that disk reads overlap the training step. `mirror` is None, leaving flips to chance,
    unless alternate_flips: then each record is mirrored by a seeded coin in epoch 0 and in
    every other epoch after, so that over any two epochs the network sees both of its sides.
    `prepare`, when given, turns each `together` consecutive steps' batches into the batches the stream
    yields, in the thread that iterates it (the data module's distortion). The reading thread waits while
    a group is prepared: on the CPU the two would take turns at the interpreter and the cores, and the
    distortion took twice as long (recipe, 2 cores: 14-19 ms a group of eight against 10-11 with the wait).
    """

    def __init__(self, records, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, prefetch: int = 4, alternate_flips: bool = False,
                 prepare: Callable[[list], Iterable] | None = None, together: int = 1):
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.start_step, self.rank, self.world_size, self.prefetch = start_step, rank, world_size, prefetch
        self.prepare, self.together = prepare, together
        self.coins = np.random.default_rng([seed, len(records)]).random(len(records)) < 0.5 if alternate_flips \
            else None
        self.steps_per_epoch = len(records) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(records)} training records cannot fill one step of {batch_size} x {world_size} process(es)"
            )
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, len(self.records))
        start = (position * self.world_size + self.rank) * self.batch_size
        return self._perm[start : start + self.batch_size]

    def batch(self, step: int):
        indices = self.indices(step)
        images, labels = self.records.batch(indices)
        mirror = None
        if self.coins is not None:
            mirror = torch.from_numpy(self.coins[indices] ^ bool(step // self.steps_per_epoch % 2))
        return torch.from_numpy(images), torch.from_numpy(labels), step, mirror

    def __iter__(self):
        ahead: queue.Queue = queue.Queue(maxsize=max(self.prefetch, self.together))
        stop, may_read = threading.Event(), threading.Event()
        may_read.set()

        def produce():
            step = self.start_step
            while not stop.is_set():
                may_read.wait()
                try:
                    item = self.batch(step)
                except Exception as err:  # handed to the consumer, which re-raises it in the training process
                    item = err
                while not stop.is_set():
                    try:
                        ahead.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, Exception):
                    return
                step += 1

        def take():
            item = ahead.get()
            if isinstance(item, Exception):
                raise item
            return item

        thread = threading.Thread(target=produce, name="deepcnn-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                batches = [take() for _ in range(self.together)]
                if self.prepare is None:
                    yield from batches
                    continue
                may_read.clear()
                try:
                    prepared = list(self.prepare(batches))
                finally:
                    may_read.set()
                yield from prepared
        finally:
            stop.set()
            may_read.set()
            thread.join()


class EvalStream:
    """Every record once, in file order, in batches of (images uint8, labels); this process's share only."""

    def __init__(self, records, batch_size: int, rank: int = 0, world_size: int = 1):
        self.records, self.batch_size = records, batch_size
        self.indices = np.arange(rank, len(records), world_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            images, labels = self.records.batch(self.indices[start : start + self.batch_size])
            yield torch.from_numpy(images), torch.from_numpy(labels)


# Settings of `augment.distort` that data.augment may set; alternate_flips is the stream's.
DISTORTIONS = [name for name in inspect.signature(augment.distort).parameters
               if name not in ("images", "generator", "crop_size", "mirror")]
AUGMENT_KEYS = [*DISTORTIONS, "alternate_flips"]


class CifarDataModule(pl.LightningDataModule):
    """CIFAR binary records: a training stream of distorted batches, a validation split held out of the
    training files (`val_size` records chosen by `split_seed`, the same for every seed of a sweep), and
    the test set. Records are read as uint8 pixels; training batches are moved to the training device and
    distorted there, `distort_at_once` images' worth of whole batches at a time (those of the first
    `early_steps` steps also shrunk to `early_size`, progressive resizing); evaluation batches leave as
    pixels, preprocessed by the model (`Classifier.logits`)."""

    def __init__(self, data_dir: str, batch_size: int = 128, eval_batch_size: int = 1000, crop_size: int = 24,
                 val_size: int = 5000, split_seed: int = 0, augment: dict | None = None, label: str = "fine",
                 download: bool = True, url: str = "", md5: str = "", seed: int = 0, prefetch: int = 4,
                 in_memory: bool = False, early_size: int | None = None, early_steps: int = 0,
                 distort_at_once: int = 1024):
        super().__init__()
        if not str(data_dir).strip():
            raise SettingsError("data.data_dir: empty; name the folder that holds cifar-10-batches-bin/ (or leave it "
                                "out for $DEEPCNN_DATA, else ~/.cache/deepcnn)")
        if early_steps and not (early_size and 0 < early_size <= crop_size):
            raise SettingsError(f"data.early_size={early_size}: the early steps' image side must be between 1 and "
                                f"data.crop_size={crop_size}")
        self.augment = dict(augment or {})
        unknown = sorted(set(self.augment) - set(AUGMENT_KEYS))
        if unknown:
            raise SettingsError(f"data.augment.{unknown[0]}: unknown distortion; data.augment takes "
                                f"{', '.join(AUGMENT_KEYS)}")
        self.distortions = {k: v for k, v in self.augment.items() if k in DISTORTIONS}
        self.alternate_flips = bool(self.augment.get("alternate_flips", False))
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size, self.crop_size = batch_size, eval_batch_size, crop_size
        self.val_size, self.split_seed = val_size, split_seed
        self.label, self.download, self.url, self.md5 = label, download, url, md5
        self.seed, self.prefetch, self.in_memory = seed, prefetch, in_memory
        self.early_size, self.early_steps, self.distort_at_once = early_size, early_steps, distort_at_once
        self.dataset: Dataset | None = None
        self.train_records = self.val_records = None

    def prepare_data(self) -> None:
        if find_records_dir(self.data_dir) is not None:
            return
        where = self.data_dir.resolve()
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise DataError(f"{where}: is a file, not a folder of CIFAR binary batches")
        if not self.download:
            problem = "no CIFAR binary batches here" if self.data_dir.is_dir() else "folder does not exist"
            raise DataError(f"{where}: {problem}, and data.download=false")
        try:
            refusal = download_refusal(self.data_dir)
            # Refused here, before a lock file is left behind; a folder that has one may be another process's
            # download in progress, and is checked again under that lock.
            if refusal and (refusal == MISSING_FOLDER or not (self.data_dir / LOCK).exists()):
                raise DownloadRefused(refusal)
            download_dataset(self.url, self.md5, self.data_dir, CIFAR10.folder)
        except DownloadRefused as refusal:
            raise DataError(f"{where}: no CIFAR binary batches ({CIFAR10.folder}/{CIFAR10.train_glob}, "
                            f"{CIFAR10.test_file}, {CIFAR10.label_names['fine'][1]}): {refusal}. data.download=true "
                            f"downloads CIFAR-10 only into {DEFAULT_CACHE} or an empty folder") from None
        except DownloadError as err:
            raise DataError(
                f"no CIFAR binary batches in {where}, and downloading them failed: {err}. "
                "Point data.data_dir (or $DEEPCNN_DATA) at a folder holding cifar-10-batches-bin/"
            ) from None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.dataset = open_dataset(self.data_dir, self.label)
        if self.in_memory:
            self.dataset.train, self.dataset.test = self.dataset.train.loaded(), self.dataset.test.loaded()
        count = len(self.dataset.train)
        if self.val_size >= count:
            raise DataError(f"{self.dataset.root}: data.val_size={self.val_size} would hold out all {count:,} "
                            "training records; choose fewer (0 for none)")
        kept, held_out = split_indices(count, self.val_size, self.split_seed)
        self.train_records = self.dataset.train.subset(kept) if self.val_size else self.dataset.train
        self.val_records = self.dataset.train.subset(held_out) if self.val_size else None

    @property
    def classes(self) -> list[str]:
        self.setup()
        return self.dataset.classes

    @property
    def validation_label(self) -> str:
        """What validation measures: the held-out split ("val"), or the test set when there is none."""
        return "val" if self.val_size else "test"

    def whitening_sample(self, count: int = 5000) -> torch.Tensor:
        """`count` training images as the network sees them at test time, to fit whitening to. Drawn by a
        fixed seed from all of them: records converted from an image folder come class by class, and the
        first 5,000 would all be airplanes."""
        self.setup()
        _, chosen = split_indices(len(self.train_records), min(count, len(self.train_records)), seed=0)
        images, _ = self.train_records.batch(chosen)
        return augment.preprocess(torch.from_numpy(images), self.crop_size)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def state_dict(self) -> dict:
        """What decides which records and distortions each step gets; saved in every checkpoint."""
        return {"data.batch_size": self.batch_size, "seed": self.seed, "world_size": self._rank_world()[1],
                "data.crop_size": self.crop_size, "data.val_size": self.val_size, "data.split_seed": self.split_seed,
                "data.early_size": self.early_size, "data.early_steps": self.early_steps,
                **{f"data.augment.{key}": value for key, value in sorted(self.augment.items())}}

    def load_state_dict(self, state: dict) -> None:
        # Step s of a resumed run reads batch s of the order these settings give: with other values it
        # would silently repeat some records and skip others.
        refuse_changed_settings(self.trainer.ckpt_path, state, self.state_dict())

    def train_dataloader(self):
        rank, world = self._rank_world()
        start = self.trainer.global_step if self.trainer is not None else 0
        return TrainStream(self.train_records, self.batch_size, self.seed, start, rank, world, self.prefetch,
                           self.alternate_flips, self.ready_batches, max(1, self.distort_at_once // self.batch_size))

    def val_dataloader(self):
        return EvalStream(self.val_records if self.val_size else self.dataset.test, self.eval_batch_size,
                          *self._rank_world())

    def test_dataloader(self):
        return EvalStream(self.dataset.test, self.eval_batch_size, *self._rank_world())

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # Batches are made in CPU memory: "moving" them to the CPU is a per-step cost for nothing.
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def ready_batches(self, batches: list) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive steps' raw batches (images uint8, labels, step, mirror) distorted on the training device in
        one go, then handed out a step at a time as (images, labels), each exactly as it would come alone: its
        step's own draws, its own early-steps shrink. On the CPU a distortion's cost is mostly its operations,
        not its images: in the recipe's run, eight batches together take 1.1 ms a step, one at a time 2.0."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        rank = self._rank_world()[0]
        images = torch.cat([images for images, _, _, _ in batches]).to(device)
        mirror = None if batches[0][3] is None else torch.cat([mirror for *_, mirror in batches]).to(device)
        generators = [torch.Generator(device=device).manual_seed(step_seed(self.seed, step, rank))
                      for _, _, step, _ in batches]
        distorted = augment.distort(images, generators, self.crop_size, mirror=mirror, **self.distortions)
        for (_, labels, step, _), x in zip(batches, distorted.split(len(distorted) // len(batches))):
            yield (augment.shrink(x, self.early_size) if step < self.early_steps else x), labels.to(device)
