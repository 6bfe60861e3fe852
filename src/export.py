"""Export a checkpoint as an ONNX model, preprocessing included: python src/export.py ckpt_path=PATH output=FILE"""
import sys

import hydra
from omegaconf import DictConfig

from deepcnn import cli
from deepcnn.errors import reported_errors
from deepcnn.export import export_onnx


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        # On stderr: the model itself may be going to stdout (output=/dev/stdout).
        print(f"wrote {export_onnx(cfg.ckpt_path, cfg.output)}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
