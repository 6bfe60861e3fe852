"""The LightningModule: the network, the loss, accuracy metrics and the learning-rate schedule, each
built from its config group, so that a checkpoint's hyperparameters rebuild the same run."""
from __future__ import annotations

import inspect

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torchmetrics.classification import MulticlassConfusionMatrix

from deepcnn import augment, optim
from deepcnn.patch_gradients import use_patch_gradients


def build_model(config: dict, num_classes: int, input_size: int) -> torch.nn.Module:
    """The network a model config names, for `num_classes` classes; networks whose layer sizes depend on
    the input (a `input_size` argument) are given the side of the square input."""
    takes = inspect.signature(hydra.utils.get_object(config["_target_"])).parameters
    sizes = {"input_size": input_size} if "input_size" in takes else {}
    return instantiate(config, num_classes=num_classes, **sizes)


def filters_from_matrices(module: torch.nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints from when deepcnn stored convolution filters as out x (in * kh * kw) matrices load into
    filter banks."""
    for name, param in module.named_parameters():
        saved = state_dict.get(prefix + name)
        if saved is not None and saved.ndim == 2 and param.ndim == 4 and saved.numel() == param.numel():
            state_dict[prefix + name] = saved.reshape(param.shape)


def accuracies(confusion: torch.Tensor, classes: list[str]) -> tuple[float, dict[str, float | None]]:
    """Overall accuracy and each class's (None for a class with no images) from a confusion matrix."""
    confusion = confusion.double()
    totals = confusion.sum(1)
    per_class = {name: (confusion[i, i] / totals[i]).item() if totals[i] else None for i, name in enumerate(classes)}
    return (confusion.trace() / totals.sum()).item(), per_class


def pass_result(confusion: torch.Tensor, classes: list[str]) -> dict:
    """What one evaluation pass reports: its accuracy, each class's, and the confusion matrix as lists."""
    accuracy, per_class = accuracies(confusion, classes)
    return {"accuracy": accuracy, "per_class": per_class, "confusion": confusion.tolist()}


class Classifier(pl.LightningModule):
    """Trains `model` on `classes`; evaluates through `logits`, the one path from raw pixels to class scores
    (centre crop, standardization, test-time augmentation) that validation, testing, predict and export share.

    `validation_label` names what validation measures: "val" for the held-out split, "test" when the run
    has none and its curve is test accuracy.
    """

    def __init__(self, model: dict, optimizer: dict, scheduler: dict, loss: dict, classes: list[str],
                 input_size: int, tta: int = 0):
        super().__init__()
        # Loggers get the run's own overrides and final accuracies at the end, not these nested settings.
        self.save_hyperparameters(logger=False)
        self.model = use_patch_gradients(build_model(model, len(classes), input_size))
        self.model.to(memory_format=torch.channels_last)
        self.register_load_state_dict_pre_hook(filters_from_matrices)
        self.loss = instantiate(loss)
        self.val_confusion = MulticlassConfusionMatrix(len(classes))
        self.test_confusion = MulticlassConfusionMatrix(len(classes))
        self.validation_label = "val"
        self.history: dict[str, list[tuple[int, float]]] = {"loss": [], "accuracy": []}
        self.validation_result: dict | None = None
        self.test_result: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits of raw pixels (N x 3 x 32 x 32, 0-255, any dtype), as evaluation computes them."""
        x = augment.preprocess(pixels, self.hparams.input_size).contiguous(memory_format=torch.channels_last)
        return sum(weight * self(view) for weight, view in augment.tta_views(x, self.hparams.tta))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss(self(images), labels)
        step = self.global_step + 1  # steps count optimizer steps taken, as the progress lines do
        if step % self.trainer.log_every_n_steps == 0:
            # Only on the steps whose values reach the logger: logging costs a measurable share of a step.
            self.log("train/loss", loss, prog_bar=True)
            self.history["loss"].append((step, loss.item()))
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.val_confusion.update(self.logits(images), labels)

    def on_validation_epoch_end(self):
        self.validation_result = pass_result(self.val_confusion.compute(), self.hparams.classes)
        self.val_confusion.reset()
        accuracy = self.validation_result["accuracy"]
        label = self.validation_label
        self.log(f"{label}/accuracy", accuracy, prog_bar=True)
        for name, value in self.validation_result["per_class"].items():
            if value is not None:
                self.log(f"{label}_per_class/{name}", value)
        if self.trainer.state.fn == "fit":
            self.history["accuracy"].append((self.global_step, accuracy))

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.test_confusion.update(self.logits(images), labels)

    def on_test_epoch_end(self):
        self.test_result = pass_result(self.test_confusion.compute(), self.hparams.classes)
        self.test_confusion.reset()
        self.log("test/accuracy", self.test_result["accuracy"])

    def configure_optimizers(self):
        settings = dict(self.hparams.optimizer)
        rules = settings.pop("param_groups", None) or []
        optimizer = optim.scale_groups(instantiate(settings)(optim.parameter_groups(self.model, rules)))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, instantiate(self.hparams.scheduler))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["deepcnn_history"] = self.history

    def on_load_checkpoint(self, checkpoint):
        self.history = checkpoint.get("deepcnn_history", {"loss": [], "accuracy": []})
