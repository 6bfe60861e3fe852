"""Classify image files: python src/predict.py ckpt_path=PATH input=FILE_OR_FOLDER [output=FILE]

Writes CSV rows of path, class and probability to stdout, or to output=FILE (its folder created if
missing), which is written whole at the end and never over the checkpoint or an input.
"""
import hydra
from omegaconf import DictConfig

from deepcnn import cli
from deepcnn.errors import reported_errors
from deepcnn.predict import predict


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        predict(cfg.ckpt_path, cfg.input, cfg.output)


if __name__ == "__main__":
    cli.run(main)
