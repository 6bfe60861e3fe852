"""Overall and per-class accuracy of a checkpoint on the whole test set: python src/eval.py ckpt_path=PATH"""
import hydra
from omegaconf import DictConfig

from deepcnn import cli
from deepcnn.errors import reported_errors
from deepcnn.experiment import test_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    with reported_errors():
        return test_checkpoint(cfg)["test_accuracy"]


if __name__ == "__main__":
    cli.run(main)
