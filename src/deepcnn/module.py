"""The LightningModule: network, loss, accuracy metrics and the stepped learning-rate schedule."""
from __future__ import annotations

from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from deepcnn import augment
from deepcnn.errors import CheckpointError, DivergenceError


def decayed_lr(step: int, lr: float, decay_rate: float, decay_steps: int, staircase: bool = True) -> float:
    """lr * decay_rate^(step / decay_steps), the exponent floored when staircase (tf's exponential_decay)."""
    exponent = step // decay_steps if staircase else step / decay_steps
    return lr * decay_rate**exponent


def triangle_lr(step: int, lr: float, total_steps: int, start: float, peak: float, end: float) -> float:
    """lr times a piecewise-linear factor: `start` at step 0, 1 at step peak * total_steps, `end` at the last."""
    top = max(1, round(peak * total_steps))
    if step <= top:
        return lr * (start + (1 - start) * step / top)
    return lr * (1 + (end - 1) * min(1.0, (step - top) / max(1, total_steps - top)))


def parameter_groups(model: torch.nn.Module, lr: float, weight_decay: float, bias_lr_scale: float) -> list[dict]:
    """Trainable parameters in two groups: BatchNorm biases learn `bias_lr_scale` times faster with the
    same decay per step (their weight decay divided by the scale); the rest keep lr. Frozen ones are left out."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   and m.bias is not None}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in norm_biases], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in norm_biases], "lr": lr * bias_lr_scale,
         "weight_decay": weight_decay / bias_lr_scale},
    ]
    return [g for g in groups if g["params"]]


class Classifier(pl.LightningModule):
    def __init__(self, model: dict, optimizer: dict, classes: list[str], crop_size: int, tta: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = hydra.utils.instantiate(model, num_classes=len(classes))
        self.model.to(memory_format=torch.channels_last)
        n = len(classes)
        self.val_accuracy = MulticlassAccuracy(n, average="micro")
        self.val_per_class = MulticlassAccuracy(n, average="none")
        self.test_accuracy = MulticlassAccuracy(n, average="micro")
        self.test_per_class = MulticlassAccuracy(n, average="none")
        self.test_confusion = MulticlassConfusionMatrix(n)
        self.history: dict[str, list[tuple[int, float]]] = {"loss": [], "accuracy": []}
        self.test_result: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        """Test-time logits: the weighted mean over the views of test-time augmentation (level `tta`)."""
        return sum(weight * self(view) for weight, view in augment.tta_views(images, self.hparams.tta))

    def setup(self, stage: str) -> None:
        # Before Lightning restores a checkpoint, so a resumed run keeps its saved whitening weights.
        if stage == "fit" and hasattr(self.model, "init_whitening"):
            self.model.init_whitening(self.trainer.datamodule.whitening_sample())

    def training_step(self, batch, batch_idx):
        images, labels = batch
        smoothing = self.hparams.optimizer.get("label_smoothing", 0.0)
        loss = F.cross_entropy(self(images), labels, label_smoothing=smoothing)
        if not torch.isfinite(loss):
            # Step numbers count optimizer steps taken, as the progress lines and loss history do.
            raise DivergenceError(
                f"loss became {loss.item()} at step {self.global_step + 1}; stopped, the last good checkpoint is kept "
                "(lower optimizer.lr, or resume from that checkpoint)"
            )
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            # Only on the steps whose values reach the logger: logging costs a measurable share of a step.
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            self.history["loss"].append((self.global_step + 1, loss.item()))
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.evaluate(images)
        self.val_accuracy.update(logits, labels)
        self.val_per_class.update(logits, labels)

    def on_validation_epoch_end(self):
        accuracy = self.val_accuracy.compute()
        per_class = self.val_per_class.compute()
        self.log("val/accuracy", accuracy, prog_bar=True)
        for name, value in zip(self.hparams.classes, per_class):
            self.log(f"val_per_class/{name}", value)
        self.val_accuracy.reset()
        self.val_per_class.reset()
        if self.trainer.state.fn == "fit":
            self.history["accuracy"].append((self.global_step, accuracy.item()))

    def test_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.evaluate(images)
        for metric in (self.test_accuracy, self.test_per_class, self.test_confusion):
            metric.update(logits, labels)

    def on_test_epoch_end(self):
        accuracy = self.test_accuracy.compute()
        per_class = self.test_per_class.compute()
        self.log("test/accuracy", accuracy)
        self.test_result = {
            "accuracy": accuracy.item(),
            "per_class": dict(zip(self.hparams.classes, per_class.tolist())),
            "confusion": self.test_confusion.compute().tolist(),
        }
        for metric in (self.test_accuracy, self.test_per_class, self.test_confusion):
            metric.reset()

    def configure_optimizers(self):
        cfg = self.hparams.optimizer
        groups = parameter_groups(self.model, cfg["lr"], cfg["weight_decay"], cfg["bias_lr_scale"])
        optimizer = torch.optim.SGD(groups, momentum=cfg["momentum"], nesterov=cfg["nesterov"])
        if cfg["schedule"] == "triangle":
            total = self.trainer.max_steps
            factor = lambda step: triangle_lr(step, 1.0, total, cfg["warmup_start"], cfg["peak"], cfg["final"])
        else:
            factor = lambda step: decayed_lr(step, 1.0, cfg["decay_rate"], cfg["decay_steps"], cfg["staircase"])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["deepcnn_history"] = self.history

    def on_load_checkpoint(self, checkpoint):
        self.history = checkpoint.get("deepcnn_history", {"loss": [], "accuracy": []})


def load_classifier(path: str | Path, map_location="cpu") -> Classifier:
    """A Classifier from a deepcnn checkpoint, or a CheckpointError that says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or not {"model", "optimizer", "classes", "crop_size"} <= set(hparams):
        raise CheckpointError(f"{path}: not a deepcnn checkpoint (no deepcnn model settings in it)")
    try:
        classifier = Classifier(**{k: hparams[k] for k in ("model", "optimizer", "classes", "crop_size")},
                                tta=hparams.get("tta", 0))
        classifier.load_state_dict(checkpoint["state_dict"])
    except Exception as err:
        raise CheckpointError(f"{path}: its weights do not fit the model it names ({err})") from None
    classifier.on_load_checkpoint(checkpoint)
    return classifier.eval()
