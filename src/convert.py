"""Rewrite an image-folder dataset as CIFAR binary records: python src/convert.py input=FOLDER output=FOLDER"""
import hydra
from omegaconf import DictConfig

from deepcnn.convert import convert_image_folder
from deepcnn import cli
from deepcnn.errors import reported_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="convert")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        counts = convert_image_folder(cfg.input, cfg.output)
        print(f"{counts['train']:,} training and {counts['test']:,} test images of {counts['classes']} classes "
              f"written to {cfg.output}; train on them with data.data_dir={cfg.output}")


if __name__ == "__main__":
    cli.run(main)
