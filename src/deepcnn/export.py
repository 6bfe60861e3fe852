"""A checkpoint as a self-contained ONNX model: raw RGB pixels in, class logits out."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from torch import nn

from deepcnn.files import refuse_output_over_inputs, replaced_on_success
from deepcnn.checkpoints import load_classifier
from deepcnn.module import Classifier
from deepcnn.records import CHANNELS, HEIGHT, WIDTH

INPUT, OUTPUT = "images", "logits"


class Deployed(nn.Module):
    """A classifier with its test-time preprocessing in front: float (N, 3, 32, 32) RGB values in 0-255
    are centre-cropped, standardized and classified exactly as in evaluation (test-time augmentation
    included)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(images)


def export_onnx(ckpt_path: str | Path, output: str | Path) -> Path:
    """Write the checkpoint's network, preprocessing included, as float32 ONNX with any batch size.

    The class names, in label order, are stored in the model's metadata under "classes". The output
    is never written over the checkpoint.
    """
    refuse_output_over_inputs(output, [ckpt_path])
    module = load_classifier(ckpt_path)
    deployed = Deployed(module).eval()
    example = torch.zeros(2, CHANNELS, HEIGHT, WIDTH)
    with replaced_on_success(output) as partial:
        # The TorchScript-based exporter: it needs nothing beyond the onnx package.
        torch.onnx.export(deployed, (example,), partial, dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        model = onnx.load(partial)
        onnx.helper.set_model_props(model, {"classes": json.dumps(module.hparams.classes),
                                            "input": "float32 RGB values 0-255, N x 3 x 32 x 32"})
        onnx.checker.check_model(model)
        onnx.save(model, partial)
    return Path(output)
