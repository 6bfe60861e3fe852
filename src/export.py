"""Export a checkpoint as an ONNX model, preprocessing included: python src/export.py ckpt_path=PATH output=FILE"""
import hydra
from omegaconf import DictConfig

from deepcnn import cli
from deepcnn.errors import reported_errors
from deepcnn.export import export_onnx


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        print(f"wrote {export_onnx(cfg.ckpt_path, cfg.output)}")


if __name__ == "__main__":
    cli.run(main)
