"""Overall and per-class accuracy of a checkpoint on the whole test set: python src/eval.py ckpt_path=PATH"""
import hydra
from omegaconf import DictConfig

from deepcnn.errors import reported_errors
from deepcnn.experiment import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    with reported_errors():
        return evaluate(cfg)["test_accuracy"]


if __name__ == "__main__":
    main()
