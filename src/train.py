"""Train a network: python src/train.py [experiment=NAME] [key=value ...]"""
import hydra
from omegaconf import DictConfig

from deepcnn.errors import reported_errors
from deepcnn.experiment import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with reported_errors():
        return train(cfg)["test_accuracy"]


if __name__ == "__main__":
    main()
