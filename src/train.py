"""Train a network: python src/train.py [experiment=NAME] [group=option ...] [key=value ...]"""
import sys

import hydra
from omegaconf import DictConfig

from deepcnn import checkpoints, cli
from deepcnn.errors import reported_errors
from deepcnn.experiment import train_job


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with reported_errors():
        return train_job(cfg)


if __name__ == "__main__":
    with reported_errors():
        sys.argv[1:] = checkpoints.resume_arguments(sys.argv[1:])
    cli.run(main)
